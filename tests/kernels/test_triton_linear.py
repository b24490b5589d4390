"""Triton chunked linear attention and GLA vs the quadratic torch references.

Output, final state and every gradient (q, k, v, decay / g, initial_state) are compared
with the reference run in float64 on the same input values; errors are max |a - b| over
max |b| per tensor. On CPU the kernels run in the Triton interpreter (tests/conftest.py),
so shapes are small; fp16 is tested, bf16 is not (broken in the interpreter).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from linbench.kernels.reference import (gated_linear_attention_ref,  # noqa: E402
                                       linear_attention_ref)
from linbench.kernels.triton.gla import BT as GLA_CHUNK  # noqa: E402
from linbench.kernels.triton.gla import gated_linear_attention  # noqa: E402
from linbench.kernels.triton.linear import BT as LINEAR_CHUNK  # noqa: E402
from linbench.kernels.triton.linear import linear_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 1e-2}


@dataclass
class Case:
    T: int
    K: int = 16
    V: int = 32
    H: int = 2
    B: int = 1
    kv_heads: int | None = None  # GQA: k, v have fewer heads, repeated before the call
    gate: str | None = None  # linear: per-head decay; GLA: per-channel gates
    initial_state: bool = False
    final_state: bool = False
    normalize: bool = False
    learn_decay: bool = False
    dtype: torch.dtype = torch.float32

    def __str__(self):
        s = f"B{self.B}-T{self.T}-H{self.H}-K{self.K}-V{self.V}"
        s += f"-gqa{self.kv_heads}" if self.kv_heads else ""
        s += f"-{self.gate}" if self.gate else ""
        s += "-s0" if self.initial_state else ""
        s += "-final" if self.final_state else ""
        s += "-norm" if self.normalize else ""
        s += "-learn" if self.learn_decay else ""
        return s + "-" + str(self.dtype).split(".")[-1]


def _gates(kind: str, shape, gen) -> torch.Tensor:
    """Log-gates: "mixed" logsigmoid of N(0, 4), "near0" -8 per step, "near1" -1e-4."""
    if kind == "mixed":
        return F.logsigmoid(2 * torch.randn(shape, generator=gen))
    return torch.full(shape, {"near0": -8.0, "near1": -1e-4}[kind])


def _inputs(c: Case, gated: bool):
    """Leaf tensors (name -> tensor) in c.dtype (states, decay in fp32)."""
    gen = torch.Generator().manual_seed(c.T * 7 + c.K)
    hk = c.kv_heads or c.H
    x = {"q": torch.randn(c.B, c.T, c.H, c.K, generator=gen),
         "k": torch.randn(c.B, c.T, hk, c.K, generator=gen),
         "v": torch.randn(c.B, c.T, hk, c.V, generator=gen)}
    if c.normalize:  # positive features, as a feature map would give
        x["q"], x["k"] = F.elu(x["q"]) + 1, F.elu(x["k"]) + 1
    x = {n: t.to(c.dtype) for n, t in x.items()}
    if gated:
        x["g"] = _gates(c.gate, (c.B, c.T, c.H, c.K), gen).to(c.dtype)
    elif c.gate:
        x["decay"] = torch.tensor([-0.05, -8.0, -1e-4, -0.5][: c.H]) if c.gate == "mixed" \
            else _gates(c.gate, (c.H,), gen)
    if c.initial_state:
        x["initial_state"] = torch.randn(c.B, c.H, c.K, c.V + c.normalize, generator=gen)
    return {n: t.to(DEVICE) for n, t in x.items()}


def _call(fn, c: Case, x: dict, gated: bool):
    x = dict(x)
    if c.kv_heads:  # GQA: repeat k, v heads before the call
        x["k"] = x["k"].repeat_interleave(c.H // c.kv_heads, dim=2)
        x["v"] = x["v"].repeat_interleave(c.H // c.kv_heads, dim=2)
    kw = {"initial_state": x.get("initial_state"), "output_final_state": c.final_state}
    if gated:
        return fn(x["q"], x["k"], x["v"], x["g"], **kw)
    return fn(x["q"], x["k"], x["v"], decay=x.get("decay"), normalize=c.normalize, **kw)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _check(fn, ref, c: Case, gated: bool):
    x = _inputs(c, gated)
    grad_names = [n for n in x if n != "decay" or c.learn_decay]
    ours = {n: t.clone().requires_grad_(n in grad_names) for n, t in x.items()}
    exact = {n: t.double().requires_grad_(n in grad_names) for n, t in x.items()}
    o, fin = _call(fn, c, ours, gated)
    o_ref, fin_ref = _call(ref, c, exact, gated)
    assert o.dtype == c.dtype and o.shape == o_ref.shape
    assert (fin is None) == (not c.final_state)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o_ref.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    loss, loss_ref = (o.double() * do).sum(), (o_ref * do).sum()
    errs = {"o": _rel(o, o_ref)}
    if c.final_state:
        assert fin.dtype == torch.float32
        dfin = torch.randn(fin_ref.shape, generator=gen, dtype=torch.float64).to(DEVICE)
        loss, loss_ref = loss + (fin.double() * dfin).sum(), loss_ref + (fin_ref * dfin).sum()
        errs["final"] = _rel(fin, fin_ref)
    loss.backward()
    loss_ref.backward()
    for n in grad_names:
        assert ours[n].grad is not None and ours[n].grad.dtype == ours[n].dtype, n
        assert torch.isfinite(ours[n].grad).all(), n
        errs["d" + n] = _rel(ours[n].grad, exact[n].grad)
    bad = {n: e for n, e in errs.items() if not e <= TOL[c.dtype]}
    assert not bad, f"{c}: errors over {TOL[c.dtype]}: {bad} (all: {errs})"


f16 = torch.float16
LINEAR_CASES = [
    Case(T=100),  # T not a multiple of the chunk (64)
    Case(T=2 * LINEAR_CHUNK, H=1, K=32, V=16),  # exact multiple, K > V
    Case(T=150, gate="mixed", initial_state=True, final_state=True),  # decays -0.05 and -8
    Case(T=300, H=1, gate="near1", initial_state=True, final_state=True),
    Case(T=90, gate="mixed", learn_decay=True, final_state=True, initial_state=True),
    Case(T=70, H=4, kv_heads=2, gate="mixed"),  # GQA
    Case(T=70, B=2, gate="mixed", learn_decay=True, initial_state=True, final_state=True),
    Case(T=120, normalize=True),
    Case(T=120, gate="mixed", normalize=True, initial_state=True, final_state=True),
    Case(T=1, initial_state=True, final_state=True),
    Case(T=2000, H=1, V=16, gate="near1", initial_state=True, final_state=True),  # 32 chunks
    Case(T=100, gate="mixed", initial_state=True, final_state=True, dtype=f16),
    Case(T=130, H=4, kv_heads=1, normalize=True, gate="near1", dtype=f16),
]
GLA_CASES = [
    Case(T=50, gate="mixed"),  # T not a multiple of the chunk (16)
    Case(T=4 * GLA_CHUNK, H=1, K=32, V=16, gate="mixed", initial_state=True, final_state=True),
    Case(T=45, K=64, gate="near0", initial_state=True, final_state=True),  # key slices
    Case(T=70, gate="near0"),
    Case(T=90, H=1, gate="near1", initial_state=True, final_state=True),
    Case(T=40, H=4, kv_heads=2, gate="mixed", final_state=True),  # GQA
    Case(T=40, B=2, gate="mixed", initial_state=True, final_state=True),
    Case(T=1, gate="mixed", initial_state=True, final_state=True),
    Case(T=1000, H=1, V=16, gate="mixed", final_state=True),  # 63 chunks
    Case(T=60, gate="mixed", initial_state=True, final_state=True, dtype=f16),
    Case(T=50, K=64, gate="near0", dtype=f16),
]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=str)
def test_linear_attention_matches_reference(case):
    _check(linear_attention, linear_attention_ref, case, gated=False)


@pytest.mark.parametrize("case", GLA_CASES, ids=str)
def test_gated_linear_attention_matches_reference(case):
    _check(gated_linear_attention, gated_linear_attention_ref, case, gated=True)


def test_linear_attention_chunk_32(monkeypatch):
    """check.py also times chunk 32 (linear.BT); the backward reuses the forward's chunk."""
    from linbench.kernels.triton import linear
    monkeypatch.setattr(linear, "BT", 32)
    _check(linear_attention, linear_attention_ref,
           Case(T=100, gate="mixed", learn_decay=True, initial_state=True, final_state=True),
           gated=False)


