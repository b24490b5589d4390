"""Result tables: one per comparability key, every method beside the parent row.

Rows only share a table when their comparability key matches (linbench.records.keys): for
quality suites the suite and its version, the evaluator (lm-eval) version, the base-model
hash and the dtype; for speed records the device, the package versions, the level and the
shape (batch, heads, dim, dtype). Other rows get their own table. Records whose status is
not "ok" appear as rows with their status, never dropped.

Nothing here knows a method or suite by name. Quality rows: the parent row (`method_role`
"parent") first, then every other row by the suite's primary metric in its direction
(rows without it last; ties by role, then name); in a suite whose parent is at chance
(stats.suite_at_chance) nothing is ranked: parent, baselines, then by name. Speed rows:
parent, baselines, then by name. Metric order, labels, direction, notes and derived
metrics come from each record's `suite_meta`; tables are ordered by the suites' declared
`order`, speed last.

Every quality cell beside the parent carries the paired test of stats.compare on the
items both records share: "≈ " before the value (and before its "% of parent" / "x
parent") when the difference is not significant at 95%, the value as is when it is, and
as is with a table note counting the cells that could not be tested and why. A suite
whose parent is at chance gets stats.AT_CHANCE_NOTE and no comparison columns. A table
whose rows come from several git commits, a dirty tree or several linbench versions says
so in a note, and so does a speed table whose records name only the CPU's architecture.

`build_tables` returns structured tables (the HTML page and the plots read them);
`tables` returns them as markdown, which `linbench run`, `speed` and `report` print.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import pandas as pd

from linbench.records import keys
from linbench.records.provenance import names_cpu_model
from linbench.report import meta as plugin_meta
from linbench.report import speed_table as report_speed
from linbench.report import stats
from linbench.report.cells import Cell, fmt_metric, num, state_bytes_of
from linbench.units import fmt_bytes, fmt_count
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
    stderr: pd.DataFrame | None = None  # like values, the metrics' stderr
    comparisons: dict = field(default_factory=dict)  # (row, metric) -> stats.Comparison
    at_chance: bool | None = None  # the parent within 2 stderr of chance (primary metric)


def _groups(df: pd.DataFrame, records: list[dict]) -> list[list[int]]:
    """Record indices per comparability key: tables in suite order (the suites' declared
    order, then by name; speed last), rows by role, method, then created (quality) or mode,
    sequence length, processes and prefill chunk (speed)."""
    recs = df.drop_duplicates("record").set_index("record", drop=False)
    recs = recs.assign(
        key=[keys.key(records[i]) for i in recs.record],
        order=pd.to_numeric(pd.Series([plugin_meta.suite_meta(records[i]).get("order")
                                       for i in recs.record], index=recs.index), errors="coerce"),
        rank=recs.method_role.map(plugin_meta.role_rank),
        speed=recs.kind == "speed",
        **{c: recs[c].fillna("") for c in ("suite", "method", "created", "mode")},
        seqlen=recs.seqlen.fillna(0), nproc=recs.nproc.fillna(1),
        prefill_chunk=recs.prefill_chunk.fillna(0))
    recs["group"] = recs.groupby("key", sort=False).ngroup()  # first appearance
    first = recs.drop_duplicates("group").sort_values(["speed", "order", "suite", "group"],
                                                      kind="stable", na_position="last")
    out = []
    for g, speed in zip(first.group, first.speed):
        rows = recs[recs.group == g].sort_values(
            ["rank", "method", "mode", "seqlen", "nproc", "prefill_chunk"] if speed
            else ["rank", "method", "created"],
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


def _vs_parent(spec: dict, value, ratio, c: stats.Comparison | None = None) -> Cell:
    value, ratio = num(value), num(ratio)
    if value is None or ratio is None:
        return Cell("-")
    if plugin_meta.lower_is_better(spec):
        return _marked(Cell(f"{ratio:.3f}x", ratio), c)
    return _marked(Cell(f"{100 * ratio:.1f}%", 100 * ratio), c)


def _marked(cell: Cell, c: stats.Comparison | None) -> Cell:
    """The cell with the paired test's mark ("≈ " when not significant) and tooltip."""
    if c is None:
        return cell
    if c.significant is False:
        cell.text, cell.css = f"{stats.APPROX} {cell.text}", "ns"
    cell.title = c.describe() if c.significant is not None else f"not tested: {c.test}"
    return cell


