"""delta_rule_chunked (WY form, checkpointed segments) against the token-loop reference.

Output, final state and every gradient (q, k, v, beta, g, initial_state), fp32 and fp64,
on a grid of readable shape ids. Keys and queries are L2-normalized as DeltaNet does.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linbench.kernels.delta import delta_rule_chunked
from linbench.kernels.reference import delta_rule_ref

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
TOL = {torch.float64: 1e-9, torch.float32: 2e-4}


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


def test_chunk_and_segment_sizes_do_not_change_the_result():
    leaves, args = make_inputs(2, 83, 2, 16, 16, {"gate": "mid", "init": True}, torch.float64)
    o0, S0, g0 = run(delta_rule_chunked, leaves, args, chunk_size=64)
    for C, seg in [(1, None), (7, 1), (16, 2), (32, 100)]:
        o, S, g = run(delta_rule_chunked, leaves, args, chunk_size=C, segment_chunks=seg)
        assert_close(o, o0, 1e-10, f"output C={C} seg={seg}")
        assert_close(S, S0, 1e-6, f"state C={C} seg={seg}")
        for name in leaves:
            assert_close(g[name], g0[name], 1e-10, f"grad {name} C={C} seg={seg}")


def test_no_grad_path_and_low_precision_dtype():
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


def test_autograd_keeps_only_inputs_and_one_state_per_segment():
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