@pytest.mark.parametrize("gated", [False, True], ids=["linear", "gla"])
def test_final_state_chains_two_halves(gated):
    """Running [0, T) equals running [0, T/2) then [T/2, T) from its final state."""
    c = Case(T=80, gate="mixed", initial_state=True, final_state=True)
    x = _inputs(c, gated)
    fn = gated_linear_attention if gated else linear_attention
    o, fin = _call(fn, c, x, gated)
    first = {n: (t[:, :40] if t.dim() == 4 and n != "initial_state" else t) for n, t in x.items()}
    second = {n: (t[:, 40:] if t.dim() == 4 and n != "initial_state" else t) for n, t in x.items()}
    o1, mid = _call(fn, c, first, gated)
    o2, fin2 = _call(fn, c, dict(second, initial_state=mid), gated)
    assert _rel(torch.cat([o1, o2], 1), o) < 1e-5
    assert _rel(fin2, fin) < 1e-5


def test_bad_shapes_give_one_line_errors():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match=r"decay must be \(2,\)"):
        linear_attention(q, q, q, decay=torch.zeros(3))
    with pytest.raises(ValueError, match=r"initial_state must be \(1, 2, 16, 17\)"):
        linear_attention(q, q, q, normalize=True, initial_state=torch.zeros(1, 2, 16, 16))
    with pytest.raises(ValueError, match="expected q, k"):
        gated_linear_attention(q, q[:, :, :1], q, q)
    with pytest.raises(ValueError, match="g must be"):
        gated_linear_attention(q, q, q, q[..., :4])


def test_available_reports_both_kernels():
    from linbench.kernels import triton as kt
    assert kt.available("linear_attention") and kt.available("gated_linear_attention")
    assert kt.linear_attention is linear_attention


@pytest.mark.skipif(DEVICE == "cuda", reason="the dry run is the CPU path of the GPU check")
def test_check_dry_run(tmp_path):
    """`python -m linbench.kernels.check --dry-run` runs correctness + timing at tiny shapes."""
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
    assert {"linear_attention", "gated_linear_attention"} <= names
    assert names == {"linear_attention", "linear_attention[normalize]", "gated_linear_attention"}
    assert all(r["status"] == "PASS" for r in report["correctness"])
    ops = {r["op"] for r in report["timing"]}
    assert ops == {"sdpa", "triton:linear_attention", "triton:linear_attention[chunk32]",
                   "triton:gated_linear_attention"}
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in report["timing"])