BUDGET_STAGES = ("transfer", "lora")  # the stages a config budget names (<stage>_tokens)
BUDGET_COLUMN = "recovery budget (tokens)"


def budget_cell(rec: dict) -> Cell:
    """The recovery budget of a row: the budget it was given when that names a preset
    (`cpu`, `cpu,lora=147456`; record["budget"], or the command's --budget) and the tokens
    of each stage, as trained (record["recovery"]) or else as budgeted
    (config["recovery"]["budget"]); "trained/budget" where a stage stopped early; the LoRA
    learning rate where a LoRA stage ran and the method config names it (presets set it,
    so rows of one preset name can differ in it); "-" for a method without recovery."""
    stages = [s for s in rec.get("recovery") or [] if isinstance(s, dict)]
    budget = ((rec.get("config") or {}).get("recovery") or {}).get("budget")
    budget = budget if isinstance(budget, dict) else {}
    planned = {st: int(budget[f"{st}_tokens"]) for st in BUDGET_STAGES
               if isinstance(budget.get(f"{st}_tokens"), (int, float))}
    parts, total = [], 0
    if stages:
        for s in stages:
            tokens = int(s.get("tokens") or 0)
            total += tokens
            text = f"{s.get('stage') or '?'} {fmt_count(tokens)}"
            want = planned.get(s.get("stage"))
            if want and tokens < want:
                text += f"/{fmt_count(want)}"
            parts.append(text)
    else:
        parts = [f"{st} {fmt_count(t)}" for st, t in planned.items() if t > 0]
        total = sum(planned.values())
    if not parts:
        return Cell("-")
    lr = ((rec.get("config") or {}).get("method") or {}).get("lora_lr")
    if isinstance(lr, (int, float)):
        parts = [p + f" (lr {lr:g})" if p.startswith("lora ") else p for p in parts]
    name = rec.get("budget") or _flag(rec.get("command"), "--budget")
    preset = isinstance(name, str) and re.fullmatch(r"[A-Za-z][\w.-]*", name.split(",")[0])
    head = f"{name}: " if preset and name != "custom" else ""
    return Cell(head + " + ".join(parts), total)


def _flag(command, flag: str) -> str | None:
    """The value of `flag` in a record's command line (records written before the runner
    stored the budget it was given: `--budget cpu` or `--budget=cpu`)."""
    args = command if isinstance(command, list) else []
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return str(args[i + 1])
        if isinstance(arg, str) and arg.startswith(flag + "="):
            return arg[len(flag) + 1:]
    return None


def _sort_rule(recs: list[dict], values: pd.DataFrame, order: list[int], parent: dict | None,
               primary: str | None, spec: dict | None, ranked: bool) -> tuple[list[int], str]:
    """Row positions in display order, and the rule as a note: rows with role "parent"
    first (the compared one first), then every other row by the suite's primary metric in
    its direction, rows without a value last; ties (and an unranked table) by role, then
    method name, then creation time."""
    lower = bool(spec) and plugin_meta.lower_is_better(spec)

    def key(pos: int):
        rec = recs[pos]
        tie = (*plugin_meta.row_rank(rec), rec.get("created") or "")
        if rec.get("method_role") == "parent":
            return (0, rec is not parent, 0.0, tie)
        v = num(values.at[order[pos], primary]) if ranked and primary else None
        if v is None:
            return (1, ranked and primary is not None, 0.0, tie)
        return (1, False, v if lower else -v, tie)

    positions = sorted(range(len(recs)), key=key)
    first = f"{parent.get('method')} (the parent) first, then " if parent is not None else ""
    if ranked and primary:
        label = (spec or {}).get("label") or primary
        rule = (f"rows: {first}by {label} ({'lower' if lower else 'higher'} is better); "
                f"rows without it last")
    else:
        rule = (f"rows: {first}baselines{'' if first else ' first'}, then by method name"
                + (" (not ranked: the parent is at chance)" if primary else ""))
    return positions, rule


