"""delta/: the (gated) delta rule, S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T.

Every fast form against the token-loop delta_rule_ref, output, final state and every
gradient (q, k, v, beta, g, initial_state): the chunked WY form (fp32 and fp64 on a grid of
readable case ids: T not a multiple of the chunk, GQA, beta and gates near 0 and 1), the
recurrent step, the Triton sweep (its own small cases, in the interpreter on CPU; fp16 as
well). Keys and queries are L2-normalized as DeltaNet does. Then the prefill -> decode
handoff and the forms' own properties (chunk / segment invariance, memory, dtypes).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import linbench.kernels as K
from linbench.kernels.delta.chunked import delta_rule_chunked
from linbench.kernels.delta.recurrent import delta_rule_step
from linbench.kernels.delta.reference import delta_rule_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton():
    pytest.importorskip("triton")
    from linbench.kernels.delta.triton import delta_rule
    return delta_rule


# ---- chunked torch ------------------------------------------------------------------------

# id -> (B, T, H, K, V, chunk, options). gate: None | "mid" | "near1" | "near0";
# beta: "mid" | "near0" | "near1"; kv: number of shared key/value heads (GQA) or None.
CASES = {
    "B1-T64-H1-K16-V16-C16": (1, 64, 1, 16, 16, 16, {}),
    "B2-T50-H2-K16-V32-C16": (2, 50, 2, 16, 32, 16, {}),
    "B1-T10-H2-K8-V8-C64-short": (1, 10, 2, 8, 8, 64, {}),
    "B1-T100-H3-K32-V16-C32-init": (1, 100, 3, 32, 16, 32, {"init": True}),
    "B2-T37-H4-K16-V16-C8-gqa2": (2, 37, 4, 16, 16, 8, {"kv": 2}),
    "B1-T70-H2-K16-V16-C16-beta0": (1, 70, 2, 16, 16, 16, {"beta": "near0"}),
    "B1-T70-H2-K16-V16-C16-beta1": (1, 70, 2, 16, 16, 16, {"beta": "near1"}),
    "B1-T70-H2-K16-V16-C16-gate-mid": (1, 70, 2, 16, 16, 16, {"gate": "mid"}),
    "B1-T70-H2-K16-V16-C16-gate1": (1, 70, 2, 16, 16, 16, {"gate": "near1"}),
    "B1-T70-H2-K16-V16-C16-gate0": (1, 70, 2, 16, 16, 16, {"gate": "near0"}),
    "B2-T45-H4-K16-V8-C16-gqa2-gate-init": (2, 45, 4, 16, 8, 16,
                                             {"kv": 2, "gate": "mid", "init": True}),
    "B1-T200-H2-K16-V16-C8-beta1-gate-segments": (1, 200, 2, 16, 16, 8,
                                                   {"beta": "near1", "gate": "mid"}),
}
TOL = {torch.float64: 1e-9, torch.float32: 2e-4}  # max abs error / max(1, max |reference|)


def make_inputs(B, T, H, K, V, opts, dtype, seed=0):
    """Leaf tensors (the ones we differentiate) and a function that builds the kernel args."""
    gen = torch.Generator().manual_seed(seed)
    kv = opts.get("kv") or H

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    beta_logit = {"mid": 0.0, "near0": -8.0, "near1": 8.0}[opts.get("beta", "mid")]
    leaves = {
        "q": rnd(B, T, H, K),
        "k": rnd(B, T, kv, K),
        "v": rnd(B, T, kv, V),
        "beta": torch.sigmoid(rnd(B, T, H) + beta_logit),
    }
    gate = opts.get("gate")
    if gate is not None:
        # log-gate g = logsigmoid(x): gate exp(g) ~ 0.5 ("mid"), ~0.999 ("near1"), ~5e-5 ("near0")
        shift = {"mid": 0.0, "near1": 7.0, "near0": -10.0}[gate]
        leaves["g"] = F.logsigmoid(rnd(B, T, H) * 0.5 + shift)
    if opts.get("init"):
        leaves["initial_state"] = rnd(B, H, K, V) * 0.5
    for t in leaves.values():
        t.requires_grad_(True)

    def args():
        q = F.normalize(leaves["q"], dim=-1)
        k = F.normalize(leaves["k"], dim=-1).repeat_interleave(H // kv, dim=2)  # (B, T, H, K)
        v = leaves["v"].repeat_interleave(H // kv, dim=2)  # (B, T, H, V)
        kw = {n: leaves[n] for n in ("g", "initial_state") if n in leaves}
        return (q, k, v, leaves["beta"]), kw

    return leaves, args


def assert_close(actual, expected, tol, what):
    err = (actual.double() - expected.double()).abs().max().item()
    ref = max(1.0, expected.double().abs().max().item())
    assert err <= tol * ref, f"{what}: max abs err {err:.3e} > {tol:.1e} * {ref:.3g}"


def run(fn, leaves, args, seed=1, **kw):
    """Outputs and gradients of a random linear functional of (o, final state)."""
    pos, extra = args()
    o, S = fn(*pos, **extra, output_final_state=True, **kw)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen, dtype=o.dtype)
    dS = torch.randn(S.shape, generator=gen, dtype=S.dtype)
    grads = torch.autograd.grad((o * do).sum() + (S * dS).sum(), list(leaves.values()))
    return o, S, dict(zip(leaves, grads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_chunked_matches_reference(case, dtype):
    B, T, H, K, V, C, opts = CASES[case]
    leaves, args = make_inputs(B, T, H, K, V, opts, dtype)
    o_ref, S_ref, g_ref = run(delta_rule_ref, leaves, args)
    o, S, g = run(delta_rule_chunked, leaves, args, chunk_size=C)
    tol = TOL[dtype]
    assert o.dtype == dtype and o.shape == (B, T, H, V)
    assert S.dtype == torch.float32 and S.shape == (B, H, K, V)
    assert_close(o, o_ref, tol, "output")
    assert_close(S, S_ref, max(tol, 1e-6), "final state")  # the state is returned in fp32
    for name in leaves:
        assert_close(g[name], g_ref[name], tol, f"grad {name}")


def test_chunked_chunk_and_segment_sizes_do_not_change_the_result():
    leaves, args = make_inputs(2, 83, 2, 16, 16, {"gate": "mid", "init": True}, torch.float64)
    o0, S0, g0 = run(delta_rule_chunked, leaves, args, chunk_size=64)
    for C, seg in [(1, None), (7, 1), (16, 2), (32, 100)]:
        o, S, g = run(delta_rule_chunked, leaves, args, chunk_size=C, segment_chunks=seg)
        assert_close(o, o0, 1e-10, f"output C={C} seg={seg}")
        assert_close(S, S0, 1e-6, f"state C={C} seg={seg}")
        for name in leaves:
            assert_close(g[name], g0[name], 1e-10, f"grad {name} C={C} seg={seg}")


def test_chunked_no_grad_path_and_low_precision_dtype():
    leaves, args = make_inputs(1, 40, 2, 16, 16, {"gate": "mid"}, torch.float32)
    pos, kw = args()
    o_ref, S_ref = delta_rule_ref(*pos, **kw, output_final_state=True)
    with torch.no_grad():
        o, S = delta_rule_chunked(*pos, **kw, output_final_state=True, chunk_size=16)
    assert_close(o, o_ref, 2e-4, "no-grad output")
    assert_close(S, S_ref, 2e-4, "no-grad state")
    assert delta_rule_chunked(*pos, **kw)[1] is None
    half = [t.detach().to(torch.bfloat16) for t in pos]
    o16, S16 = delta_rule_chunked(*half, g=kw["g"].detach(), output_final_state=True)
    assert o16.dtype == torch.bfloat16 and S16.dtype == torch.float32
    assert_close(o16.float(), o_ref.detach(), 5e-2, "bf16 output")


def _unique_bytes(tensors):
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def test_chunked_autograd_keeps_only_inputs_and_one_state_per_segment():
    """Per-chunk states / WY matrices must not be saved for backward (checkpointed segments)."""
    B, T, H, K, V, C = 1, 1024, 2, 16, 16, 16  # 64 chunks -> 8 segments of 8 chunks
    leaves, args = make_inputs(B, T, H, K, V, {"gate": "mid"}, torch.float32)
    pos, kw = args()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o, _ = delta_rule_chunked(*pos, **kw, chunk_size=C)
    n_seg = T // (8 * C)
    budget = _unique_bytes(list(pos) + [kw["g"]]) + (n_seg + 1) * B * H * K * V * 4
    assert _unique_bytes(saved) <= budget
    o.sum().backward()  # the checkpointed graph is usable (its values: the grid above)
    assert all(leaf.grad is not None for leaf in leaves.values())


# ---- recurrent step -----------------------------------------------------------------------

STEP_CASES = ["B2-T50-H2-K16-V32-C16", "B1-T70-H2-K16-V16-C16-beta1",
              "B2-T45-H4-K16-V8-C16-gqa2-gate-init", "B1-T70-H2-K16-V16-C16-gate0"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", STEP_CASES)
def test_steps_match_reference(kit, case, dtype):
    """delta_rule_step token by token from the initial state: outputs, final state and
    every gradient."""
    B, T, H, K, V, _, opts = CASES[case]
    leaves, args = make_inputs(B, T, H, K, V, opts, dtype)

    def steps(q, k, v, beta, g=None, initial_state=None, output_final_state=True):
        o, S = kit.steps(delta_rule_step, [q, k, v, beta], initial_state, {"g": g})
        return o, S.float()  # full-sequence forms return fp32 states

    o_ref, S_ref, g_ref = run(delta_rule_ref, leaves, args)
    o, S, g = run(steps, leaves, args)
    tol = TOL[dtype]
    assert o.dtype == dtype
    assert_close(o, o_ref, tol, "output")
    assert_close(S, S_ref, max(tol, 1e-6), "final state")
    for name in leaves:
        assert_close(g[name], g_ref[name], tol, f"grad {name}")


@pytest.mark.parametrize("T0", [0, 1, 29], ids=lambda t: f"prefill{t}")
def test_prefill_then_decode(kit, dtype, T0):
    """The chunked form (public API, backend torch) prefills T0 tokens, steps decode the rest:
    outputs and final state equal one chunked call (gated, L2-normalized keys)."""
    shape = kit.Shape(2, 45, 3, 8, 4)
    q, k, v = (x.detach() for x in kit.qkv(shape, dtype))
    gen = torch.Generator().manual_seed(3)
    beta = torch.rand(2, 45, 3, generator=gen, dtype=dtype)
    g = -torch.rand(2, 45, 3, generator=gen, dtype=dtype)
    kit.handoff(lambda q, k, v, beta, g: K.delta_rule(q, k, v, beta, g=g, output_final_state=True,
                                                      chunk_size=16, backend="torch"),
                delta_rule_step, [q, F.normalize(k, dim=-1), v, beta], T0, seq_kw={"g": g})


# ---- Triton -------------------------------------------------------------------------------

TRITON_TOL = {torch.float32: 2e-5, torch.float16: 3e-3}  # max error / max |reference|
# (B, T, H, K, V, chunk, seg, bv): T never a multiple of the chunk; seg = chunks per
# checkpoint (2 with 5 chunks: a partial last segment); bv < V splits the state columns.
TRITON_SHAPES = {
    "B1-T75-H2-K32-V48-c16-seg2-bv16": (1, 75, 2, 32, 48, 16, 2, 16),
    "B2-T70-H1-K16-V32-c32-auto": (2, 70, 1, 16, 32, 32, None, None),
    "B1-T50-H2-K48-V16-c16-seg1": (1, 50, 2, 48, 16, 16, 1, None),
}
# beta ~ U(0,1); "edges": beta and gates near 0 and 1 (sigmoid / logsigmoid of +-6)
REGIMES = ["plain", "gated", "edges"]


def _rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(0.1)).item()


def _triton_inputs(shape, dtype, regime, seed=0):
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


def _triton_run(fn, leaves, gated, **kw):
    q, k, v, beta = leaves[:4]
    g = leaves[4] if gated else None
    return fn(q, k, v, beta, g=g, initial_state=leaves[-1], output_final_state=True, **kw)


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", list(TRITON_SHAPES.values()), ids=list(TRITON_SHAPES))
def test_triton_matches_reference(shape, dtype, regime):
    delta_rule = _triton()
    torch.manual_seed(0)  # the random cotangents
    chunk, seg, bv = shape[5:]
    leaves = _triton_inputs(shape, dtype, regime)
    gated = regime != "plain"
    o, sf = _triton_run(delta_rule, leaves, gated, _chunk=chunk, _seg=seg, _bv=bv)
    assert o.dtype == dtype and sf.dtype == torch.float32
    do, dsf = torch.randn_like(o), torch.randn_like(sf)
    grads = torch.autograd.grad((o.float() * do).sum() + (sf * dsf).sum(), leaves)
    o_ref, sf_ref = _triton_run(delta_rule_ref, leaves, gated)
    refs = torch.autograd.grad((o_ref.float() * do).sum() + (sf_ref * dsf).sum(), leaves)
    names = ["o", "S_T", "dq", "dk", "dv", "dbeta"] + (["dg"] if gated else []) + ["dS0"]
    for name, a, b in zip(names, [o, sf, *grads], [o_ref, sf_ref, *refs]):
        assert a.shape == b.shape, name
        err, tol = _rel_err(a, b), TRITON_TOL[dtype]
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def test_triton_defaults_no_state():
    """Default chunk/segment config, no initial state, no final state requested."""
    delta_rule = _triton()
    torch.manual_seed(0)  # the random cotangent
    q, k, v, beta = _triton_inputs((1, 90, 2, 32, 32), torch.float32, "plain")[:4]
    o, sf = delta_rule(q, k, v, beta)
    assert sf is None
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v, beta), do)
    o_ref, _ = delta_rule_ref(q, k, v, beta)
    refs = torch.autograd.grad(o_ref, (q, k, v, beta), do)
    for a, b in zip([o, *grads], [o_ref, *refs]):
        assert _rel_err(a, b) < TRITON_TOL[torch.float32]


def test_triton_checkpoints_are_sparse():
    """The sweep saves ceil(NT / seg) states for the backward, not one per chunk."""
    delta_rule = _triton()
    q, k, v, beta = _triton_inputs((1, 16 * 9, 1, 16, 16), torch.float32, "plain")[:4]
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


def test_triton_bad_shapes_raise():
    delta_rule = _triton()
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="beta"):
        delta_rule(q, q, q, torch.rand(1, 8, 1))
    with pytest.raises(ValueError, match="g must be"):
        delta_rule(q, q, q, torch.rand(1, 8, 2), g=torch.zeros(1, 8))
