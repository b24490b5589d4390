"""Leaderboard plots as PNG files, drawn on matplotlib's Agg canvas (no display, no pyplot
global state). One function per kind; each returns the plots it wrote (none without data).
Which metric a quality plot shows, its direction and chance level, and which details hold
heatmap grids come from the records' suite_meta; colours and order from method_role.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter

from linbench.report import meta as plugin_meta
from linbench.report.cells import fmt_bytes, num, state_bytes_of
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
    other methods by name in tab10."""
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
    return {**colors, **{n: f"C{i % 10}" for i, n in enumerate(others)}}


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path


def _tokens_per_s(rec: dict):
    return ((rec.get("metrics") or {}).get("tokens_per_s") or {}).get("value")


def speed_figure(table, colors: dict) -> Figure | None:
    """tokens/s and peak memory vs T, log-log, one line per (method, mode); a failed
    (oom / timeout) length is an x at the top of the axis, labelled with who failed."""
    styles = {"fwd": "-", "prefill": "-", "fwdbwd": "--", "decode": ":"}
    series: dict[tuple, list[dict]] = {}
    for r in table.records:
        if (r.get("details") or {}).get("seqlen"):
            series.setdefault((r.get("method"), r["details"].get("mode")), []).append(r)
    if not series:
        return None
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    axes = fig.subplots(1, 2)
    failed = []
    for (method, mode), recs in series.items():
        recs = sorted(recs, key=lambda r: r["details"]["seqlen"])
        for ax, get in ((axes[0], _tokens_per_s), (axes[1], lambda r: r["details"].get("peak_mem_bytes"))):
            pts = [(r["details"]["seqlen"], get(r)) for r in recs if r.get("status") == "ok"]
            pts = [(t, y) for t, y in pts if y is not None and y > 0]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=4, ls=styles.get(mode, "-."),
                        color=colors.get(method), label=f"{method} {mode}")
        failed += [r for r in recs if r.get("status") != "ok"]
    lengths = sorted({r["details"]["seqlen"] for recs in series.values() for r in recs})
    by_t: dict[int, list[dict]] = {}
    for r in failed:
        by_t.setdefault(r["details"]["seqlen"], []).append(r)
    for ax, ylabel in ((axes[0], "tokens / s"), (axes[1], "peak memory (bytes)")):
        ax.set_xscale("log", base=2)
        if ax.lines:
            ax.set_yscale("log")
        trans = ax.get_xaxis_transform()  # x in data, y in axes fraction
        for t, recs in by_t.items():
            ax.plot([t], [FAILED_Y], marker="x", ms=12, mew=3, color=FAILED_COLOR,
                    transform=trans, clip_on=False, ls="none")
            right = t != lengths[0]  # text left of the mark, except at the shortest length
            for k, r in enumerate(recs):
                ax.annotate(f"{r.get('method')} {r['details'].get('mode')}: {r.get('status')}",
                            (t, FAILED_Y), xycoords=trans, xytext=(-8 if right else 8, -10 - 10 * k),
                            textcoords="offset points", fontsize=7.5, ha="right" if right else "left",
                            va="top", color=colors.get(r.get("method")),
                            bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8})
        ax.set_xlabel("sequence length T (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if failed:
        handles.append(Line2D([], [], marker="x", ls="none", color=FAILED_COLOR, mew=2.5))
        labels.append("oom / timeout")
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    fig.suptitle(table.title, fontsize=9)
    return fig


def speed_plot(i: int, table, colors: dict, out: Path) -> list[Plot]:
    fig = speed_figure(table, colors)
    if fig is None:
        return []
    path = _save(fig, out / f"speed-{i}.png")
    return [Plot("speed", table.title, path, "Throughput (left) and peak memory (right) vs "
                 "sequence length, log-log; x at the top of an axis: the run failed "
                 "(oom / timeout) at that length.", i)]


def quality_figure(table, colors: dict) -> tuple[Figure, str, list[str]] | None:
    """(figure, metric, methods without a state size) of the suite's primary metric vs
    state bytes (log x), one point per ok record; the metric's chance level, where the
    suite declares one, is a dotted line. None without a point to draw."""
    name = plugin_meta.primary(table.meta, table.metric_names)
    if name is None:
        return None
    spec = plugin_meta.spec(table.meta, name)
    pts, missing = [], []
    for rec, value in zip(table.records, table.values[name]):
        value = num(value)
        sb = state_bytes_of(rec)[0]
        if rec.get("status") != "ok" or value is None:
            continue
        (pts if sb and sb > 0 else missing).append((sb, value, rec.get("method")))
    if not pts:
        return None
    pct = spec["kind"] == "accuracy" and all(0 <= v <= 1 for _, v, _ in pts)
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    for sb, v, m in pts:
        y = 100 * v if pct else v
        ax.scatter([sb], [y], color=colors.get(m), s=45, zorder=3)
        ax.annotate(m, (sb, y), xytext=(5, 4), textcoords="offset points", fontsize=8)
    ax.set_xscale("log")
    xs = [p[0] for p in pts]
    if max(xs) / min(xs) < 4:  # keep a readable span around a single state size
        ax.set_xlim(min(xs) / 2, max(xs) * 2)
    ax.xaxis.set_major_formatter(lambda x, _: fmt_bytes(x))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("recurrent state / KV cache per sequence (bytes, log)")
    if spec["chance"] is not None:
        y = 100 * spec["chance"] if pct else spec["chance"]
        ax.axhline(y, color=CHANCE_COLOR, ls=":", lw=1.2, zorder=1)
        ax.annotate(f"chance ({y:.3g}{'%' if pct else ''})", (0, y),
                    xycoords=("axes fraction", "data"), xytext=(4, 3),
                    textcoords="offset points", ha="left", fontsize=7.5, color=CHANCE_COLOR)
    label = f"{name} ({'%' if pct else 'value'})"
    ax.set_ylabel(label + (", lower is better" if plugin_meta.lower_is_better(spec) else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(table.title, fontsize=8)
    return fig, name, sorted({m for *_, m in missing})


def quality_plot(i: int, table, colors: dict, out: Path) -> list[Plot]:
    drawn = quality_figure(table, colors)
    if drawn is None:
        return []
    fig, name, missing = drawn
    caption = f"{name} vs state size per method."
    if missing:
        caption += " Not plotted (no state size): " + ", ".join(missing) + "."
    path = _save(fig, out / f"quality-{i}-{table.suite}.png")
    return [Plot("quality", f"{table.suite}: {name} vs state size", path, caption, i)]


def recovery_plots(records: list[dict], colors: dict, out: Path) -> list[Plot]:
    """Train (solid) and validation (dashed) loss vs tokens, one panel per stage, per model."""
    runs: dict[tuple, dict[str, list]] = {}
    for r in sorted(records, key=plugin_meta.row_rank):
        stages = [s for s in r.get("recovery") or [] if s.get("curve") or s.get("val_curve")]
        model = r.get("model") or {}
        group = (model.get("name"), (model.get("file_hash") or "")[:12], r.get("dtype"))
        if stages:
            runs.setdefault(group, {}).setdefault(r.get("method"), stages)
    plots = []
    for j, ((model, mhash, dtype), by_method) in enumerate(runs.items()):
        stage_names = list(dict.fromkeys(s.get("stage") for st in by_method.values() for s in st))
        fig = Figure(figsize=(5.5 * len(stage_names), 4.2), layout="constrained")
        axes = fig.subplots(1, len(stage_names), squeeze=False)[0]
        for ax, stage in zip(axes, stage_names):
            for method, stages in by_method.items():
                for s in (s for s in stages if s.get("stage") == stage):
                    c = colors.get(method)
                    if s.get("curve"):
                        ax.plot(*zip(*s["curve"]), color=c, lw=1.2, label=f"{method} train")
                    if s.get("val_curve"):
                        ax.plot(*zip(*s["val_curve"]), color=c, ls="--", marker="o", ms=3,
                                label=f"{method} val")
            ax.set_title(f"stage: {stage}", fontsize=9)
            ax.set_xlabel("tokens seen")
            ax.set_ylabel("loss")
            ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1e6:g}M" if x >= 1e6 else f"{x:g}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        title = f"recovery · model {model} ({mhash}) · {dtype}"
        fig.suptitle(title, fontsize=9)
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

