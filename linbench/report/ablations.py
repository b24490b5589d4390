"""Ablation tables: every configuration variant beside its method's default, with the test.

A run with `--set` overrides is stored under a label like `lolcats[window=0]` (the method
name, then the changed fields in brackets). Inside one quality table (one comparability
key) such a row is a variant of the row labelled with the bare name (`lolcats`), the
method's default configuration. For each variant this module tests, on the items both
records share, every metric the suite declares (its primary metric first) with the same
paired tests as the parent comparisons (stats.compare: exact McNemar for accuracies,
bootstrap for averages, document bootstrap of the ratio for perplexities), and renders
one table per suite: variant, default, metric, both values, the difference (or ratio),
its 95% CI, p, n and whether it is significant.

Nothing here knows a method or suite by name: variants are recognised by the label form
alone, metrics come from the records' suite_meta.
"""
from __future__ import annotations

import re

from linbench.report import meta as plugin_meta
from linbench.report import stats
from linbench.report.build import Table, budget_cell
from linbench.report.cells import Cell, fmt_metric, num, state_bytes_of
from linbench.units import fmt_bytes

_VARIANT = re.compile(r"^(?P<base>[^\[\]]+)\[(?P<changes>.+)\]$")

COLUMNS = ["variant", "default", "metric", "variant value", "default value", "difference",
           "95% CI", "p", "n", "significant", "state bytes (variant / default)", "budget"]
NOTE = ("Each variant (a run with --set overrides) against its method's default "
        "configuration on the items both share (or, where the default has moved since the "
        "variant ran, against the row that differs from it only in the variant's fields). "
        "difference: variant - default in points for accuracies, variant / default for "
        "perplexities. significant: at 95% (two-sided); "
        f"{stats.ACCURACY_CI}. "
        "state bytes: the inference state of each at the length shown. budget: the variant's "
        "recovery budget, marked where the default's differs.")


def base_of(label: str) -> tuple[str, str] | None:
    """"lolcats[window=0]" -> ("lolcats", "window=0"); None for a bare name."""
    m = _VARIANT.match(label or "")
    return (m["base"], m["changes"]) if m else None


def _metrics(meta: dict, records: list[dict]) -> list[str]:
    """The metrics the records have (and the suite's derived means), in the suite's declared
    order, its primary one first."""
    present = {m for r in records for m in (r.get("metrics") or {})}
    present |= {d["name"] for d in plugin_meta.derived(meta)}
    names = plugin_meta.metric_order(meta, present)
    primary = meta.get("primary")
    return sorted(names, key=lambda n: n != primary)


def _value(table: Table, record: dict, name: str) -> tuple:
    """(value, stderr) of a metric of a row, as the table computed it (derived ones too)."""
    i = next(i for i, r in enumerate(table.records) if r is record)
    get = lambda df: num(df.iloc[i].get(name)) if df is not None and name in df else None  # noqa: E731
    m = (record.get("metrics") or {}).get(name) or {}
    value = get(table.values)
    return (m.get("value") if value is None else value,
            m.get("stderr") if get(table.stderr) is None else get(table.stderr))


def _diff_cells(c: stats.Comparison) -> list[Cell]:
    if c.diff is None:
        return [Cell("-"), Cell("-"), Cell("-"), Cell("-"), Cell(c.test, title=c.test)]
    if c.ratio:
        diff, ci = f"{c.diff:.3f}x", f"[{c.ci[0]:.3f}, {c.ci[1]:.3f}]" if c.ci else "-"
    else:
        diff = f"{100 * c.diff:+.1f} pts"
        ci = f"[{100 * c.ci[0]:+.1f}, {100 * c.ci[1]:+.1f}]" if c.ci else "-"
    sig = "yes" if c.significant else f"no ({stats.APPROX})"
    return [Cell(diff, c.diff, c.describe()), Cell(ci), Cell("-" if c.p is None else f"{c.p:.3g}", c.p),
            Cell("-" if c.n_shared is None else str(c.n_shared), c.n_shared),
            Cell(sig, int(bool(c.significant)), c.describe(), None if c.significant else "ns")]


def _state(variant: dict, base: dict) -> Cell:
    """"35.5 MiB / 16.9 MiB @2048": both rows' inference state at the variant's length."""
    (vb, vt), (db, dt) = state_bytes_of(variant), state_bytes_of(base)
    at = f" @{vt}" if vt and vt == dt else ""
    return Cell(f"{fmt_bytes(vb)} / {fmt_bytes(db)}{at}", vb)


def _budget_cell(variant: dict, base: dict) -> Cell:
    v, d = budget_cell(variant), budget_cell(base)
    if v.text == d.text:
        return v
    return Cell(f"{v.text} (default: {d.text})", v.sort, "the two rows were recovered at "
                "different budgets: the difference is not the variant's alone")


def _method_config(record: dict) -> dict:
    return dict((record.get("config") or {}).get("method") or {})


def _default_for(variant: dict, changes: str, default: dict, rows: list[dict]) -> dict:
    """The row a variant is tested against: the row of its method whose configuration is the
    variant's with the fields its label names at the default's values. That is the
    method's default row, unless the default moved after the variant ran (a preset's
    LoRA lr, say); then it is the row that kept the old configuration (e.g.
    `lolcats[lora_lr=0.0001]`), so that a difference is the variant's alone. Without such
    a row (or configs in the records), the default row."""
    mine, base = _method_config(variant), base_of(variant["method"])[0]
    named = set(re.findall(r"(?:^|,)(\w+)=", changes))
    want = {**mine, **{k: _method_config(default).get(k) for k in named}}
    same = [r for r in (default, *rows) if mine and r is not variant
            and (base_of(r.get("method", "")) or (r.get("method"),))[0] == base
            and _method_config(r) == want]
    return same[0] if same else default


def ablation_table(table: Table) -> Table | None:
    """The ablation table of one quality table, or None when it has no variant with a default."""
    if table.kind != "quality":
        return None
    ok = [r for r in table.records if r.get("status") == "ok"]
    default = {r["method"]: r for r in ok if base_of(r.get("method", "")) is None}
    pairs = [(r, _default_for(r, b[1], default[b[0]], ok), b[1]) for r in ok
             if (b := base_of(r.get("method", ""))) and b[0] in default]
    if not pairs:
        return None
    meta = table.meta or {}
    rows, recs = [], []
    for variant, base, changes in sorted(pairs, key=lambda p: p[0]["method"]):
        for name in _metrics(meta, [variant, base]):
            v, d = _value(table, variant, name), _value(table, base, name)
            if v[0] is None and d[0] is None:
                continue
            spec = plugin_meta.spec(meta, name)
            c = stats.compare(base, variant, name, meta)
            label = spec["label"]
            rows.append([Cell(variant["method"]), Cell(base["method"]), Cell(label),
                         Cell(fmt_metric(spec, *v)), Cell(fmt_metric(spec, *d)),
                         *_diff_cells(c), _state(variant, base), _budget_cell(variant, base)])
            recs.append(variant)
    return Table("ablation", table.suite, f"Ablations: {table.title}", table.key, list(COLUMNS),
                 rows, recs, [NOTE], meta=meta)


def ablation_tables(tables: list[Table]) -> list[Table]:
    return [a for t in tables if (a := ablation_table(t)) is not None]
