"""Leaderboard plots as PNG files, drawn on matplotlib's Agg canvas (no display, no pyplot
global state). One function per kind; each returns the plots it wrote (none without data).
Which metric a quality plot shows, its direction and chance level, and which details hold
heatmap grids come from the records' suite_meta; colours and order from method_role.
Readability rules: perplexities (and any value spanning 100x) on a log axis; no label
written over another (place_labels: coinciding points share one label, the others move
aside); who failed where in a speed sweep is said in the legend, not over the curves;
recovery losses spanning 20x on a log axis, one legend for the figure.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator
from matplotlib.transforms import Bbox

from linbench.report import meta as plugin_meta
from linbench.report import stats
from linbench.report.ablations import base_of
from linbench.report.cells import num, state_bytes_of
from linbench.units import fmt_bytes
from linbench.report.heatmaps import heatmap

SECTIONS = {
    "speed": "Throughput and memory vs sequence length",
    "quality": "Quality vs state size",
    "heatmaps": "Heatmaps",  # titled by the grids the suites declare (`sections`)
    "recovery": "Recovery curves",
}
NO_DATA = {
    "speed": "no speed records with a sequence length (run `linbench speed`)",
    "quality": "no ok quality record with both a state size > 0 and a metric value",
    "heatmaps": "no ok record with the (length x depth) cells its suite lists as heatmaps",
    "recovery": "no record with recovery curves (parent and baseline rows need no recovery)",
}
PATTERNS = ("speed-*.png", "quality-*.png", "recovery-*.png")  # and <suite>-*-<grid>.png
CHANCE_COLOR = "0.35"
FAILED_Y = 1.0  # failed (oom/timeout) speed points sit at the top of the axis
FAILED_COLOR = "crimson"


@dataclass
class Plot:
    section: str          # a key of SECTIONS
    title: str
    path: Path
    caption: str
    table: int | None = None  # index of the table it belongs to


def _heatmap_grids(records: list[dict]) -> dict[str, list[str]]:
    """{suite: its declared heatmap grids} over the records, in first-seen order."""
    out: dict[str, dict[str, None]] = {}
    for r in records:
        for task in plugin_meta.suite_meta(r).get("heatmaps") or []:
            out.setdefault(r.get("suite") or "?", {})[task] = None
    return {suite: list(tasks) for suite, tasks in out.items()}


def sections(records: list[dict]) -> dict[str, str]:
    """SECTIONS, the heatmap one titled by the grids the records' suites declare
    (e.g. "Passkey and needle heatmaps")."""
    grids = list(dict.fromkeys(t for ts in _heatmap_grids(records).values() for t in ts))
    if not grids:
        return dict(SECTIONS)
    return {**SECTIONS, "heatmaps": f"{' and '.join(grids)} heatmaps".capitalize()}


def method_colors(records: list[dict]) -> dict[str, str]:
    """One colour per method across every plot: the parent black, baselines grey, then the
    other methods by name in tab10 without its grey (C7, which read as a baseline)."""
    rank: dict[str, int] = {}
    for r in records:
        name = r.get("method") or "?"
        rank[name] = min(rank.get(name, 99), plugin_meta.role_rank(r.get("method_role")))
    colors, others, greys = {}, [], iter(("0.5", "0.65", "0.35", "0.8"))
    for n in sorted(rank, key=lambda n: (rank[n], n)):
        if rank[n] == 0:
            colors[n] = "black"
        elif rank[n] == 1:
            colors[n] = next(greys, "0.5")
        else:
            others.append(n)
    palette = [f"C{i}" for i in range(10) if i != 7]
    return {**colors, **{n: palette[i % len(palette)] for i, n in enumerate(others)}}


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path


def _tokens_per_s(rec: dict):
    return ((rec.get("metrics") or {}).get("tokens_per_s") or {}).get("value")


def fmt_length(n: int) -> str:
    """A sequence length for a label: 2048 -> 2k, 131072 -> 128k, 1048576 -> 1M."""
    if n >= 2 ** 20 and n % 2 ** 18 == 0:
        return f"{n / 2 ** 20:g}M"
    return f"{n / 1024:g}k" if n >= 1024 and n % 512 == 0 else str(n)


def _lengths_text(failed: list[int], lengths: list[int]) -> str:
    """T=... of a failure: "T=128k", "T >= 128k" (every length from there on), or a list."""
    failed = sorted(set(failed))
    if len(failed) == 1:
        return f"T={fmt_length(failed[0])}"
    if failed == lengths[lengths.index(failed[0]):]:
        return f"T \u2265 {fmt_length(failed[0])}"
    return "T=" + ", ".join(fmt_length(t) for t in failed)


def _series(r: dict, name: str) -> tuple:
    """(row name, mode label) of a speed row: "fwd", or "fwd x4" for 4 processes; the row
    name is the table's (a method, or `method[field=value]` for rows of an older config)."""
    nproc = r["details"].get("nproc") or 1
    mode = r["details"].get("mode")
    return name, (f"{mode} x{nproc}" if nproc > 1 else mode)