def _with_derived(rec: dict, values: pd.Series) -> dict:
    """The record with the report's derived metrics (value only) added to its metrics, so
    that stats.suite_at_chance finds a derived primary metric."""
    have = dict(rec.get("metrics") or {})
    for name, v in values.items():
        if name not in have and num(v) is not None:
            have[name] = {"value": num(v), "stderr": None}
    return {**rec, "metrics": have}


WHY_UNTESTED = {  # stats' reasons, said for a reader of the table
    stats.NO_ITEMS: f"{stats.NO_ITEMS} (records written before suites stored per-item outcomes)",
    "metric missing": "no value for the parent",
}


def _untested_note(untested: dict[str, int], total: int, who: str) -> str | None:
    if not untested:
        return None
    n = sum(untested.values())
    why = "; ".join(f"{WHY_UNTESTED.get(k, k)}: {v}"
                    for k, v in sorted(untested.items(), key=lambda kv: (-kv[1], kv[0])))
    return (f"significance: {n} of {total} cells beside {who} could not be tested and are "
            f"shown without a mark ({why})")


def provenance_notes(recs: list[dict]) -> list[str]:
    """Notes for a table whose rows come from different code: several git commits, a dirty
    tree (uncommitted changes), several linbench versions."""
    shas: dict[str, bool] = {}
    for r in recs:
        git = r.get("git") or {}
        sha = (git.get("sha") or "unknown")[:12]
        shas[sha] = shas.get(sha, False) or bool(git.get("dirty"))
    notes = []
    dirty = sum(bool((r.get("git") or {}).get("dirty")) for r in recs)
    if len(shas) > 1 or dirty:
        names = ", ".join(f"{s} (dirty)" if d else s for s, d in sorted(shas.items()))
        head = (f"code: rows come from {len(shas)} git commits: {names}" if len(shas) > 1
                else f"code: every row from git {names}")
        notes.append(head + (f"; {dirty} of {len(recs)} records from a dirty tree "
                             "(uncommitted changes: the code is not exactly that commit)"
                             if dirty else "; no record from a dirty tree"))
    versions: dict[str, int] = {}
    for r in recs:
        v = str(r.get("linbench") or "unknown")
        versions[v] = versions.get(v, 0) + 1
    if len(versions) > 1:
        notes.append("linbench versions differ: " + ", ".join(
            f"{v} ({k} records)" for v, k in sorted(versions.items())))
    return notes


def device_notes(recs: list[dict]) -> list[str]:
    """A note for a speed table whose device string names only the CPU's architecture
    (records made before linbench recorded the CPU model and ISA): one string then covers
    machines that differ several-fold in speed."""
    devices = {str((r.get("details") or {}).get("device") or r.get("device")) for r in recs}
    if all(names_cpu_model(d) for d in devices):
        return []
    return ["device: these records name only the CPU architecture (made before linbench "
            "recorded the CPU model), so rows may come from different machines; rows made "
            "by one command (the provenance's command and created columns) ran on one"]


