"""Triton sliding-window attention and LoLCATs hybrid vs the quadratic torch references.

Runs under the Triton CPU interpreter when no GPU is present (tests/conftest.py), so
shapes stay small. fp16 inputs are compared against the fp32 reference on the same
(rounded) inputs; bf16 is not tested (broken in the interpreter).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from linbench.kernels.reference import (  # noqa: E402
    sliding_window_attention_ref, window_linear_attention_ref)
from linbench.kernels.triton import window as W  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: 2e-5, torch.float16: 5e-3}  # max error / max |reference|
# (B, T, H, K, V, window, scale, blocks): T never a multiple of the block; window 24 is
# not a multiple of it, window 1 is the degenerate band, window > T the causal limit.
SHAPES = {
    "B1-T100-H2-K32-V48-w24": (1, 100, 2, 32, 48, 24, None, None),
    "B2-T130-H1-K64-V64-w64": (2, 130, 1, 64, 64, 64, None, None),
    "B1-T77-H2-K16-V32-w64-bm16bn32": (1, 77, 2, 16, 32, 64, 0.3, (16, 32)),
    "B1-T50-H1-K32-V16-w1": (1, 50, 1, 32, 16, 1, None, None),
    "B1-T40-H2-K32-V32-w100": (1, 40, 2, 32, 32, 100, None, None),
}


def _rel_err(a, b, floor=0.1):
    """max |a - b| / max |b|; the floor keeps exact-zero gradients (window 1: dq = 0)
    from turning rounding noise into a failure (test gradients are O(1))."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(floor)).item()


def _assert_close(outs, refs, dtype, names, floors=None, loosen=None):
    for name, a, b in zip(names, outs, refs):
        assert a.shape == b.shape, name
        err = _rel_err(a, b, (floors or {}).get(name, 0.1))
        tol = TOL[dtype] * (loosen or {}).get(name, 1)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # the random cotangents


def _inputs(shape, dtype, gqa=False, seed=0):
    B, T, H, K, V = shape[:5]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g)
    hk = H // 2 if gqa else H
    k = torch.randn(B, T, hk, K, generator=g)
    v = torch.randn(B, T, hk, V, generator=g)
    leaves = [x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v)]
    q, k, v = leaves
    if gqa:  # GQA: the caller repeats key/value heads before the kernel
        k, v = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    return leaves, (q, k, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_sliding_window_matches_reference(shape, dtype):
    window, scale, blocks = shape[5:]
    leaves, (q, k, v) = _inputs(shape, dtype)
    o = W.sliding_window_attention(q, k, v, window=window, scale=scale, _blocks=blocks)
    assert o.dtype == dtype
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, leaves, do)
    o_ref = sliding_window_attention_ref(q, k, v, window=window, scale=scale)
    refs = torch.autograd.grad(o_ref, leaves, do)
    _assert_close([o, *grads], [o_ref, *refs], dtype, ["o", "dq", "dk", "dv"])


def test_sliding_window_gqa_repeated_keys():
    shape = (1, 70, 4, 32, 32, 24)
    leaves, (q, k, v) = _inputs(shape, torch.float32, gqa=True)
    o = W.sliding_window_attention(q, k, v, window=24)
    grads = torch.autograd.grad(o.square().sum(), leaves)
    o_ref = sliding_window_attention_ref(q, k, v, window=24)
    refs = torch.autograd.grad(o_ref.square().sum(), leaves)
    _assert_close([o, *grads], [o_ref, *refs], torch.float32, ["o", "dq", "dk", "dv"])


