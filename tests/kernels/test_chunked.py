"""Chunked torch linear attention / GLA against the quadratic references: output, final
state and every input gradient, over the shape grid in fp32 and fp64."""
from __future__ import annotations

import math

import pytest
import torch

from linbench.kernels import chunked
from linbench.kernels.chunked import gated_linear_attention_chunked, linear_attention_chunked
from linbench.kernels.reference import gated_linear_attention_ref, linear_attention_ref

# name -> (decay regime or None, normalize, with initial state, explicit scale)
LINEAR_VARIANTS = {
    "plain": (None, False, False, None),
    "plain-init-scale": (None, False, True, 0.3),
    "decay-typ-init": ("typ", False, True, None),
    "decay-near0": ("near0", False, False, None),
    "decay-near1-init": ("near1", False, True, None),
    "norm": (None, True, False, None),
    "norm-decay-init": ("typ", True, True, None),
}


def _decay(H, regime, dtype):
    """Per-head log-decays: ALiBi slopes -2^(-8(h+1)/H) (Lightning Attention's rule), or
    about -8 (near 0) / -1e-4 (near 1)."""
    h = torch.arange(H, dtype=dtype)
    d = {"typ": -(2.0 ** (-8 * (h + 1) / H)), "near0": -8 - h / H, "near1": -1e-4 * (1 + h)}[regime]
    return d.requires_grad_()


@pytest.mark.parametrize("variant", list(LINEAR_VARIANTS))
def test_linear_matches_reference(kit, shape, dtype, variant):
    regime, normalize, init, scale = LINEAR_VARIANTS[variant]
    q, k, v = kit.qkv(shape, dtype, positive=normalize)
    decay = None if regime is None else _decay(shape.H, regime, dtype)
    s0 = None
    if init:
        s0 = torch.rand(shape.B, shape.H, shape.K, shape.V + normalize,
                        generator=torch.Generator().manual_seed(5)) - 0.5 * (not normalize)
        s0.requires_grad_()

    def run(fn, **kw):
        return lambda q, k, v, decay, s0: fn(
            q, kit.heads(k, shape), kit.heads(v, shape), decay=decay, normalize=normalize,
            scale=scale, initial_state=s0, output_final_state=True, **kw)

    o, final = kit.compare(run(linear_attention_chunked, chunk_size=shape.C),
                           run(linear_attention_ref), [q, k, v, decay, s0],
                           ["q", "k", "v", "decay", "initial_state"])
    assert o.dtype == dtype and final.dtype == torch.float32


@pytest.mark.parametrize("regime,init", [("typ", True), ("near0", False), ("near1", True)],
                         ids=["typ-init", "near0", "near1-init"])
def test_gla_matches_reference(kit, shape, dtype, regime, init):
    q, k, v = kit.qkv(shape, dtype)
    g = kit.log_gates((shape.B, shape.T, shape.H, shape.K), regime, dtype)
    s0 = torch.randn(shape.B, shape.H, shape.K, shape.V, requires_grad=True) if init else None

    def run(fn, **kw):
        return lambda q, k, v, g, s0: fn(q, kit.heads(k, shape), kit.heads(v, shape), g,
                                         initial_state=s0, output_final_state=True, **kw)

    kit.compare(run(gated_linear_attention_chunked, chunk_size=shape.C),
                run(gated_linear_attention_ref), [q, k, v, g, s0], ["q", "k", "v", "g", "initial_state"])


@pytest.mark.parametrize("kind", ["linear-decay-norm", "gla"])
def test_many_segments(kit, many_segments, kind):
    """One chunk per checkpointed segment: the reverse sweep carries dS across segments."""
    shape = kit.Shape(2, 70, 2, 8, 4, C=16)
    q, k, v = kit.qkv(shape, torch.float64, positive=True)
    if kind == "gla":
        g = kit.log_gates((2, 70, 2, 8), "typ", torch.float64)
        s0 = torch.randn(2, 2, 8, 4, requires_grad=True)
        kit.compare(lambda *a: gated_linear_attention_chunked(
                        *a[:4], initial_state=a[4], output_final_state=True, chunk_size=16),
                    lambda *a: gated_linear_attention_ref(*a[:4], initial_state=a[4],
                                                          output_final_state=True),
                    [q, k, v, g, s0], ["q", "k", "v", "g", "initial_state"])
    else:
        decay = _decay(2, "typ", torch.float64)
        s0 = torch.rand(2, 2, 8, 5, requires_grad=True)

        def run(fn, **kw):
            return lambda q, k, v, d, s: fn(q, k, v, decay=d, normalize=True, initial_state=s,
                                            output_final_state=True, **kw)
        kit.compare(run(linear_attention_chunked, chunk_size=16), run(linear_attention_ref),
                    [q, k, v, decay, s0], ["q", "k", "v", "decay", "initial_state"])


def test_extreme_gates_stay_finite_fp32(kit):
    """Gates of exp(-60) per step and exp(-1e-6): fp32 chunked vs an fp64 reference."""
    shape = kit.Shape(1, 130, 2, 16, 8)
    q, k, v = kit.qkv(shape, torch.float32)
    for value in (-60.0, -1e-6):
        g = torch.full((1, 130, 2, 16), value, requires_grad=True)
        kit.compare(lambda *a: gated_linear_attention_chunked(*a, output_final_state=True),
                    lambda *a: gated_linear_attention_ref(*a, output_final_state=True),
                    [q, k, v, g], ["q", "k", "v", f"g={value}"])


def test_autograd_saves_no_per_chunk_states(kit):
    """What autograd keeps for backward: the inputs and one state per segment, never a
    (B, T / C, H, K, V) stack of per-chunk states."""
    B, T, H, D, C = 1, 4096, 2, 32, 16
    q, k, v = (torch.randn(B, T, H, D, requires_grad=True) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, D)).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        o, _ = gated_linear_attention_chunked(q, k, v, g, chunk_size=C)
    per_chunk_states = (T // C) * B * H * D * D
    inputs = 4 * B * T * H * D
    assert sum(saved) < inputs + per_chunk_states // 4, (sum(saved), inputs, per_chunk_states)
    assert max(saved) <= B * T * H * D
    o.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v, g))


def test_no_grad_forward_and_bad_input():
    q = torch.randn(1, 33, 2, 8)
    with torch.no_grad():
        o, final = linear_attention_chunked(q, q, q, output_final_state=True, chunk_size=8)
    o_ref, final_ref = linear_attention_ref(q, q, q, output_final_state=True)
    assert torch.allclose(o, o_ref, atol=1e-4) and torch.allclose(final, final_ref, atol=1e-4)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attention_chunked(q, q, q, chunk_size=0)
    with pytest.raises(ValueError, match="shape mismatch"):
        linear_attention_chunked(q, q[:, :, :1], q)


def test_half_inputs_keep_dtype_and_fp32_state():
    q = torch.randn(1, 40, 2, 8).half()
    o, final = linear_attention_chunked(q, q, q, output_final_state=True, chunk_size=16)
    assert o.dtype == torch.float16 and final.dtype == torch.float32
    o_ref, _ = linear_attention_ref(q, q, q)
    assert (o.float() - o_ref.float()).abs().max() <= 2e-3 * o_ref.float().abs().max()
    assert math.isfinite(final.sum().item())


def test_sub_block_choice():
    assert chunked._sub_block(64) == 8 and chunked._sub_block(16) == 4 and chunked._sub_block(7) == 7
