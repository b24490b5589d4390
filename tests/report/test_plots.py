"""Leaderboard plots: which files are written, that they are real images, and what they mark."""
from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread

from linbench.report import leaderboard
from linbench.report.plots import make_plots, method_colors, quality_figure, speed_figure
from linbench.report.heatmaps import boundary_segments, fmt_length
from linbench.report.build import build_tables
from tests.report.records import metric, record, speed, synthetic_records

EXPECTED = {"quality-0-mmlu5.png", "quality-1-mmlu5.png", "quality-2-commonsense.png",
            "quality-3-ppl.png", "quality-4-recall.png", "recall-4-passkey.png",
            "recall-4-needle.png", "speed-5.png", "recovery-0.png"}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("plots")
    (out / "speed-9.png").write_bytes(b"stale")     # from an earlier report: removed
    (out / "notes.png").write_bytes(b"the user's")  # not ours: kept
    recs = synthetic_records()
    plots, skipped = make_plots(build_tables(recs), recs, out)
    return out, plots, skipped


def test_every_kind_is_written_as_a_nonblank_png(written):
    out, plots, skipped = written
    assert {p.path.name for p in plots} == EXPECTED and skipped == {}
    assert sorted(f.name for f in out.glob("*.png")) == sorted(EXPECTED | {"notes.png"})
    for p in plots:
        assert p.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = imread(p.path)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 500, p.path.name
        assert pixels[..., :3].std() > 0.05, f"{p.path.name} is blank"
    assert {p.section for p in plots} == {"speed", "quality", "heatmaps", "recovery"}


def test_no_data_means_no_plot_and_a_reason(tmp_path):
    recs = [record("softmax", "mmlu5", {"acc": {"value": 0.3, "stderr": 0.01, "n": 10}})]
    recs[0]["state_bytes"] = {"seqlen": 2048, "bytes": 0}  # 0 cannot sit on a log axis
    plots, skipped = make_plots(build_tables(recs), recs, tmp_path)
    assert plots == [] and set(skipped) == {"speed", "quality", "heatmaps", "recovery"}
    assert list(tmp_path.iterdir()) == []
    board = leaderboard.write(recs, tmp_path)
    md = board.markdown.read_text()
    assert "_No plot: no speed records" in md and "![" not in md
    assert "No plot: no ok record with the (length x depth) cells" in board.html.read_text()


def test_speed_failures_are_x_marks_at_the_top_and_the_legend_says_who_failed():
    recs = [speed("softmax", "fwd", t, "oom" if t == 8192 else "ok") for t in (2048, 4096, 8192)]
    recs += [speed("gla", "fwdbwd", t, "timeout" if t == 8192 else "ok") for t in (2048, 4096, 8192)]
    (table,) = build_tables(recs)
    fig = speed_figure(table, method_colors(recs))
    thr, mem = fig.axes[:2]
    assert thr.get_xscale() == "log" and thr.get_yscale() == "log" and mem.get_yscale() == "log"
    for ax in (thr, mem):
        assert list(ax.texts) == []  # nothing written over the curves
        marks = [ln for ln in ax.lines if ln.get_marker() == "x"]
        assert len(marks) == 1  # both failed at T=8192: one mark
        (x,), (y,) = marks[0].get_data()
        assert x == 8192 and y == 1.0 and marks[0].get_transform() == ax.get_xaxis_transform()
        ok_lines = [ln for ln in ax.lines if ln.get_marker() == "o"]
        assert sorted(ln.get_label() for ln in ok_lines) == ["gla fwdbwd", "softmax fwd"]
        assert all(list(ln.get_xdata()) == [2048, 4096] for ln in ok_lines)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["softmax fwd", "gla fwdbwd", "failed (x at top):",
                      "softmax fwd: oom, T=8k", "gla fwdbwd: timeout, T=8k"]


def test_speed_failures_over_a_range_of_lengths_are_one_legend_entry():
    lengths = (2048, 4096, 8192, 16384, 2 ** 20)
    recs = [speed("softmax", "fwd", t, "ok" if t < 8192 else "timeout") for t in lengths]
    recs += [speed("gla", "fwd", t, "oom" if t == 2 ** 20 else "ok") for t in lengths]
    (table,) = build_tables(recs)
    fig = speed_figure(table, method_colors(recs))
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[-2:] == ["softmax fwd: timeout, T \u2265 8k", "gla fwd: oom, T=1M"]
    marks = [ln for ln in fig.axes[0].lines if ln.get_marker() == "x"]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [8192, 16384, 2 ** 20]
    assert list(fig.axes[0].texts) == []


