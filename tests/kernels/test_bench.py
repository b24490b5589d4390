"""The kernel benchmark's plumbing (its timings are not asserted: benchmarks, not tests)."""
from __future__ import annotations

import json

import pytest

from linbench.kernels.bench import main, parse_seqlens


@pytest.mark.parametrize("text, expected", [
    ("2k", [2048]),
    ("2k,8k,1M", [2048, 8192, 1 << 20]),
    ("2k..16k", [2048, 4096, 8192, 16384]),
    ("2k..2M", [1 << e for e in range(11, 22)]),
    ("512,512,1k", [512, 1024]),
])
def test_parse_seqlens(text, expected):
    assert parse_seqlens(text) == expected


@pytest.mark.parametrize("bad", ["", "2x", "3k..8k", "8k..2k", "2k..", "-1"])
def test_parse_seqlens_rejects(bad):
    with pytest.raises(ValueError):
        parse_seqlens(bad)


def test_every_shape_is_a_row_with_a_status(tmp_path):
    out = tmp_path / "bench.json"
    main(["--seqlen", "64,128", "--impls", "linear,delta,sdpa", "--heads", "2", "--dim", "16",
          "--mode", "fwd+bwd", "--target-seconds", "0.01", "--json", str(out)])
    rows = json.loads(out.read_text())["records"]
    assert [(r["impl"], r["T"]) for r in rows] == [
        ("linear", 64), ("delta", 64), ("sdpa", 64), ("linear", 128), ("delta", 128), ("sdpa", 128)]
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in rows)
    main(["--seqlen", "64,128", "--impls", "sdpa", "--cap-seconds", "0", "--json", str(out)])
    rows = json.loads(out.read_text())["records"]
    assert [r["status"] for r in rows] == ["timeout", "timeout"]


def test_malformed_seqlen_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--seqlen", "2k..3k"])
    assert exc.value.code == 2 and "2k..3k" in capsys.readouterr().err
