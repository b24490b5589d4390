"""Formatting helpers shared by the report tables, the HTML page and the plots."""
from __future__ import annotations

from dataclasses import dataclass

from linbench.units import fmt_bytes, fmt_count  # noqa: F401  (re-exported for the report)

BASELINES = ("softmax", "swa")  # always the first rows, in this order


@dataclass
class Cell:
    """A table cell: the text shown and the value it sorts by (None sorts last)."""
    text: str
    sort: float | int | str | None = None


def method_rank(method: str | None) -> tuple[int, str]:
    """softmax first, swa second, then every other method by name."""
    name = method or ""
    return (BASELINES.index(name) if name in BASELINES else len(BASELINES), name)


def is_lower_better(metric: str) -> bool:
    """Perplexities (ppl_*) and losses: lower is better, shown as a ratio to softmax."""
    return metric.startswith("ppl") or metric in ("nll", "loss")


def fmt_metric(name: str, metric: dict | None) -> str:
    """Accuracies in [0, 1] as percentages with ±stderr; everything else with 4 digits."""
    if not metric or metric.get("value") is None:
        return "-"
    v, se = metric["value"], metric.get("stderr")
    if not is_lower_better(name) and 0 <= v <= 1:
        text = f"{100 * v:.1f}"
        return text + (f" ±{100 * se:.1f}" if se is not None else "")
    return f"{v:.4g}" + (f" ±{se:.2g}" if se is not None else "")


def state_bytes_of(rec: dict) -> tuple[int | None, int | None]:
    """(bytes, seqlen) of record["state_bytes"], which is {seqlen, bytes} or a plain int."""
    sb = rec.get("state_bytes")
    if isinstance(sb, dict):
        return sb.get("bytes"), sb.get("seqlen")
    return (sb if isinstance(sb, (int, float)) else None), None