def _ppl_table(values: dict[str, float]):
    recs = [record(m, "ppl", {"ppl_wiki": metric(v, None, 4096)}) for m, v in values.items()]
    (table,) = build_tables(recs)
    return table, recs


def test_perplexity_is_drawn_on_a_log_axis_and_accuracy_on_a_linear_one():
    table, recs = _ppl_table({"softmax": 14.0, "swa": 57.0, "lolcats": 31.0,
                              "gla": 3.5e5, "hedgehog": 415.0})
    fig, name, _ = quality_figure(table, method_colors(recs))
    ax = fig.axes[0]
    assert name == "ppl_wiki" and ax.get_yscale() == "log" and ax.get_xscale() == "log"
    assert "log" in ax.get_ylabel()
    # a perplexity is on a log axis even when its values are close together
    table, recs = _ppl_table({"softmax": 14.0, "swa": 15.0})
    assert quality_figure(table, method_colors(recs))[0].axes[0].get_yscale() == "log"
    mmlu = [record(m, "mmlu5", {"acc": metric(v)}) for m, v in
            (("softmax", 0.5), ("lolcats", 0.4), ("gla", 0.3))]
    (table,) = build_tables(mmlu)
    assert quality_figure(table, method_colors(mmlu))[0].axes[0].get_yscale() == "linear"


def _label_boxes(fig, ax):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    return {t.get_text(): t.get_window_extent(renderer) for t in ax.texts}


def test_quality_labels_do_not_overlap_and_coinciding_points_share_one():
    values = {"softmax": 0.50, "swa": 0.30, "deltanet": 0.21, "gla": 0.21, "hedgehog": 0.228,
              "lightning": 0.193, "lolcats": 0.298, "liger": 0.368}
    recs = [record(m, "mmlu5", {"acc": metric(v, 0.05)}) for m, v in values.items()]
    for r in recs:  # the four linear-attention states of about one size, as in the real runs
        if r["method"] in ("deltanet", "gla", "lightning"):
            r["state_bytes"] = {"seqlen": 2048, "bytes": 4_423_680}
        elif r["method"] == "hedgehog":
            r["state_bytes"] = {"seqlen": 2048, "bytes": 4_492_800}
    (table,) = build_tables(recs)
    fig, _, _ = quality_figure(table, method_colors(recs))
    ax = fig.axes[0]
    boxes = _label_boxes(fig, ax)
    methods = {m for text in boxes for m in text.split("\n")}
    assert set(values) <= methods
    assert "deltanet\ngla" in boxes or "gla\ndeltanet" in boxes  # the same point, one label
    names = [t for t in boxes if not t.startswith("chance")]
    area = ax.get_window_extent()
    for i, a in enumerate(names):
        b = boxes[a]
        assert area.x0 <= b.x0 and b.x1 <= area.x1 and area.y0 <= b.y0 and b.y1 <= area.y1, a
        for c in names[i + 1:]:
            assert not boxes[a].overlaps(boxes[c]), (a, c)


