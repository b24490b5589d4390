"""Plain-text result tables (the full leaderboard with plots is a later step).

Rows only share a table when their comparability key matches: suite and its version,
evaluator version, base-model hash and dtype. Other rows get their own table.
"""
from __future__ import annotations


def comparability_key(rec: dict) -> tuple:
    versions = rec.get("versions", {})
    return (rec.get("suite"), rec.get("suite_version"), versions.get("lm_eval"),
            rec.get("model", {}).get("name"), rec.get("model", {}).get("file_hash", "")[:12],
            rec.get("dtype"))


def _fmt(metric: dict | None) -> str:
    if not metric:
        return "-"
    v, se = metric.get("value"), metric.get("stderr")
    text = f"{100 * v:.1f}" if v is not None and 0 <= v <= 1 else f"{v:.4g}"
    if se is not None and v is not None and 0 <= v <= 1:
        text += f" ±{100 * se:.1f}"
    return text


def tables(records: list[dict]) -> list[str]:
    """One markdown table per comparability key; metric columns sorted by name."""
    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        groups.setdefault(comparability_key(rec), []).append(rec)
    out = []
    for key, recs in groups.items():
        suite, sver, lmeval, model, mhash, dtype = key
        metrics = sorted({m for r in recs for m in r.get("metrics", {})})
        parent = next((r for r in recs if r.get("method") == "softmax"), None)
        head = ["method", "status", "n", *metrics]
        if parent and "acc" in metrics:
            head.append("acc % of softmax")
        lines = [f"### {suite} v{sver} · model {model} ({mhash}) · {dtype} · lm-eval {lmeval}",
                 "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in sorted(recs, key=lambda r: r.get("method", "")):
            m = r.get("metrics", {})
            first = m.get(metrics[0]) if metrics else None
            row = [r.get("method", "?"), r.get("status", "?"), str(first["n"]) if first else "-"]
            row += [_fmt(m.get(name)) for name in metrics]
            if parent and "acc" in metrics:
                pa, ra = parent["metrics"].get("acc"), m.get("acc")
                row.append(f"{100 * ra['value'] / pa['value']:.1f}%" if pa and ra and pa["value"] else "-")
            lines.append("| " + " | ".join(row) + " |")
        out.append("\n".join(lines))
    return out
