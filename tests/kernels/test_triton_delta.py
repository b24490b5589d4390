"""Triton chunked (gated) delta rule vs the token-recurrent torch reference.

Outputs, final state and every gradient (q, k, v, beta, g, initial state), fp32 and fp16
inputs (fp16 compared against the fp32 reference on the same rounded inputs). Keys are
L2-normalized as DeltaNet does; beta and gates are pushed near 0 and near 1.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from linbench.kernels.reference import delta_rule_ref  # noqa: E402
from linbench.kernels.triton.delta import delta_rule  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 3e-3}  # max error / max |reference|
# (B, T, H, K, V, chunk, seg, bv): T never a multiple of the chunk; seg = chunks per
# checkpoint (2 with 5 chunks: a partial last segment); bv < V splits the state columns.
SHAPES = {
    "B1-T75-H2-K32-V48-c16-seg2-bv16": (1, 75, 2, 32, 48, 16, 2, 16),
    "B2-T70-H1-K16-V32-c32-auto": (2, 70, 1, 16, 32, 32, None, None),
    "B1-T50-H2-K48-V16-c16-seg1": (1, 50, 2, 48, 16, 16, 1, None),
}
# beta ~ U(0,1); "edges": beta and gates near 0 and 1 (sigmoid / logsigmoid of +-6)
REGIMES = ["plain", "gated", "edges"]


def _rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(0.1)).item()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # the random cotangents


def _inputs(shape, dtype, regime, seed=0):
    B, T, H, K, V = shape[:5]
    g_ = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g_)
    k = F.normalize(torch.randn(B, T, H, K, generator=g_), dim=-1)
    v = torch.randn(B, T, H, V, generator=g_)
    if regime == "edges":  # half the tokens near 0, half near 1, for beta and the gate
        sign = torch.where(torch.rand(B, T, H, generator=g_) < 0.5, -6.0, 6.0)
        beta = torch.sigmoid(sign + torch.randn(B, T, H, generator=g_))
        g = F.logsigmoid(-sign + torch.randn(B, T, H, generator=g_))
    else:
        beta = torch.rand(B, T, H, generator=g_)
        g = F.logsigmoid(torch.randn(B, T, H, generator=g_) + 2.0)
    s0 = torch.randn(B, H, K, V, generator=g_)
    leaves = [x.to(DEVICE, dtype) for x in (q, k, v, beta)]
    if regime != "plain":
        leaves.append(g.to(DEVICE, dtype))
    leaves.append(s0.to(DEVICE))  # states stay fp32
    return [x.requires_grad_() for x in leaves]


def _run(fn, leaves, gated, **kw):
    q, k, v, beta = leaves[:4]
    g = leaves[4] if gated else None
    return fn(q, k, v, beta, g=g, initial_state=leaves[-1], output_final_state=True, **kw)


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_delta_rule_matches_reference(shape, dtype, regime):
    chunk, seg, bv = shape[5:]
    leaves = _inputs(shape, dtype, regime)
    gated = regime != "plain"
    o, sf = _run(delta_rule, leaves, gated, _chunk=chunk, _seg=seg, _bv=bv)
    assert o.dtype == dtype and sf.dtype == torch.float32
    do, dsf = torch.randn_like(o), torch.randn_like(sf)
    grads = torch.autograd.grad((o.float() * do).sum() + (sf * dsf).sum(), leaves)
    o_ref, sf_ref = _run(delta_rule_ref, leaves, gated)
    refs = torch.autograd.grad((o_ref.float() * do).sum() + (sf_ref * dsf).sum(), leaves)
    names = ["o", "S_T", "dq", "dk", "dv", "dbeta"] + (["dg"] if gated else []) + ["dS0"]
    for name, a, b in zip(names, [o, sf, *grads], [o_ref, sf_ref, *refs]):
        assert a.shape == b.shape, name
        err = _rel_err(a, b)
        assert err < TOL[dtype], f"{name}: relative error {err:.2e} >= {TOL[dtype]:.0e}"


def test_delta_rule_defaults_no_state():
    """Default chunk/segment config, no initial state, no final state requested."""
    q, k, v, beta = _inputs((1, 90, 2, 32, 32), torch.float32, "plain")[:4]
    o, sf = delta_rule(q, k, v, beta)
    assert sf is None
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v, beta), do)
    o_ref, _ = delta_rule_ref(q, k, v, beta)
    refs = torch.autograd.grad(o_ref, (q, k, v, beta), do)
    for a, b in zip([o, *grads], [o_ref, *refs]):
        assert _rel_err(a, b) < TOL[torch.float32]


def test_delta_rule_checkpoints_are_sparse():
    """The sweep saves ceil(NT / seg) states for the backward, not one per chunk."""
    q, k, v, beta = _inputs((1, 16 * 9, 1, 16, 16), torch.float32, "plain")[:4]
    o, _ = delta_rule(q, k, v, beta, _chunk=16)  # 9 chunks -> seg 3 -> 3 checkpoints
    stack, sweep = [o.grad_fn], None
    while stack and sweep is None:  # find the Triton sweep's node in the autograd graph
        node = stack.pop()
        if "_DeltaSweep" in type(node).__name__:
            sweep = node
        stack += [f for f, _ in node.next_functions if f is not None]
    shapes = [tuple(t.shape) for t in sweep.saved_tensors]
    assert (1, 1, 3, 16, 16) in shapes
    assert not any(len(s) == 5 and s[2] == 9 for s in shapes)  # no per-chunk state stack


def test_bad_shapes_raise():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="beta"):
        delta_rule(q, q, q, torch.rand(1, 8, 1))
    with pytest.raises(ValueError, match="g must be"):
        delta_rule(q, q, q, torch.rand(1, 8, 2), g=torch.zeros(1, 8))