def speed_figure(table, colors: dict) -> Figure | None:
    """tokens/s and peak memory vs T, log-log, one line per (method, mode, processes:
    `linbench speed --nproc`, "fwd x4"); a length where
    a run failed (oom / timeout) is an x at the top of both axes, and who failed where is
    listed in the legend ("softmax fwd: timeout, T >= 128k"), not written over the plot."""
    styles = {"fwd": "-", "prefill": "-", "fwdbwd": "--", "decode": ":"}
    series: dict[tuple, list[dict]] = {}
    method_of: dict[str, str] = {}  # row name -> method (a name differs for an older config)
    for r, row in zip(table.records, table.rows):
        if (r.get("details") or {}).get("seqlen"):
            series.setdefault(_series(r, row[0].text), []).append(r)
            method_of[row[0].text] = r.get("method")
    if not series:
        return None
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    axes = fig.subplots(1, 2)
    failed: dict[tuple, list[int]] = {}  # (method, mode, status) -> lengths
    for (method, mode), recs in series.items():
        recs = sorted(recs, key=lambda r: r["details"]["seqlen"])
        for ax, get in ((axes[0], _tokens_per_s), (axes[1], lambda r: r["details"].get("peak_mem_bytes"))):
            pts = [(r["details"]["seqlen"], get(r)) for r in recs if r.get("status") == "ok"]
            pts = [(t, y) for t, y in pts if y is not None and y > 0]
            if pts:
                older = method != method_of[method]  # an older config: square markers
                ax.plot(*zip(*pts), marker="s" if older else "o", ms=4,
                        ls=styles.get(str(mode).split(" x")[0], "-."),
                        color=colors.get(method_of[method]), label=f"{method} {mode}")
        for r in recs:
            if r.get("status") != "ok":
                failed.setdefault((method, mode, r.get("status")), []).append(
                    r["details"]["seqlen"])
    lengths = sorted({r["details"]["seqlen"] for recs in series.values() for r in recs})
    at = sorted({t for ts in failed.values() for t in ts})
    for ax, ylabel in ((axes[0], "tokens / s"), (axes[1], "peak memory (bytes)")):
        ax.set_xscale("log", base=2)
        if ax.lines:
            ax.set_yscale("log")
        if at:  # one x per failed length, at the top of the axis (x in data, y in axes)
            ax.plot(at, [FAILED_Y] * len(at), marker="x", ms=11, mew=2.5, color=FAILED_COLOR,
                    transform=ax.get_xaxis_transform(), clip_on=False, ls="none")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: fmt_length(int(round(x)))))
        ax.set_xlabel("sequence length T (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    _bytes_axis(axes[1].yaxis)
    handles, labels = axes[0].get_legend_handles_labels()
    if failed:
        handles.append(Line2D([], [], marker="x", ls="none", color=FAILED_COLOR, mew=2.5))
        labels.append("failed (x at top):")
        for (method, mode, status), ts in failed.items():
            handles.append(Line2D([], [], marker="x", ls="none", ms=5, mew=1.5,
                                  color=colors.get(method_of[method])))
            labels.append(f"{method} {mode}: {status}, {_lengths_text(ts, lengths)}")
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, handlelength=3.5)
    fig.suptitle(table.title, fontsize=9, x=0.01, ha="left")  # clear of the legend at the right
    return fig


def speed_plot(i: int, table, colors: dict, out: Path) -> list[Plot]:
    fig = speed_figure(table, colors)
    if fig is None:
        return []
    path = _save(fig, out / f"speed-{i}.png")
    return [Plot("speed", table.title, path, "Throughput (left) and peak memory (right) vs "
                 "sequence length, log-log; x at the top of an axis: a run failed "
                 "(oom / timeout) at that length; the legend says which.", i)]


