"""Result tables: one per comparability key, every method beside the parent row.

Rows only share a table when their comparability key matches (linbench.records.keys): for
quality suites the suite and its version, the evaluator (lm-eval) version, the base-model
hash and the dtype; for speed records the device, the package versions, the level and the
shape (batch, heads, dim, dtype). Other rows get their own table. Records whose status is
not "ok" appear as rows with their status, never dropped.

Nothing here knows a method or suite by name. Rows are ordered by `method_role` (the
parent, then baselines, then every other method by name) and compared with the parent
row; metric order, labels, direction, notes and derived metrics come from each record's
`suite_meta`; tables are ordered by the suites' declared `order`, speed last.

`build_tables` returns structured tables (the HTML page and the plots read them);
`tables` returns them as markdown, which `linbench run`, `speed` and `report` print.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from linbench.records import keys
from linbench.report import meta as plugin_meta
from linbench.report import speed_table as report_speed
from linbench.report.cells import Cell, fmt_bytes, fmt_count, fmt_metric, num, state_bytes_of
from linbench.report.frame import frame_of


@dataclass
class Table:
    """One comparable group of records, rendered as rows of cells (one row per record)."""
    kind: str                      # "quality" | "speed"
    suite: str
    title: str
    key: tuple
    columns: list[str]
    rows: list[list[Cell]]
    records: list[dict]            # aligned with rows
    notes: list[str] = field(default_factory=list)
    metric_names: list[str] = field(default_factory=list)  # the metric columns, in order
    values: pd.DataFrame | None = None  # metric values: rows aligned with records, columns
    #                                     metric_names (derived metrics included)
    meta: dict = field(default_factory=dict)  # the suite's metadata (suite_meta)


def _groups(df: pd.DataFrame, records: list[dict]) -> list[list[int]]:
    """Record indices per comparability key: tables in suite order (the suites' declared
    order, then by name; speed last), rows by role, method, then created (quality) or mode
    and sequence length (speed)."""
    recs = df.drop_duplicates("record").set_index("record", drop=False)
    recs = recs.assign(
        key=[keys.key(records[i]) for i in recs.record],
        order=pd.to_numeric(pd.Series([plugin_meta.suite_meta(records[i]).get("order")
                                       for i in recs.record], index=recs.index), errors="coerce"),
        rank=recs.method_role.map(plugin_meta.role_rank),
        speed=recs.kind == "speed",
        **{c: recs[c].fillna("") for c in ("suite", "method", "created", "mode")},
        seqlen=recs.seqlen.fillna(0))
    recs["group"] = recs.groupby("key", sort=False).ngroup()  # first appearance
    first = recs.drop_duplicates("group").sort_values(["speed", "order", "suite", "group"],
                                                      kind="stable", na_position="last")
    out = []
    for g, speed in zip(first.group, first.speed):
        rows = recs[recs.group == g].sort_values(
            ["rank", "method", "mode", "seqlen"] if speed else ["rank", "method", "created"],
            kind="stable")
        out.append(list(rows.record))
    return out


def _parent(recs: list[dict]) -> dict | None:
    """The first row with role "parent" and status ok: what every row is compared with."""
    return next((r for r in recs if r.get("method_role") == "parent" and _ok(r)), None)


def _ok(rec: dict) -> bool:
    return rec.get("status") == "ok"


def _wide(rows: pd.DataFrame, order: list[int], names: list[str], column: str) -> pd.DataFrame:
    """One column of the long frame as (record x metric), rows in `order`."""
    have = rows[rows.metric.notna()]
    if have.empty:
        return pd.DataFrame(index=order, columns=names, dtype="float64")
    return have.pivot(index="record", columns="metric", values=column).reindex(
        index=order, columns=names)


def _vs_parent(spec: dict, value, ratio) -> Cell:
    value, ratio = num(value), num(ratio)
    if value is None or ratio is None:
        return Cell("-")
    if plugin_meta.lower_is_better(spec):
        return Cell(f"{ratio:.3f}x", ratio)
    return Cell(f"{100 * ratio:.1f}%", 100 * ratio)


def _quality_table(rows: pd.DataFrame, recs: list[dict], order: list[int]) -> Table:
    first = recs[0]
    meta = plugin_meta.suite_meta(first)
    suite = first.get("suite") or "?"
    names = plugin_meta.metric_order(meta, rows.metric.dropna().unique())
    specs = {n: plugin_meta.spec(meta, n) for n in names}
    values, stderr, ns = (_wide(rows, order, names, c) for c in ("value", "stderr", "n"))
    parent = _parent(recs)
    pid = order[recs.index(parent)] if parent is not None else None
    # every value over the parent's (none where the parent has no value or a zero one)
    ratios = (values / values.loc[pid].where(values.loc[pid] != 0)) if pid is not None else None
    who = parent.get("method") if parent is not None else "parent"
    columns = ["method", "status", "n"]
    for name in names:
        label = specs[name]["label"]
        columns.append(label)
        if parent is not None:
            columns.append(f"{label} / {who}" if plugin_meta.lower_is_better(specs[name])
                           else f"{label} % of {who}")
    columns += ["state bytes", "recovery tokens"]
    out, failed = [], []
    for rec, rid in zip(recs, order):
        n = num(ns.at[rid, names[0]]) if names else None
        row = [Cell(rec.get("method") or "?",
                    f"{plugin_meta.row_rank(rec)[0]} {rec.get('method')}"),
               Cell(rec.get("status") or "?"), Cell("-" if n is None else str(n), n)]
        for name in names:
            value, own_n = num(values.at[rid, name]), num(ns.at[rid, name])
            text = fmt_metric(specs[name], value, stderr.at[rid, name])
            if own_n is not None and own_n != n:
                text += f" (n={own_n})"
            row.append(Cell(text, value))
            if parent is not None:
                row.append(_vs_parent(specs[name], value, ratios.at[rid, name]))
        sb, seqlen = state_bytes_of(rec)
        row.append(Cell(fmt_bytes(sb) + (f" @{seqlen}" if sb is not None and seqlen else ""), sb))
        tokens = sum(int(s.get("tokens") or 0) for s in rec.get("recovery") or [])
        row.append(Cell(fmt_count(tokens), tokens))
        out.append(row)
        if not _ok(rec):
            failed.append(f"{rec.get('method')}: {rec.get('status')}"
                          + (f": {rec['error']}" if rec.get("error") else ""))
    notes = list(dict.fromkeys(specs[n]["note"].replace("{parent}", who)
                               for n in names if specs[n]["note"]))
    if parent is None:
        notes.append('no row with method_role "parent" and status ok under this key: no '
                     "comparison columns")
    f = keys.fields(first)
    title = (f"{suite} v{f['suite_version']} · model {f['model']} "
             f"({(f['model_hash'] or '')[:12]}) · {f['dtype']} · lm-eval {f['lm_eval']}")
    return Table("quality", suite, title, keys.key(first), columns, out, recs, notes + failed,
                 names, values.set_axis(range(len(recs))), meta)


def build_tables(records: list[dict]) -> list[Table]:
    df = frame_of(records)
    out = []
    for order in _groups(df, records):
        recs = [records[i] for i in order]
        if keys.kind(recs[0]) == "speed":
            columns, rows, notes, title = report_speed.speed_table(recs)
            out.append(Table("speed", recs[0].get("suite") or "?", title, keys.key(recs[0]),
                             columns, rows, recs, notes))
        else:
            out.append(_quality_table(df[df.record.isin(order)], recs, order))
    return out


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(table: Table) -> str:
    lines = [f"### {table.title}", "", "| " + " | ".join(table.columns) + " |",
             "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(_md_cell(c.text) for c in row) + " |" for row in table.rows]
    if table.notes:
        lines += [""] + [f"- {_md_cell(n)}" for n in table.notes]
    return "\n".join(lines)


def tables(records: list[dict]) -> list[str]:
    """One markdown table per comparability key (what `linbench run/speed/report` print)."""
    return [to_markdown(t) for t in build_tables(records)]


PROVENANCE_COLUMNS = ["methods", "model", "file hash", "dtype", "linbench", "git", "command",
                      "device", "versions", "created"]


def provenance(table: Table) -> list[dict[str, str]]:
    """Who produced the rows of `table`: one entry per distinct (model, code, command, env)."""
    out: dict[tuple, dict] = {}
    for rec in table.records:
        model, git = rec.get("model") or {}, rec.get("git") or {}
        sha = (git.get("sha") or "unknown")[:12]
        entry = {
            "model": str(model.get("name")), "file hash": str(model.get("file_hash")),
            "dtype": str(rec.get("dtype")), "linbench": str(rec.get("linbench")),
            "git": sha + (" (dirty)" if git.get("dirty") else ""),
            "command": " ".join(rec.get("command") or []) or "-",
            "device": str(rec.get("device")),
            "versions": keys.versions_text(rec.get("versions")),
        }
        item = out.setdefault(tuple(entry.values()), {**entry, "_methods": [], "_created": []})
        if rec.get("method") not in item["_methods"]:
            item["_methods"].append(rec.get("method"))
        item["_created"].append(rec.get("created") or "")
    rows = []
    for item in out.values():
        created = sorted(c for c in item.pop("_created") if c)
        span = (created[0] if created and created[0] == created[-1]
                else f"{created[0]} .. {created[-1]}" if created else "-")
        rows.append({"methods": ", ".join(str(m) for m in item.pop("_methods")), **item,
                     "created": span})
    return [{k: r[k] for k in PROVENANCE_COLUMNS} for r in rows]
