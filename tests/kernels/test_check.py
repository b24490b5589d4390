"""`python -m linbench.kernels.check`, the GPU device check, on its CPU path (--dry-run: tiny
shapes in the Triton interpreter): correctness against the references, then the timing
table from linbench.speed's one timing loop and roofline model."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from linbench.kernels import check
from linbench.speed.roofline import FLOP_KINDS


def test_flop_kinds_are_the_roofline_models():
    assert set(check.FLOP_KIND) == set(check.KERNELS)
    assert {k for k in check.FLOP_KIND.values() if k} <= set(FLOP_KINDS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU path of the check")
def test_check_dry_run(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "check.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "linbench.kernels.check", "--dry-run",
                           "--kernels", "linear_attention,gated_linear_attention",
                           "--json", str(out)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "FAIL" not in proc.stdout
    report = json.loads(out.read_text())
    names = {r["kernel"] for r in report["correctness"]}
    assert names == {"linear_attention", "linear_attention[normalize]", "gated_linear_attention"}
    assert all(r["status"] == "PASS" for r in report["correctness"])
    rows = report["timing"]
    assert {r["op"] for r in rows} == {"sdpa", "triton:linear_attention",
                                       "triton:linear_attention[chunk32]",
                                       "triton:gated_linear_attention"}
    assert {r["mode"] for r in rows} == {"fwd", "fwdbwd"}
    for r in rows:
        assert r["status"] == "ok" and r["reps"] >= 1, r
        assert 0 < r["q20"] <= r["ms"] <= r["q80"], r  # quantiles of the reps, median between
        assert r["tflops"] > 0 and r["gbps"] > 0 and r["pct_peak"] is None, r  # no CPU peaks