def _canvas(fig: Figure):
    """An Agg canvas for the figure (text extents need a renderer; still no pyplot)."""
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.draw_without_rendering()  # the final layout, so display coordinates hold
    return fig.canvas.get_renderer()


# label offsets (points) tried in turn: beside the point, then above / below, then further
# out with a leader line
OFFSETS = [(6, 3), (6, -3), (-6, 3), (-6, -3), (0, 9), (0, -9)]
OFFSETS += [(dx * k, dy * k) for k in (2.5, 4, 6, 9) for dx, dy in
            ((8, 6), (8, -6), (-8, 6), (-8, -6), (0, 10), (0, -10))]


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def place_labels(fig: Figure, ax, points: list[tuple[float, float, str]], fontsize: float = 8,
                 avoid: list | None = None) -> list:
    """Label each point (x, y, text in data coordinates) without overlaps: points within a
    few pixels of each other share one label, a name per line (so a crowd of variants
    cannot widen it past the figure); each label takes the first offset
    of OFFSETS where it stays inside the axes and clear of the other labels, the markers and
    the `avoid` artists (else the least-overlapping one, with a leader line). Returns the
    annotations."""
    renderer = _canvas(fig)
    to_px = ax.transData.transform
    clusters: list[dict] = []
    for x, y, text in points:
        px = to_px((x, y))
        for c in clusters:
            if abs(c["px"][0] - px[0]) < 6 and abs(c["px"][1] - px[1]) < 6:
                c["texts"].append(text)
                break
        else:
            clusters.append({"x": x, "y": y, "px": px, "texts": [text]})
    box = ax.get_window_extent(renderer)
    marks = [Bbox.from_extents(c["px"][0] - 5, c["px"][1] - 5, c["px"][0] + 5, c["px"][1] + 5)
             for c in clusters]
    taken = [a.get_window_extent(renderer) for a in avoid or []]
    out = []
    # the biggest shared labels first (they have the fewest places to go), then top down
    for i, c in enumerate(sorted(clusters, key=lambda c: (-len(c["texts"]), -c["px"][1],
                                                          c["px"][0]))):
        names = list(dict.fromkeys(c["texts"]))
        text = "\n".join(names)  # one per line: a crowd of variants stays narrow
        own = clusters.index(c)
        best = None
        for k, (dx, dy) in enumerate(OFFSETS):
            ann = ax.annotate(text, (c["x"], c["y"]), xytext=(dx, dy), textcoords="offset points",
                              fontsize=fontsize, ha="left" if dx > 0 else "right" if dx < 0
                              else "center", va="bottom" if dy > 0 else "top",
                              arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6}
                              if k >= 6 else None)
            bb = ann.get_window_extent(renderer)
            outside = 0.0 if (bb.x0 >= box.x0 and bb.x1 <= box.x1 and bb.y0 >= box.y0
                              and bb.y1 <= box.y1) else bb.width * bb.height
            cost = outside + sum(_overlap(bb, t) for t in taken) + sum(
                _overlap(bb, m) for j, m in enumerate(marks) if j != own)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, bb)
            else:
                ann.remove()
            if cost == 0:
                break
        taken.append(best[2])
        out.append(best[1])
    return out


def _bytes_axis(axis) -> None:
    """A log axis of byte counts with ticks at powers of two (4 MiB, 8 MiB, ...)."""
    axis.set_major_locator(LogLocator(base=2, numticks=9))
    axis.set_major_formatter(FuncFormatter(lambda x, _: fmt_bytes(x)))
    axis.set_minor_locator(NullLocator())


def log_scale(spec: dict, values: list[float]) -> bool:
    """A perplexity, or any positive value spanning two orders of magnitude, on a log axis."""
    return spec.get("kind") == "perplexity" or (
        bool(values) and min(values) > 0 and max(values) / min(values) >= 100)


