"""Leaderboard plots: which files are written, that they are real images, and what they mark."""
from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread

from linbench.report import leaderboard
from linbench.report.plots import make_plots, method_colors, speed_figure
from linbench.report.heatmaps import boundary_segments, fmt_length
from linbench.report.build import build_tables
from tests.report.records import record, speed, synthetic_records

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


def test_speed_failures_are_x_marks_at_the_top_labelled_with_who_failed():
    recs = [speed("softmax", "fwd", t, "oom" if t == 8192 else "ok") for t in (2048, 4096, 8192)]
    recs += [speed("gla", "fwdbwd", t, "timeout" if t == 8192 else "ok") for t in (2048, 4096, 8192)]
    (table,) = build_tables(recs)
    fig = speed_figure(table, method_colors(recs))
    thr, mem = fig.axes[:2]
    assert thr.get_xscale() == "log" and thr.get_yscale() == "log" and mem.get_yscale() == "log"
    for ax in (thr, mem):
        texts = sorted(t.get_text() for t in ax.texts)
        assert texts == ["gla fwdbwd: timeout", "softmax fwd: oom"]
        marks = [ln for ln in ax.lines if ln.get_marker() == "x"]
        assert len(marks) == 1  # both failed at T=8192: one mark, two labels
        (x,), (y,) = marks[0].get_data()
        assert x == 8192 and y == 1.0 and marks[0].get_transform() == ax.get_xaxis_transform()
        ok_lines = [ln for ln in ax.lines if ln.get_marker() == "o"]
        assert sorted(ln.get_label() for ln in ok_lines) == ["gla fwdbwd", "softmax fwd"]
        assert all(list(ln.get_xdata()) == [2048, 4096] for ln in ok_lines)


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
