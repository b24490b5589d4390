"""The Triton kernels compile for the H100/H200 (sm_90a) without a GPU.

One run of `python -m linbench.kernels.compile --quick` in a fresh process (the kernels
must be imported for the GPU, not for the interpreter this test session uses): every
launch the kernels' own launchers make (every op, variant, dtype fp32/fp16/bf16, head dim
64 and 128, with and without states, forward and backward) through triton's frontend, and
the first launch of each kernel through LLVM and ptxas to a cubin, with its registers,
spills and shared memory checked against the limits (linbench.kernels.compile.failures).
The full table, every launch through ptxas (minutes), is `python -m
linbench.kernels.compile`; LINBENCH_COMPILE_FULL=1 makes this test run it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", str(out.parent / "triton"))  # a cold compile
    # bf16 and D 64 first: the launches compiled through ptxas are the first of each kernel
    quick = [] if os.environ.get("LINBENCH_COMPILE_FULL") == "1" else ["--quick"]
    proc = subprocess.run([sys.executable, "-m", "linbench.kernels.compile", *quick,
                           "--dtypes", "bf16,fp16,fp32", "--dims", "64,128",
                           "--json", str(out)], env=env, capture_output=True, text=True,
                          timeout=3600)
    print(proc.stdout)  # the table: regs, spills, shared memory per launch (pytest -s)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_every_kernel_compiles_for_sm90a(report):
    proc, rep = report
    assert rep["failures"] == [] and proc.returncode == 0, "\n".join(rep["failures"]) \
        or proc.stderr[-3000:]
    rows = rep["rows"]
    assert all(r["status"] == "ok" for r in rows)
    cubins = [r for r in rows if r["stage"] in ("cubin", "ptx")]
    # every kernel of the package reached a real backend compile, none left out
    assert sorted({r["kernel"] for r in cubins}) == rep["kernels"] and rep["kernels"]
    if rep["stage"] == "cubin":  # ptxas ran: resources were read from the cubins
        for r in cubins:
            assert 0 < r["regs"] <= 255 and r["spills"] >= 0 and r["shared"] >= 0, r


def test_launches_cover_every_dtype_and_head_dim(report):
    _, rep = report
    rows = rep["rows"]
    for dtype in ("fp32", "fp16", "bf16"):  # the delta rule sweep is fp32 whatever the input
        assert any(r["dtype"].startswith(dtype) for r in rows), dtype
    assert {f"D{d}" for d in (64, 128)} <= {v.split()[2] for r in rows for v in r["via"]}


def test_ptxas_runs_here(report):
    """Without a runnable ptxas the run stops at PTX (no registers or spills): say why."""
    from linbench.kernels.compile import ptxas_problem
    problem = ptxas_problem()
    if problem is not None:
        assert report[1]["stage"] == "ptx"
        pytest.skip(f"ptxas/cuobjdump of the triton wheel do not run here ({problem}): "
                    "the kernels were compiled to PTX only")
    assert report[1]["stage"] == "cubin"


def test_failures_name_what_would_not_run_on_the_gpu():
    """The check can fail: a compile error, shared memory over sm_90's 227 KB per block,
    spills over the backstop; a spilling launch under it only reports."""
    from linbench.kernels.compile import MAX_SPILLS, failures
    row = dict(kernel="op._k", dtype="bf16", config="BK=64 w8 s2", status="ok", regs=128,
               spills=0, shared=1024)
    assert failures([row], 90) == []
    assert failures([dict(row, spills=MAX_SPILLS // 2)], 90) == []
    bad = [dict(row, status="error: CompilationError: x"), dict(row, shared=232449),
           dict(row, spills=MAX_SPILLS + 1)]
    out = failures(bad, 90)
    assert len(out) == 3 and "CompilationError" in out[0] and "232449" in out[1] \
        and f"{MAX_SPILLS + 1} spills" in out[2]