def quality_figure(table, colors: dict) -> tuple[Figure, str, list[str]] | None:
    """(figure, metric, methods without a state size) of the suite's primary metric vs
    state bytes (log x; log y for perplexities and values spanning 100x), one point per ok
    record with its ±stderr bar; a hollow point is not significantly different from the
    parent (stats.compare); the metric's chance level, where the suite declares one, is a
    dotted line. Points that coincide share one label; labels do not overlap. None without
    a point to draw."""
    name = plugin_meta.primary(table.meta, table.metric_names)
    if name is None:
        return None
    spec = plugin_meta.spec(table.meta, name)
    stderr = getattr(table, "stderr", None)
    comparisons = getattr(table, "comparisons", None) or {}
    pts, missing = [], []
    for pos, (rec, value) in enumerate(zip(table.records, table.values[name])):
        value = num(value)
        sb = state_bytes_of(rec)[0]
        if rec.get("status") != "ok" or value is None:
            continue
        err = num(stderr[name].iloc[pos]) if stderr is not None and name in stderr else None
        c = comparisons.get((pos, name))
        same = c is not None and c.significant is False
        (pts if sb and sb > 0 else missing).append((sb, value, rec.get("method"), err, same))
    if not pts:
        return None
    pct = spec["kind"] == "accuracy" and all(0 <= v <= 1 for _, v, *_ in pts)
    scale = 100 if pct else 1
    logy = log_scale(spec, [v for _, v, *_ in pts])
    big = len(pts) > 12  # room for the labels of a crowd of variants
    fig = Figure(figsize=(9.6, 6.4) if big else (7.2, 4.8), layout="constrained")
    ax = fig.subplots()
    for sb, v, m, err, same in pts:
        color = colors.get(m)
        if err:
            ax.errorbar([sb], [scale * v], yerr=[scale * err], color=color, lw=1, capsize=3,
                        alpha=0.6, zorder=2, ls="none")
        ax.scatter([sb], [scale * v], s=45, zorder=3, edgecolors=color,
                   facecolors="white" if same else color, linewidths=1.6)
    ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    xs = [p[0] for p in pts]
    lo, hi = min(xs), max(xs)
    ax.set_xlim(lo / (2 if hi / lo < 4 else 1.5), hi * (2 if hi / lo < 4 else 1.5))
    ax.margins(y=0.12)
    _bytes_axis(ax.xaxis)
    ax.set_xlabel("recurrent state / KV cache per sequence (bytes, log)")
    avoid = []
    if spec["chance"] is not None:
        y = scale * spec["chance"]
        ax.axhline(y, color=CHANCE_COLOR, ls=":", lw=1.2, zorder=1)
        avoid.append(ax.annotate(f"chance ({y:.3g}{'%' if pct else ''})", (0, y),
                                 xycoords=("axes fraction", "data"), xytext=(4, 3),
                                 textcoords="offset points", ha="left", fontsize=7.5,
                                 color=CHANCE_COLOR))
    label = f"{name} ({'%' if pct else 'value'}{', log' if logy else ''})"
    ax.set_ylabel(label + (", lower is better" if plugin_meta.lower_is_better(spec) else ""))
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title(table.title, fontsize=8)
    if getattr(table, "at_chance", None):
        avoid.append(ax.text(0.99, 0.98, stats.AT_CHANCE_NOTE.replace(": ", ":\n", 1),
                             transform=ax.transAxes, ha="right", va="top", fontsize=8,
                             color="#8a4b00", bbox={"fc": "#fff8e0", "ec": "#e0b000"}))
    place_labels(fig, ax, [(sb, scale * v, m) for sb, v, m, *_ in pts], avoid=avoid)
    return fig, name, sorted({m for _, _, m, *_ in missing})


def quality_plot(i: int, table, colors: dict, out: Path) -> list[Plot]:
    drawn = quality_figure(table, colors)
    if drawn is None:
        return []
    fig, name, missing = drawn
    caption = (f"{name} vs state size per method (bars: ±1 stderr; hollow: not significantly "
               "different from the parent on the same items).")
    if fig.axes[0].get_yscale() == "log":
        caption += " Log y axis."
    if getattr(table, "at_chance", None):
        caption += f" {stats.AT_CHANCE_NOTE[0].upper()}{stats.AT_CHANCE_NOTE[1:]}."
    if missing:
        caption += " Not plotted (no state size): " + ", ".join(missing) + "."
    path = _save(fig, out / f"quality-{i}-{table.suite}.png")
    return [Plot("quality", f"{table.suite}: {name} vs state size", path, caption, i)]


def _recovery_groups(records: list[dict]) -> dict[tuple, dict[str, list]]:
    """{(model, hash, dtype, family): {method: stages}}: family None holds every default
    configuration; a method with --set variants (`lolcats[adapter=pissa]`) also gets a
    family of its own, its default first, so a sweep does not bury the leaderboard's curves."""
    runs: dict[tuple, dict[str, list]] = {}
    for r in sorted(records, key=plugin_meta.row_rank):
        stages = [s for s in r.get("recovery") or [] if s.get("curve") or s.get("val_curve")]
        if not stages:
            continue
        model = r.get("model") or {}
        group = (model.get("name"), (model.get("file_hash") or "")[:12], r.get("dtype"))
        base = base_of(r.get("method") or "")
        runs.setdefault((*group, base[0] if base else None), {}).setdefault(r.get("method"), stages)
    for (*group, family), by_method in list(runs.items()):
        default = runs.get((*group, None), {}).get(family)
        if family is not None and default is not None:
            runs[(*group, family)] = {family: default, **by_method}
    return runs


