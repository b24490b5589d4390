"""Result tables: one per comparability key, every method beside softmax and swa.

Rows only share a table when their comparability key matches (README.md, "Leaderboard: linbench
report"): for quality suites the suite and its version, the evaluator (lm-eval) version,
the base-model hash and the dtype; for speed records the device, the package versions,
the level and the shape (batch, heads, dim, dtype). Other rows get their own table.
Records whose status is not "ok" appear as rows with their status, never dropped.

`build_tables` returns structured tables (the HTML page and the plots read them);
`tables` returns them as markdown, which `linbench run` and `linbench report` print.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from linbench.report import speed_table as report_speed
from linbench.report.cells import (Cell, fmt_bytes, fmt_count, fmt_metric, is_lower_better,
                                    method_rank, state_bytes_of)

PARENT = "softmax"
# Canonical metric order per suite; metrics not listed follow by name.
METRIC_ORDER = {
    "mmlu5": ["acc", "acc_stem", "acc_humanities", "acc_social_sciences", "acc_other"],
    "commonsense": ["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "avg",
                    "avg_incl_mmlu"],
    "ppl": ["ppl_wiki", "ppl_lambada", "lambada_acc"],
    "recall": ["passkey", "passkey_in_window", "passkey_out_window", "needle",
               "needle_in_window", "needle_out_window", "kv", "squad"],
}
COMMONSENSE_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")
SUITE_ORDER = ["mmlu5", "commonsense", "ppl", "recall"]
LABELS = {"avg_incl_mmlu": "avg incl. MMLU"}


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
    metric_rows: list[dict] = field(default_factory=list)  # effective metrics, aligned with rows
    metric_names: list[str] = field(default_factory=list)  # the metric columns, in order


def comparability_key(rec: dict) -> tuple:
    if rec.get("suite") == "speed":
        return report_speed.speed_key(rec)
    versions = rec.get("versions") or {}
    model = rec.get("model") or {}
    return (rec.get("suite"), rec.get("suite_version"), versions.get("lm_eval"),
            model.get("name"), (model.get("file_hash") or "")[:12], rec.get("dtype"))


def _group(records: list[dict]) -> list[list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        groups.setdefault(comparability_key(rec), []).append(rec)

    def rank(item):
        suite = item[1][0].get("suite") or ""
        known = SUITE_ORDER.index(suite) if suite in SUITE_ORDER else len(SUITE_ORDER)
        return (suite == "speed", known, suite)
    return [recs for _, recs in sorted(groups.items(), key=rank)]  # stable: insertion order


def _sorted(recs: list[dict]) -> list[dict]:
    return sorted(recs, key=lambda r: (method_rank(r.get("method")), r.get("created") or ""))


def _ok(rec: dict) -> bool:
    return rec.get("status") == "ok"


def _mmlu_acc(rec: dict, records: list[dict]) -> dict | None:
    """The 5-shot MMLU acc of the same base model (hash), method and dtype, newest first."""
    same = [r for r in records if r.get("suite") == "mmlu5" and _ok(r)
            and r.get("method") == rec.get("method") and r.get("dtype") == rec.get("dtype")
            and (r.get("model") or {}).get("file_hash") == (rec.get("model") or {}).get("file_hash")
            and "acc" in (r.get("metrics") or {})]
    return max(same, key=lambda r: r.get("created") or "")["metrics"]["acc"] if same else None


def effective_metrics(rec: dict, records: list[dict]) -> dict:
    """The record's metrics plus the derived commonsense averages.

    "avg" is the unweighted mean of the five zero-shot tasks; "avg_incl_mmlu" adds 5-shot
    MMLU acc as a sixth task, the 6-task average the LoLCATs / Liger papers report.
    """
    metrics = dict(rec.get("metrics") or {})
    if rec.get("suite") != "commonsense" or not _ok(rec):
        return metrics
    five = [metrics.get(t) for t in COMMONSENSE_TASKS]
    if all(m and m.get("value") is not None for m in five):
        if "avg" not in metrics:
            metrics["avg"] = {"value": sum(m["value"] for m in five) / 5, "stderr": None,
                              "n": sum(m.get("n") or 0 for m in five)}
        mmlu = _mmlu_acc(rec, records)
        if mmlu and mmlu.get("value") is not None:
            metrics["avg_incl_mmlu"] = {"value": (sum(m["value"] for m in five) + mmlu["value"]) / 6,
                                        "stderr": None,
                                        "n": sum(m.get("n") or 0 for m in five) + (mmlu.get("n") or 0)}
    return metrics


def _metric_names(suite: str, present: set[str]) -> list[str]:
    order = [m for m in METRIC_ORDER.get(suite, []) if m in present]
    return order + sorted(present - set(order))


def _vs_parent(name: str, value, parent) -> Cell:
    if value is None or not parent or not parent.get("value"):
        return Cell("-")
    ratio = value / parent["value"]
    if is_lower_better(name):
        return Cell(f"{ratio:.3f}x", ratio)
    return Cell(f"{100 * ratio:.1f}%", 100 * ratio)


def _quality_table(recs: list[dict], records: list[dict]) -> Table:
    recs = _sorted(recs)
    first = recs[0]
    suite = first.get("suite") or "?"
    eff = [effective_metrics(r, records) for r in recs]
    names = _metric_names(suite, {m for e in eff for m in e})
    parent = next((e for r, e in zip(recs, eff) if r.get("method") == PARENT and _ok(r)), None)
    columns = ["method", "status", "n"]
    for name in names:
        columns.append(LABELS.get(name, name))
        if parent is not None:
            columns.append(f"{LABELS.get(name, name)} / softmax" if is_lower_better(name)
                           else f"{LABELS.get(name, name)} % of softmax")
    columns += ["state bytes", "recovery tokens"]
    rows, notes = [], []
    for rec, m in zip(recs, eff):
        lead = m.get(names[0]) if names else None
        n = lead.get("n") if lead else None
        row = [Cell(rec.get("method") or "?", f"{method_rank(rec.get('method'))[0]} {rec.get('method')}"),
               Cell(rec.get("status") or "?"), Cell("-" if n is None else str(n), n)]
        for name in names:
            metric = m.get(name)
            value = metric.get("value") if metric else None
            text = fmt_metric(name, metric)
            if metric and metric.get("n") is not None and metric.get("n") != n:
                text += f" (n={metric['n']})"
            row.append(Cell(text, value))
            if parent is not None:
                row.append(_vs_parent(name, value, parent.get(name)))
        sb, seqlen = state_bytes_of(rec)
        row.append(Cell(fmt_bytes(sb) + (f" @{seqlen}" if sb is not None and seqlen else ""), sb))
        tokens = sum(int(s.get("tokens") or 0) for s in rec.get("recovery") or [])
        row.append(Cell(fmt_count(tokens), tokens))
        rows.append(row)
        if not _ok(rec):
            notes.append(f"{rec.get('method')}: {rec.get('status')}"
                         + (f": {rec['error']}" if rec.get("error") else ""))
    if parent is None:
        notes.insert(0, "no softmax row with status ok under this key: no % of softmax columns")
    if any(is_lower_better(n) for n in names):
        notes.insert(0, "perplexity is lower-is-better: its column beside softmax is the ratio "
                        "ppl / softmax ppl, not a percentage")
    if "avg_incl_mmlu" in names:
        notes.append("avg incl. MMLU: mean of the five zero-shot tasks and 5-shot MMLU acc from "
                     "the mmlu5 record with the same model hash, method and dtype")
    versions = first.get("versions") or {}
    model = first.get("model") or {}
    title = (f"{suite} v{first.get('suite_version')} · model {model.get('name')} "
             f"({(model.get('file_hash') or '')[:12]}) · {first.get('dtype')} · "
             f"lm-eval {versions.get('lm_eval')}")
    return Table("quality", suite, title, comparability_key(first), columns, rows, recs, notes, eff,
                 names)


def build_tables(records: list[dict]) -> list[Table]:
    out = []
    for recs in _group(records):
        if recs[0].get("suite") == "speed":
            columns, rows, recs_sorted, notes, title = report_speed.speed_table(recs)
            out.append(Table("speed", "speed", title, comparability_key(recs[0]), columns, rows,
                             recs_sorted, notes))
        else:
            out.append(_quality_table(recs, records))
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
    """One markdown table per comparability key (what `linbench run/report` print)."""
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
            "versions": ", ".join(f"{k} {v}" for k, v in sorted((rec.get("versions") or {}).items())),
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
