"""Formatting helpers shared by the report tables, the HTML page and the plots."""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd



@dataclass
class Cell:
    """A table cell: the text shown, the value it sorts by (None sorts last), a tooltip
    (the HTML title: the paired test against the parent) and a CSS class ("ns": not
    significantly different from the parent)."""
    text: str
    sort: float | int | str | None = None
    title: str | None = None
    css: str | None = None


def num(x):
    """x as a plain Python number, or None for a missing value (None, NaN or pandas' NA)."""
    if x is None or pd.isna(x):
        return None
    return x.item() if hasattr(x, "item") else x


def fmt_metric(spec: dict, value, stderr=None) -> str:
    """Accuracies (kind "accuracy", in [0, 1]) as percentages with ±stderr; everything
    else with 4 significant digits."""
    value, stderr = num(value), num(stderr)
    if value is None:
        return "-"
    if spec.get("kind") == "accuracy" and 0 <= value <= 1:
        return f"{100 * value:.1f}" + (f" ±{100 * stderr:.1f}" if stderr is not None else "")
    return f"{value:.4g}" + (f" ±{stderr:.2g}" if stderr is not None else "")


def state_bytes_of(rec: dict) -> tuple[int | None, int | None]:
    """(bytes, seqlen) of record["state_bytes"], which is {seqlen, bytes} or a plain int."""
    sb = rec.get("state_bytes")
    if isinstance(sb, dict):
        return sb.get("bytes"), sb.get("seqlen")
    return (sb if isinstance(sb, (int, float)) else None), None
