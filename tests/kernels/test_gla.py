"""gla/: gated linear attention, per-channel log-gates g (B, T, H, K).

Every fast form against gated_linear_attention_ref, output, final state and every
gradient (q, k, v, g, initial_state): the chunked torch form and the recurrent step (over
the shape grid of conftest, fp32 and fp64; gates typical, near 0 and near 1), the Triton
kernel (its own small cases, in the interpreter on CPU; fp16 too). Then the prefill ->
decode handoff and the forms' own properties (extreme gates, memory: per-chunk states never
stacked, half-precision inputs never copied whole to fp32; sub-blocks).
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import linbench.kernels as K
from linbench.kernels.gla import chunked
from linbench.kernels.gla.chunked import gated_linear_attention_chunked
from linbench.kernels.gla.recurrent import gated_linear_attention_step
from linbench.kernels.gla.reference import gated_linear_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ["q", "k", "v", "g", "initial_state"]
REGIMES = [("typ", True), ("near0", False), ("near1", True)]
REGIME_IDS = ["typ-init", "near0", "near1-init"]


def _leaves(kit, shape, dtype, regime, init):
    q, k, v = kit.qkv(shape, dtype)
    g = kit.log_gates((shape.B, shape.T, shape.H, shape.K), regime, dtype)
    s0 = torch.randn(shape.B, shape.H, shape.K, shape.V, requires_grad=True) if init else None
    return [q, k, v, g, s0]


# ---- chunked torch ------------------------------------------------------------------------

@pytest.mark.parametrize("regime,init", REGIMES, ids=REGIME_IDS)
def test_chunked_matches_reference(kit, shape, dtype, regime, init):
    def run(fn, **kw):
        return lambda q, k, v, g, s0: fn(q, kit.heads(k, shape), kit.heads(v, shape), g,
                                         initial_state=s0, output_final_state=True, **kw)

    kit.compare(run(gated_linear_attention_chunked, chunk_size=shape.C),
                run(gated_linear_attention_ref), _leaves(kit, shape, dtype, regime, init), NAMES)


def test_chunked_many_segments(kit, many_segments):
    """One chunk per checkpointed segment: the reverse sweep carries dS across segments."""
    shape = kit.Shape(2, 70, 2, 8, 4, C=16)
    q, k, v = kit.qkv(shape, torch.float64, positive=True)
    g = kit.log_gates((2, 70, 2, 8), "typ", torch.float64)
    s0 = torch.randn(2, 2, 8, 4, requires_grad=True)
    kit.compare(lambda *a: gated_linear_attention_chunked(
                    *a[:4], initial_state=a[4], output_final_state=True, chunk_size=16),
                lambda *a: gated_linear_attention_ref(*a[:4], initial_state=a[4],
                                                      output_final_state=True),
                [q, k, v, g, s0], NAMES)


def test_chunked_extreme_gates_stay_finite_fp32(kit):
    """Gates of exp(-60) per step and exp(-1e-6): fp32 chunked vs an fp64 reference."""
    shape = kit.Shape(1, 130, 2, 16, 8)
    q, k, v = kit.qkv(shape, torch.float32)
    for value in (-60.0, -1e-6):
        g = torch.full((1, 130, 2, 16), value, requires_grad=True)
        kit.compare(lambda *a: gated_linear_attention_chunked(*a, output_final_state=True),
                    lambda *a: gated_linear_attention_ref(*a, output_final_state=True),
                    [q, k, v, g], ["q", "k", "v", f"g={value}"])


def test_chunked_autograd_saves_no_per_chunk_states():
    """What autograd keeps for backward: the inputs and one state per segment, never a
    (B, T / C, H, K, V) stack of per-chunk states."""
    B, T, H, D, C = 1, 4096, 2, 32, 16
    q, k, v = (torch.randn(B, T, H, D, requires_grad=True) for _ in range(3))
    g = F.logsigmoid(torch.randn(B, T, H, D)).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        o, _ = gated_linear_attention_chunked(q, k, v, g, chunk_size=C)
    per_chunk_states = (T // C) * B * H * D * D
    inputs = 4 * B * T * H * D
    assert sum(saved) < inputs + per_chunk_states // 4, (sum(saved), inputs, per_chunk_states)
    assert max(saved) <= B * T * H * D
    o.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v, g))


def test_chunked_half_inputs_stream_without_fp32_copies(kit, many_segments):
    """bf16 inputs: each segment (16 tokens here) is cast to fp32 inside the scan, so neither
    the forward nor the backward creates an fp32 tensor the size of an input (B * T * H * K
    elements or more): only the bf16 output and gradients are that large. Values: the fp64 reference at
    bf16 accuracy, outputs and every gradient."""
    shape = kit.Shape(1, 256, 2, 8, 8, C=16)
    q, k, v = kit.qkv(shape, torch.bfloat16)
    g = kit.log_gates((1, 256, 2, 8), "typ", torch.bfloat16)
    seq = shape.B * shape.T * shape.H * shape.K
    with kit.Created() as fwd:
        o, _ = gated_linear_attention_chunked(q, k, v, g, chunk_size=16)
    with kit.Created() as bwd:
        torch.autograd.grad(o, [q, k, v, g], torch.ones_like(o))
    for phase, rec in (("forward", fwd), ("backward", bwd)):
        whole = [dt for dt, s in rec.tensors if torch.Size(s).numel() >= seq]
        assert whole and all(dt == torch.bfloat16 for dt in whole), (phase, whole)
    kit.compare(lambda *a: gated_linear_attention_chunked(*a, chunk_size=16)[0],
                lambda *a: gated_linear_attention_ref(*a)[0], [q, k, v, g], NAMES, ["o"])


def test_chunked_sub_block_choice():
    assert chunked.sub_block(64) == 8 and chunked.sub_block(16) == 4 and chunked.sub_block(7) == 7


def test_chunked_bad_gate_shape():
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="g must be"):
        gated_linear_attention_chunked(q, q, q, q[..., :2])


# ---- recurrent step -----------------------------------------------------------------------

@pytest.mark.parametrize("regime,init", REGIMES, ids=REGIME_IDS)
def test_steps_match_reference(kit, shape, dtype, regime, init):
    """gated_linear_attention_step token by token from the initial state: outputs, final
    state and every gradient."""
    def steps(q, k, v, g, s0):
        o, state = kit.steps(gated_linear_attention_step,
                             [q, kit.heads(k, shape), kit.heads(v, shape), g], s0)
        return o, state.float()  # full-sequence forms return fp32 states

    def ref(q, k, v, g, s0):
        return gated_linear_attention_ref(q, kit.heads(k, shape), kit.heads(v, shape), g,
                                          initial_state=s0, output_final_state=True)

    o, _ = kit.compare(steps, ref, _leaves(kit, shape, dtype, regime, init), NAMES)
    assert o.dtype == dtype


def test_step_continues_from_initial_state(kit):
    """A step from a given state equals the reference with that initial_state."""
    shape = kit.Shape(2, 1, 3, 8, 4)
    q, k, v = (x.detach() for x in kit.qkv(shape, torch.float64))
    g = kit.log_gates((2, 1, 3, 8), "typ", torch.float64).detach()
    s0 = torch.randn(2, 3, 8, 4, dtype=torch.float64)
    o, s1 = K.gated_linear_attention(q, k, v, g, initial_state=s0, output_final_state=True,
                                     backend="reference")
    o_step, s_step = gated_linear_attention_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], s0)
    kit.close(o_step, o[:, 0], "o")
    kit.close(s1, s_step, "state")


@pytest.mark.parametrize("T0", [0, 1, 29], ids=lambda t: f"prefill{t}")
def test_prefill_then_decode(kit, dtype, T0):
    """The chunked form (public API, backend torch) prefills T0 tokens, steps decode the rest:
    outputs and final state equal one chunked call."""
    shape = kit.Shape(2, 45, 3, 8, 4)
    q, k, v = (x.detach() for x in kit.qkv(shape, dtype))
    g = kit.log_gates((2, 45, 3, 8), "typ", dtype).detach()
    kit.handoff(lambda q, k, v, g: K.gated_linear_attention(
                    q, k, v, g, output_final_state=True, chunk_size=16, backend="torch"),
                gated_linear_attention_step, [q, k, v, g], T0)


# ---- Triton -------------------------------------------------------------------------------

@dataclass
class Case:
    T: int
    gate: str  # "mixed" logsigmoid of N(0, 4), "near0" -8 per step, "near1" -1e-4
    K: int = 16
    V: int = 32
    H: int = 2
    B: int = 1
    kv_heads: int | None = None  # GQA: k, v have fewer heads, repeated before the call
    initial_state: bool = False
    final_state: bool = False
    dtype: torch.dtype = torch.float32

    def __str__(self):
        s = f"B{self.B}-T{self.T}-H{self.H}-K{self.K}-V{self.V}"
        s += f"-gqa{self.kv_heads}" if self.kv_heads else ""
        s += f"-{self.gate}"
        s += "-s0" if self.initial_state else ""
        s += "-final" if self.final_state else ""
        return s + "-" + str(self.dtype).split(".")[-1]


TRITON_TOL = {torch.float32: 1e-4, torch.float16: 1e-2}
f16 = torch.float16
TRITON_CASES = [  # Triton chunk: 16
    Case(T=50, gate="mixed"),  # T not a multiple of the chunk
    Case(T=64, H=1, K=32, V=16, gate="mixed", initial_state=True, final_state=True),  # 4 chunks
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


def _triton_inputs(c: Case):
    """Leaf tensors (name -> tensor) in c.dtype (states in fp32)."""
    gen = torch.Generator().manual_seed(c.T * 7 + c.K)
    hk = c.kv_heads or c.H
    x = {"q": torch.randn(c.B, c.T, c.H, c.K, generator=gen),
         "k": torch.randn(c.B, c.T, hk, c.K, generator=gen),
         "v": torch.randn(c.B, c.T, hk, c.V, generator=gen)}
    shape = (c.B, c.T, c.H, c.K)
    x["g"] = (F.logsigmoid(2 * torch.randn(shape, generator=gen)) if c.gate == "mixed" else
              torch.full(shape, {"near0": -8.0, "near1": -1e-4}[c.gate]))
    x = {n: t.to(c.dtype) for n, t in x.items()}
    if c.initial_state:
        x["initial_state"] = torch.randn(c.B, c.H, c.K, c.V, generator=gen)
    return {n: t.to(DEVICE) for n, t in x.items()}


def _call(fn, c: Case, x: dict):
    x = dict(x)
    if c.kv_heads:  # GQA: repeat k, v heads before the call
        x["k"] = x["k"].repeat_interleave(c.H // c.kv_heads, dim=2)
        x["v"] = x["v"].repeat_interleave(c.H // c.kv_heads, dim=2)
    return fn(x["q"], x["k"], x["v"], x["g"], initial_state=x.get("initial_state"),
              output_final_state=c.final_state)


@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_matches_reference(kit, case):
    pytest.importorskip("triton")
    from linbench.kernels.gla.triton import BT, gated_linear_attention
    assert BT == 16  # TRITON_CASES' chunk
    x = _triton_inputs(case)
    o, fin = kit.compare_exact(lambda fn, x: _call(fn, case, x), gated_linear_attention,
                               gated_linear_attention_ref, x, list(x), TRITON_TOL[case.dtype],
                               str(case))
    assert o.dtype == case.dtype and (fin is None) == (not case.final_state)


def test_triton_final_state_chains_two_halves(kit):
    """Running [0, T) equals running [0, T/2) then [T/2, T) from its final state."""
    pytest.importorskip("triton")
    from linbench.kernels.gla.triton import gated_linear_attention
    c = Case(T=80, gate="mixed", initial_state=True, final_state=True)
    x = _triton_inputs(c)
    o, fin = _call(gated_linear_attention, c, x)
    half = {n: (t[:, :40], t[:, 40:]) if t.dim() == 4 and n != "initial_state" else (t, t)
            for n, t in x.items()}
    o1, mid = _call(gated_linear_attention, c, {n: a for n, (a, _) in half.items()})
    o2, fin2 = _call(gated_linear_attention, c, dict({n: b for n, (_, b) in half.items()},
                                                     initial_state=mid))
    assert kit.rel(torch.cat([o1, o2], 1), o) < 1e-5
    assert kit.rel(fin2, fin) < 1e-5


def test_triton_bad_shapes_give_one_line_errors():
    pytest.importorskip("triton")
    from linbench.kernels.gla.triton import gated_linear_attention
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="expected q, k"):
        gated_linear_attention(q, q[:, :, :1], q, q)
    with pytest.raises(ValueError, match="g must be"):
        gated_linear_attention(q, q, q, q[..., :4])
