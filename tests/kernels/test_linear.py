"""linear/: causal linear attention (plain, fixed per-head decay, normalized).

Every fast form against linear_attention_ref, output, final state and every gradient
(q, k, v, decay, initial_state): the chunked torch form and the recurrent step (over the
shape grid of conftest, fp32 and fp64, T not a multiple of the chunk included), the
Triton kernel (its own small cases, in the interpreter on CPU; fp16 too). Then the
prefill -> decode handoff and the forms' own properties (memory, dtypes, bad input).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import linbench.kernels as K
from linbench.kernels.linear.chunked import linear_attention_chunked
from linbench.kernels.linear.recurrent import linear_attention_step
from linbench.kernels.linear.reference import linear_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# name -> (decay regime or None, normalize, with initial state, explicit scale)
VARIANTS = {
    "plain": (None, False, False, None),
    "plain-init-scale": (None, False, True, 0.3),
    "decay-typ-init": ("typ", False, True, None),
    "decay-near0": ("near0", False, False, None),
    "decay-near1-init": ("near1", False, True, None),
    "norm": (None, True, False, None),
    "norm-decay-init": ("typ", True, True, None),
}
STEP_VARIANTS = ["plain-init-scale", "decay-near0", "norm-decay-init"]


def _decay(H, regime, dtype):
    """Per-head log-decays: ALiBi slopes -2^(-8(h+1)/H) (Lightning Attention's rule), or
    about -8 (near 0) / -1e-4 (near 1)."""
    h = torch.arange(H, dtype=dtype)
    d = {"typ": -(2.0 ** (-8 * (h + 1) / H)), "near0": -8 - h / H, "near1": -1e-4 * (1 + h)}[regime]
    return d.requires_grad_()


def _leaves(kit, shape, dtype, variant):
    regime, normalize, init, scale = VARIANTS[variant]
    q, k, v = kit.qkv(shape, dtype, positive=normalize)
    decay = None if regime is None else _decay(shape.H, regime, dtype)
    s0 = None
    if init:
        s0 = torch.rand(shape.B, shape.H, shape.K, shape.V + normalize,
                        generator=torch.Generator().manual_seed(5)) - 0.5 * (not normalize)
        s0.requires_grad_()
    return [q, k, v, decay, s0], dict(normalize=normalize, scale=scale)


NAMES = ["q", "k", "v", "decay", "initial_state"]


# ---- chunked torch ------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_chunked_matches_reference(kit, shape, dtype, variant):
    leaves, kw = _leaves(kit, shape, dtype, variant)

    def run(fn, **extra):
        return lambda q, k, v, decay, s0: fn(
            q, kit.heads(k, shape), kit.heads(v, shape), decay=decay, initial_state=s0,
            output_final_state=True, **kw, **extra)

    o, final = kit.compare(run(linear_attention_chunked, chunk_size=shape.C),
                           run(linear_attention_ref), leaves, NAMES)
    assert o.dtype == dtype and final.dtype == torch.float32


def test_chunked_many_segments(kit, many_segments):
    """One chunk per checkpointed segment: the reverse sweep carries dS across segments."""
    shape = kit.Shape(2, 70, 2, 8, 4, C=16)
    q, k, v = kit.qkv(shape, torch.float64, positive=True)
    decay = _decay(2, "typ", torch.float64)
    s0 = torch.rand(2, 2, 8, 5, requires_grad=True)

    def run(fn, **kw):
        return lambda q, k, v, d, s: fn(q, k, v, decay=d, normalize=True, initial_state=s,
                                        output_final_state=True, **kw)
    kit.compare(run(linear_attention_chunked, chunk_size=16), run(linear_attention_ref),
                [q, k, v, decay, s0], NAMES)


def test_chunked_no_grad_forward_and_bad_input():
    q = torch.randn(1, 33, 2, 8)
    with torch.no_grad():
        o, final = linear_attention_chunked(q, q, q, output_final_state=True, chunk_size=8)
    o_ref, final_ref = linear_attention_ref(q, q, q, output_final_state=True)
    assert torch.allclose(o, o_ref, atol=1e-4) and torch.allclose(final, final_ref, atol=1e-4)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attention_chunked(q, q, q, chunk_size=0)
    with pytest.raises(ValueError, match="shape mismatch"):
        linear_attention_chunked(q, q[:, :, :1], q)


def test_chunked_half_inputs_keep_dtype_and_fp32_state():
    q = torch.randn(1, 40, 2, 8).half()
    o, final = linear_attention_chunked(q, q, q, output_final_state=True, chunk_size=16)
    assert o.dtype == torch.float16 and final.dtype == torch.float32
    o_ref, _ = linear_attention_ref(q, q, q)
    assert (o.float() - o_ref.float()).abs().max() <= 2e-3 * o_ref.float().abs().max()
    assert math.isfinite(final.sum().item())


# ---- recurrent step -----------------------------------------------------------------------

@pytest.mark.parametrize("variant", STEP_VARIANTS)
def test_steps_match_reference(kit, shape, dtype, variant):
    """linear_attention_step token by token, from the initial state: outputs, final state
    and every gradient."""
    leaves, kw = _leaves(kit, shape, dtype, variant)

    def steps(q, k, v, decay, s0):
        o, state = kit.steps(linear_attention_step, [q, kit.heads(k, shape), kit.heads(v, shape)],
                             s0, decay=decay, **kw)
        return o, state.float()  # full-sequence forms return fp32 states

    def ref(q, k, v, decay, s0):
        return linear_attention_ref(q, kit.heads(k, shape), kit.heads(v, shape), decay=decay,
                                    initial_state=s0, output_final_state=True, **kw)

    o, _ = kit.compare(steps, ref, leaves, NAMES)
    assert o.dtype == dtype


HANDOFF = {"plain": {}, "decay-norm": {"normalize": True}}


@pytest.mark.parametrize("T0", [0, 1, 29], ids=lambda t: f"prefill{t}")
@pytest.mark.parametrize("variant", list(HANDOFF))
def test_prefill_then_decode(kit, dtype, variant, T0):
    """The chunked form (public API, backend torch) prefills T0 tokens, steps decode the rest:
    outputs and final state equal one chunked call."""
    kw = dict(HANDOFF[variant])
    shape = kit.Shape(2, 45, 3, 8, 4)
    q, k, v = (x.detach() for x in kit.qkv(shape, dtype, positive=kw.get("normalize", False)))
    if kw:
        kw["decay"] = _decay(3, "typ", dtype).detach()
    kit.handoff(lambda q, k, v: K.linear_attention(q, k, v, output_final_state=True,
                                                   chunk_size=16, backend="torch", **kw),
                linear_attention_step, [q, k, v], T0, **kw)


# ---- Triton -------------------------------------------------------------------------------

@dataclass
class Case:
    T: int
    K: int = 16
    V: int = 32
    H: int = 2
    B: int = 1
    kv_heads: int | None = None  # GQA: k, v have fewer heads, repeated before the call
    gate: str | None = None  # per-head decay: "mixed" (-0.05, -8, ...), "near0", "near1"
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


TRITON_TOL = {torch.float32: 1e-4, torch.float16: 1e-2}
f16 = torch.float16
TRITON_CASES = [  # Triton chunk: 64
    Case(T=100),  # T not a multiple of the chunk
    Case(T=128, H=1, K=32, V=16),  # exact multiple (2 chunks), K > V
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


def _triton_inputs(c: Case):
    """Leaf tensors (name -> tensor) in c.dtype (states, decay in fp32)."""
    gen = torch.Generator().manual_seed(c.T * 7 + c.K)
    hk = c.kv_heads or c.H
    x = {"q": torch.randn(c.B, c.T, c.H, c.K, generator=gen),
         "k": torch.randn(c.B, c.T, hk, c.K, generator=gen),
         "v": torch.randn(c.B, c.T, hk, c.V, generator=gen)}
    if c.normalize:  # positive features, as a feature map would give
        x["q"], x["k"] = F.elu(x["q"]) + 1, F.elu(x["k"]) + 1
    x = {n: t.to(c.dtype) for n, t in x.items()}
    if c.gate == "mixed":
        x["decay"] = torch.tensor([-0.05, -8.0, -1e-4, -0.5][: c.H])
    elif c.gate:
        x["decay"] = torch.full((c.H,), {"near0": -8.0, "near1": -1e-4}[c.gate])
    if c.initial_state:
        x["initial_state"] = torch.randn(c.B, c.H, c.K, c.V + c.normalize, generator=gen)
    return {n: t.to(DEVICE) for n, t in x.items()}


def _call(fn, c: Case, x: dict):
    x = dict(x)
    if c.kv_heads:  # GQA: repeat k, v heads before the call
        x["k"] = x["k"].repeat_interleave(c.H // c.kv_heads, dim=2)
        x["v"] = x["v"].repeat_interleave(c.H // c.kv_heads, dim=2)
    return fn(x["q"], x["k"], x["v"], decay=x.get("decay"), normalize=c.normalize,
              initial_state=x.get("initial_state"), output_final_state=c.final_state)


def check_triton(kit, c: Case):
    from linbench.kernels.linear.triton import linear_attention
    x = _triton_inputs(c)
    grad_names = [n for n in x if n != "decay" or c.learn_decay]
    o, fin = kit.compare_exact(lambda fn, x: _call(fn, c, x), linear_attention,
                               linear_attention_ref, x, grad_names, TRITON_TOL[c.dtype], str(c))
    assert o.dtype == c.dtype and (fin is None) == (not c.final_state)


@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_matches_reference(kit, case):
    pytest.importorskip("triton")
    check_triton(kit, case)


def test_triton_chunk_32(kit, monkeypatch):
    """The device check also times chunk 32 (module attribute BT); the backward reuses the
    forward's chunk."""
    pytest.importorskip("triton")
    from linbench.kernels.linear import triton as kernel
    assert kernel.BT == 64  # TRITON_CASES' chunk
    monkeypatch.setattr(kernel, "BT", 32)
    check_triton(kit, Case(T=100, gate="mixed", learn_decay=True, initial_state=True,
                           final_state=True))


def test_triton_final_state_chains_two_halves(kit):
    """Running [0, T) equals running [0, T/2) then [T/2, T) from its final state."""
    pytest.importorskip("triton")
    from linbench.kernels.linear.triton import linear_attention
    c = Case(T=80, gate="mixed", initial_state=True, final_state=True)
    x = _triton_inputs(c)
    o, fin = _call(linear_attention, c, x)
    half = {n: (t[:, :40], t[:, 40:]) if t.dim() == 4 and n != "initial_state" else (t, t)
            for n, t in x.items()}
    o1, mid = _call(linear_attention, c, {n: a for n, (a, _) in half.items()})
    o2, fin2 = _call(linear_attention, c, dict({n: b for n, (_, b) in half.items()},
                                               initial_state=mid))
    assert kit.rel(torch.cat([o1, o2], 1), o) < 1e-5
    assert kit.rel(fin2, fin) < 1e-5


def test_triton_bad_shapes_give_one_line_errors():
    pytest.importorskip("triton")
    from linbench.kernels.linear.triton import linear_attention
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match=r"decay must be \(2,\)"):
        linear_attention(q, q, q, decay=torch.zeros(3))
    with pytest.raises(ValueError, match=r"initial_state must be \(1, 2, 16, 17\)"):
        linear_attention(q, q, q, normalize=True, initial_state=torch.zeros(1, 2, 16, 16))
    with pytest.raises(ValueError, match="expected q, k"):
        linear_attention(q, q[:, :, :1], q)