def test_window_stats_and_their_gradients():
    """(o, lse, m) of the autograd Function, with cotangents on all three, vs torch.

    The m cotangent must reach only the score of the arg-max key, as amax's does."""
    B, T, H, K, V, window = 1, 90, 2, 32, 16, 24
    leaves, (q, k, v) = _inputs((B, T, H, K, V), torch.float32, seed=1)
    o, lse, m = W._SlidingWindow.apply(q, k, v, window, K ** -0.5, torch.float32, (32, 32))
    s = torch.einsum("bihk,bjhk->bhij", q * K ** -0.5, k)
    s = s.masked_fill(~_band(T, window), float("-inf"))
    o_ref = torch.einsum("bhij,bjhv->bihv", s.softmax(-1), v)
    lse_ref, m_ref = s.logsumexp(-1), s.amax(-1)  # (B, H, T)
    cot = [torch.randn_like(x) for x in (o_ref, lse_ref, m_ref)]
    loss = sum((x * c).sum() for x, c in zip((o, lse, m), cot))
    loss_ref = sum((x * c).sum() for x, c in zip((o_ref, lse_ref, m_ref), cot))
    grads = torch.autograd.grad(loss, leaves)
    refs = torch.autograd.grad(loss_ref, leaves, retain_graph=True)
    _assert_close([o, lse, m, *grads], [o_ref, lse_ref, m_ref, *refs], torch.float32,
                  ["o", "lse", "m", "dq", "dk", "dv"])
    # the m path is not negligible: dropping it moves dq far beyond the tolerance
    loss_nom = sum((x * c).sum() for x, c in zip((o_ref, lse_ref), cot))
    dq_nom = torch.autograd.grad(loss_nom, leaves[0])[0]
    assert _rel_err(dq_nom, refs[0]) > 100 * TOL[torch.float32]


def _band(T, window):
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return ((j <= i) & (j > i - window)).to(DEVICE)


HYBRID = {
    "B1-T100-H2-K32-V48-F16-w24": (1, 100, 2, 32, 48, 16, 24),
    "B2-T90-H1-K32-V32-F32-w64": (2, 90, 1, 32, 32, 32, 64),
    "B1-T40-H2-K16-V16-F16-w64": (1, 40, 2, 16, 16, 16, 64),  # T < window: no linear part
}


def _hybrid_inputs(shape, dtype, seed=0):
    B, T, H, K, V, Fd, _ = shape
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, K, generator=g), torch.randn(B, T, H, K, generator=g)
    v = torch.randn(B, T, H, V, generator=g)
    # positive features (softmax over the feature dim, as Hedgehog), small weights
    fq = torch.randn(B, T, H, Fd, generator=g).softmax(-1)
    fk = torch.randn(B, T, H, Fd, generator=g).softmax(-1)
    leaves = [x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v, fq, fk)]
    gamma = torch.linspace(0.1, 0.7, H, device=DEVICE).requires_grad_()  # (H,) in (0, 1)
    return leaves + [gamma]


@pytest.mark.parametrize("linear", ["triton", "chunked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", list(HYBRID.values()), ids=list(HYBRID))
def test_window_linear_matches_reference(shape, dtype, linear):
    """Each linear-branch implementation that imports (Triton, torch chunked)."""
    if W._linear_impl(linear) is None:
        pytest.skip(f"linear branch '{linear}' is not importable")
    window = shape[-1]
    ins = _hybrid_inputs(shape, dtype)
    q, k, v, fq, fk, gamma = ins
    y = W.window_linear_attention(q, k, v, fq, fk, window=window, gamma=gamma,
                                  _linear=(linear,))
    assert y.dtype == dtype
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, ins, dy, allow_unused=True)  # T <= window: fq, fk unused
    grads = [torch.zeros_like(x) if d is None else d for x, d in zip(ins, grads)]
    y_ref = window_linear_attention_ref(q, k, v, fq, fk, window=window, gamma=gamma)
    refs = torch.autograd.grad(y_ref, ins, dy)
    # dgamma sums B*T*V terms of size ~|dy y| / gamma that partly cancel (fully, down to
    # eps-sized values, when T <= window): absolute floor 1 and a 10x looser tolerance
    # (the fp32 reference itself is ~1e-5 off an fp64 run on these shapes).
    _assert_close([y, *grads], [y_ref, *refs], dtype,
                  ["y", "dq", "dk", "dv", "dfq", "dfk", "dgamma"], floors={"dgamma": 1.0},
                  loosen={"dgamma": 10})


def test_bad_window_and_shapes_raise():
    q = torch.randn(1, 8, 1, 16)
    with pytest.raises(ValueError, match="window"):
        W.sliding_window_attention(q, q, q, window=0)
    with pytest.raises(ValueError, match="shape"):
        W.sliding_window_attention(q, q[:, :, :, :8], q)