def recovery_plots(records: list[dict], colors: dict, out: Path) -> list[Plot]:
    """Train (solid) and validation (dashed) loss vs tokens, one panel per stage, per model
    (and one figure per method with variants, coloured within it)."""
    plots = []
    for j, ((model, mhash, dtype, family), by_method) in enumerate(_recovery_groups(records).items()):
        if family is not None:  # tab10 repeats after ten variants; tab20 after twenty
            many = colormaps["tab20"] if len(by_method) > 10 else None
            colors = {m: many(i % 20) if many else f"C{i}" for i, m in enumerate(by_method)}
        stage_names = list(dict.fromkeys(s.get("stage") for st in by_method.values() for s in st))
        fig = Figure(figsize=(5.2 * len(stage_names) + 1.8, 4.4), layout="constrained")
        axes = fig.subplots(1, len(stage_names), squeeze=False)[0]
        for ax, stage in zip(axes, stage_names):
            ys = []
            for method, stages in by_method.items():
                for s in (s for s in stages if s.get("stage") == stage):
                    c = colors.get(method)
                    if s.get("curve"):
                        ax.plot(*zip(*s["curve"]), color=c, lw=1.2)
                        ys += [y for _, y in s["curve"]]
                    if s.get("val_curve"):
                        ax.plot(*zip(*s["val_curve"]), color=c, ls="--", marker="o", ms=3)
                        ys += [y for _, y in s["val_curve"]]
            ys = [y for y in ys if y is not None]
            wide = bool(ys) and min(ys) > 0 and max(ys) / min(ys) >= 20
            if wide:  # losses from ~1 to ~1000: a linear axis flattens the good ones
                ax.set_yscale("log")
            ax.set_title(f"stage: {stage}", fontsize=9)
            ax.set_xlabel("tokens seen")
            ax.set_ylabel("loss" + (" (log)" if wide else ""))
            ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1e6:g}M" if x >= 1e6
                                         else f"{x / 1e3:g}k" if x >= 1e3 else f"{x:g}")
            ax.grid(True, which="both", alpha=0.3)
        handles = [Line2D([], [], color=colors.get(m), lw=2) for m in by_method]
        labels = list(by_method)
        handles += [Line2D([], [], color="0.3", lw=1.2),
                    Line2D([], [], color="0.3", ls="--", marker="o", ms=3)]
        labels += ["train loss", "held-out loss"]
        fig.legend(handles, labels, loc="outside right upper", fontsize=8)
        who = f" · {family} and its variants" if family is not None else ""
        title = f"recovery{who} · model {model} ({mhash}) · {dtype}"
        fig.suptitle(title, fontsize=9, x=0.01, ha="left")
        path = _save(fig, out / f"recovery-{j}.png")
        plots.append(Plot("recovery", title, path, "Training loss (solid) and held-out loss "
                          "(dashed) vs tokens seen in each recovery stage.", None))
    return plots


def make_plots(tables: list, records: list[dict], out: Path) -> tuple[list[Plot], dict[str, str]]:
    """Write every plot with data into `out`; return them and the reason for each skipped kind."""
    out.mkdir(parents=True, exist_ok=True)
    grids = _heatmap_grids(records)
    for pattern in (*PATTERNS, *(f"{suite}-*-*.png" for suite in grids)):  # stale plots
        for old in out.glob(pattern):
            old.unlink()
    colors = method_colors(records)
    plots: list[Plot] = []
    for i, table in enumerate(tables):
        if table.kind == "speed":
            plots += speed_plot(i, table, colors, out)
            continue
        plots += quality_plot(i, table, colors, out)
        for task in table.meta.get("heatmaps") or []:
            p = heatmap(i, table, task, out)
            if p:
                plots.append(Plot("heatmaps", *p, i))
    plots += recovery_plots(records, colors, out)
    skipped = {s: why for s, why in NO_DATA.items() if not any(p.section == s for p in plots)}
    return plots, skipped

