"""Heatmaps of a suite's (context length x needle depth) cell grids (the details keys its
metadata lists under `heatmaps`): accuracy per cell, one panel per method, with the
exact-attention window boundary drawn where a cell's `in_window` flips.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from linbench.units import fmt_len_short as fmt_length


BOUNDARY = "red"


def _grid(cells: list[dict]):
    """(lengths, depths, acc (L, D) with NaN holes, in_window (L, D) object array)."""
    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    acc = np.full((len(lengths), len(depths)), np.nan)
    inside = np.full((len(lengths), len(depths)), None, dtype=object)
    for c in cells:
        li, di = lengths.index(c["length"]), depths.index(c["depth"])
        acc[li, di] = c.get("acc") if c.get("acc") is not None else np.nan
        inside[li, di] = c.get("in_window")
    return lengths, depths, acc, inside


def boundary_segments(inside) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Cell edges (in imshow coordinates) between neighbours whose in_window differs."""
    segs = []
    rows, cols = inside.shape
    for li in range(rows):
        for di in range(cols):
            a = inside[li, di]
            if a is None:
                continue
            if di + 1 < cols and inside[li, di + 1] is not None and inside[li, di + 1] != a:
                segs.append(((di + 0.5, di + 0.5), (li - 0.5, li + 0.5)))
            if li + 1 < rows and inside[li + 1, di] is not None and inside[li + 1, di] != a:
                segs.append(((di - 0.5, di + 0.5), (li + 0.5, li + 0.5)))
    return segs


def _panel(ax, rec: dict, task: str):
    details = rec.get("details") or {}
    lengths, depths, acc, inside = _grid(details[task])
    im = ax.imshow(acc, origin="lower", vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for li in range(len(lengths)):
        for di in range(len(depths)):
            if not np.isnan(acc[li, di]):
                ax.text(di, li, f"{100 * acc[li, di]:.0f}", ha="center", va="center", fontsize=7,
                        color="black" if acc[li, di] > 0.6 else "white")
    segs = boundary_segments(inside)
    for xs, ys in segs:
        ax.plot(xs, ys, color=BOUNDARY, lw=2.5, solid_capstyle="butt")
    ax.set_xticks(range(len(depths)), [f"{d:.2g}" for d in depths], fontsize=7)
    ax.set_yticks(range(len(lengths)), [fmt_length(n) for n in lengths], fontsize=7)
    ax.set_xlabel("needle depth (0 = start)", fontsize=8)
    ax.set_ylabel("context length (tokens)", fontsize=8)
    window = details.get("window")
    flags = {v for v in inside.flat if v is not None}
    where = ("window boundary in red" if segs else
             "all cells inside the window" if flags == {True} else
             "no cell inside the window" if flags == {False} else "")
    wtext = "full attention" if window is None else "no exact attention" if window == 0 \
        else f"window {window}"
    ax.set_title(f"{rec.get('method')} ({wtext})\n{where}", fontsize=8)
    return im


def heatmap(i: int, table, task: str, out: Path):
    """(title, path, caption) of one figure for the `task` grids of table `i`, or None."""
    recs = [r for r in table.records
            if r.get("status") == "ok" and (r.get("details") or {}).get(task)]
    if not recs:
        return None
    ncols = min(4, len(recs))
    nrows = -(-len(recs) // ncols)
    fig = Figure(figsize=(3.6 * ncols + 1, 3.3 * nrows + 0.6), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    im = None
    for ax, rec in zip(axes, recs):
        im = _panel(ax, rec, task)
    for ax in axes[len(recs):]:
        ax.set_axis_off()
    fig.colorbar(im, ax=axes[:len(recs)], shrink=0.8, label="accuracy")
    fig.suptitle(f"{task} accuracy · {table.title}", fontsize=9)
    path = out / f"{table.suite}-{i}-{task}.png"
    fig.savefig(path, dpi=100)
    return (f"{task} heatmaps", path, f"{task}: accuracy (%) by context length and needle depth, one panel "
            "per method; the red line separates cells whose needle lies inside the method's "
            "exact-attention window from those outside it.")