def test_a_crowd_of_variants_at_one_point_keeps_its_labels_in_the_figure():
    """Six variants of one state size and about one score (an adapter sweep) share a label,
    a name per line: joined on one line it was wider than the figure, and the layout
    collapsed the axes (matplotlib's "axes sizes collapsed to zero")."""
    import warnings
    values = {"softmax": 0.50, "swa": 0.30, "gla": 0.21, "liger": 0.368, "lolcats": 0.298}
    variants = [f"lolcats[adapter={a}]" for a in ("pissa", "eva", "corda", "bone", "dora")]
    variants += ["lolcats[keep_softmax_layers=auto:2]", "lolcats[softmax_every=15]",
                 "lolcats[lora_targets=v_proj,o_proj]"]
    recs = [record(m, "mmlu5", {"acc": metric(v, 0.05)}) for m, v in values.items()]
    recs += [record(m, "mmlu5", {"acc": metric(0.298, 0.05)}) for m in variants]
    for r in recs:  # lolcats and its variants: one state size
        if r["method"].startswith("lolcats"):
            r["state_bytes"] = {"seqlen": 2048, "bytes": 17_700_000}
    (table,) = build_tables(recs)
    fig, _, _ = quality_figure(table, method_colors(recs))
    ax = fig.axes[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a collapsed layout warns
        boxes = _label_boxes(fig, ax)
    shared = [t for t in boxes if "lolcats[adapter=pissa]" in t]
    assert len(shared) == 1 and set(variants) <= set(shared[0].split("\n")), list(boxes)
    area = fig.bbox
    for text, b in boxes.items():
        assert area.x0 <= b.x0 and b.x1 <= area.x1 and area.y0 <= b.y0 and b.y1 <= area.y1, text


def test_window_boundary_follows_in_window_flips():
    inside = np.array([[False, True, True],    # length 0: the needle at depth >= 1 is inside
                       [False, False, True],
                       [None, False, False]], dtype=object)
    segs = boundary_segments(inside)
    assert sorted(segs) == sorted([
        ((0.5, 0.5), (-0.5, 0.5)),   # row 0, between depth 0 and 1
        ((0.5, 1.5), (0.5, 0.5)),    # column 1, between rows 0 and 1
        ((1.5, 1.5), (0.5, 1.5)),    # row 1, between depth 1 and 2
        ((1.5, 2.5), (1.5, 1.5)),    # column 2, between rows 1 and 2
    ])
    assert boundary_segments(np.array([[True, True]], dtype=object)) == []
    assert [fmt_length(n) for n in (100, 1024, 1536, 32768)] == ["100", "1k", "1.5k", "32k"]


def test_speed_rows_of_several_processes_are_their_own_line():
    """`linbench speed --nproc 4` rows (LASP-2) beside the one-process rows of the same
    method and mode: two lines, the second labelled with its process count."""
    recs = [speed("gla", "fwd", t) for t in (2048, 4096)]
    four = [speed("gla", "fwd", t) for t in (2048, 4096, 8192)]
    for r in four:
        r["details"]["nproc"] = 4
    (table,) = build_tables(recs + four)
    fig = speed_figure(table, method_colors(recs))
    lines = {ln.get_label(): list(ln.get_xdata()) for ln in fig.axes[0].lines
             if ln.get_marker() == "o"}
    assert lines == {"gla fwd": [2048, 4096], "gla fwd x4": [2048, 4096, 8192]}


def test_frame_columns_carry_process_count_and_prefill_chunk():
    from linbench.report.frame import frame_of
    one, four = speed("gla", "fwd", 2048), speed("gla", "prefill", 2048)
    four["details"].update(nproc=4, level="model", prefill_chunk=512)
    df = frame_of([one, four]).drop_duplicates("record").set_index("record")
    assert str(df["nproc"].dtype) == "Int64" and str(df["prefill_chunk"].dtype) == "Int64"
    assert df.loc[0, "nproc"] == 1 and df.loc[1, "nproc"] == 4
    assert df["prefill_chunk"].isna()[0] and df.loc[1, "prefill_chunk"] == 512


def test_a_method_with_variants_gets_its_own_recovery_figure(tmp_path):
    """The defaults share one figure; lolcats and its --set variants get another, so an
    adapter sweep does not bury the leaderboard's curves (and its colours do not repeat)."""
    from linbench.report.plots import _recovery_groups
    recs = [record(m, "ppl", {"ppl_wiki": {"value": 20.0, "stderr": 1.0, "n": 10}})
            for m in ("softmax", "lolcats", "gla", "lolcats[adapter=pissa]", "lolcats[adapter=eva]")]
    groups = _recovery_groups(recs)
    assert [list(v) for v in groups.values()] == [
        ["gla", "lolcats"], ["lolcats", "lolcats[adapter=eva]", "lolcats[adapter=pissa]"]]
    plots, _ = make_plots(build_tables(recs), recs, tmp_path)
    rec = [p for p in plots if p.section == "recovery"]
    assert [p.path.name for p in rec] == ["recovery-0.png", "recovery-1.png"]
    assert "lolcats and its variants" in rec[1].title and "variants" not in rec[0].title


def test_no_linearized_method_is_drawn_in_a_baseline_grey():
    recs = [{"method": "softmax", "method_role": "parent"}, {"method": "swa", "method_role": "baseline"}]
    recs += [{"method": f"m{i}", "method_role": "linearized"} for i in range(9)]
    colors = method_colors(recs)
    linearized = [colors[f"m{i}"] for i in range(9)]
    assert "C7" not in linearized and len(set(linearized)) == 9  # tab10's grey skipped, 9 distinct
    assert colors["softmax"] == "black" and colors["swa"] == "0.5"