def _quality_table(rows: pd.DataFrame, recs: list[dict], order: list[int]) -> Table:
    first = recs[0]
    meta = plugin_meta.suite_meta(first)
    suite = first.get("suite") or "?"
    names = plugin_meta.metric_order(meta, rows.metric.dropna().unique())
    specs = {n: plugin_meta.spec(meta, n) for n in names}
    values, stderr, ns = (_wide(rows, order, names, c) for c in ("value", "stderr", "n"))
    parent = _parent(recs)
    pid = order[recs.index(parent)] if parent is not None else None
    primary = plugin_meta.primary(meta, names)
    at_chance = (stats.suite_at_chance(_with_derived(parent, values.loc[pid]), primary, meta)
                 if parent is not None and primary is not None else None)
    positions, rule = _sort_rule(recs, values, order, parent, primary,
                                 specs.get(primary) if primary else None, not at_chance)
    recs, order = [recs[p] for p in positions], [order[p] for p in positions]
    # every value over the parent's (none where the parent has no value or a zero one)
    ratios = (values / values.loc[pid].where(values.loc[pid] != 0)) if pid is not None else None
    who = parent.get("method") if parent is not None else "parent"
    compare_columns = parent is not None and not at_chance
    columns = ["method", "status", "n"]
    for name in names:
        label = specs[name]["label"]
        columns.append(label)
        if compare_columns:
            columns.append(f"{label} / {who}" if plugin_meta.lower_is_better(specs[name])
                           else f"{label} % of {who}")
    columns += ["state bytes", BUDGET_COLUMN]
    out, failed, comparisons = [], [], {}
    untested: dict[str, int] = {}
    tested = 0
    for pos, (rec, rid) in enumerate(zip(recs, order)):
        n = num(ns.at[rid, names[0]]) if names else None
        row = [Cell(rec.get("method") or "?",
                    f"{plugin_meta.row_rank(rec)[0]} {rec.get('method')}"),
               Cell(rec.get("status") or "?"), Cell("-" if n is None else str(n), n)]
        for name in names:
            value, own_n = num(values.at[rid, name]), num(ns.at[rid, name])
            text = fmt_metric(specs[name], value, stderr.at[rid, name])
            if own_n is not None and own_n != n:
                text += f" (n={own_n})"
            c = None
            if parent is not None and rec is not parent and value is not None:
                c = stats.compare(parent, rec, name, meta=plugin_meta.suite_meta(rec) or meta)
                comparisons[(pos, name)] = c
                if c.significant is None:
                    untested[c.test] = untested.get(c.test, 0) + 1
                else:
                    tested += 1
            row.append(_marked(Cell(text, value), c))
            if compare_columns:
                row.append(_vs_parent(specs[name], value, ratios.at[rid, name], c))
        sb, seqlen = state_bytes_of(rec)
        row.append(Cell(fmt_bytes(sb) + (f" @{seqlen}" if sb is not None and seqlen else ""), sb))
        row.append(budget_cell(rec))
        out.append(row)
        if not _ok(rec):
            failed.append(f"{rec.get('method')}: {rec.get('status')}"
                          + (f": {rec['error']}" if rec.get("error") else ""))
    notes = [stats.AT_CHANCE_NOTE] if at_chance else []
    notes += list(dict.fromkeys(specs[n]["note"].replace("{parent}", who)
                                for n in names if specs[n]["note"]))
    if parent is None:
        notes.append('no row with method_role "parent" and status ok under this key: no '
                     "comparison columns")
    if tested:
        notes.append(f"{stats.APPROX}: not significantly different from {who} at 95% on the "
                     "same items (paired test; unmarked: significant)")
    untested_note = _untested_note(untested, tested + sum(untested.values()), who)
    notes += [untested_note] if untested_note else []
    notes.append(rule)
    notes += provenance_notes(recs)
    f = keys.fields(first)
    title = (f"{suite} v{f['suite_version']} · model {f['model']} "
             f"({(f['model_hash'] or '')[:12]}) · {f['dtype']} · lm-eval {f['lm_eval']}")
    return Table("quality", suite, title, keys.key(first), columns, out, recs, notes + failed,
                 names, values.loc[order].set_axis(range(len(recs))), meta,
                 stderr.loc[order].set_axis(range(len(recs))), comparisons, at_chance)


def build_tables(records: list[dict]) -> list[Table]:
    df = frame_of(records)
    out = []
    for order in _groups(df, records):
        recs = [records[i] for i in order]
        if keys.kind(recs[0]) == "speed":
            columns, rows, notes, title = report_speed.speed_table(recs)
            out.append(Table("speed", recs[0].get("suite") or "?", title, keys.key(recs[0]),
                             columns, rows, recs,
                             notes + provenance_notes(recs) + device_notes(recs)))
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
