"""Shared grid and helpers for the kernel tests (one file per op: test_linear, test_gla,
test_delta, test_window; each compares every fast form, chunked torch, recurrent steps and
Triton, against the op's reference, outputs and every gradient).

Tests that take a `shape` or `dtype` argument (and do not parametrize it themselves) run
over SHAPES x DTYPES. Triton runs in the CPU interpreter when there is no GPU
(tests/conftest.py), ~70x slower than torch: Triton tests keep their own small cases.
Helpers come from the `kit` fixture:

    kit.qkv(shape, dtype, positive=False)    leaf q, k, v (k, v with shape.Hkv heads)
    kit.heads(x, shape)                      repeat GQA key/value heads to H (before calls)
    kit.log_gates(size, regime, dtype)       leaf log-gates: typ | near0 | near1
    kit.grads(outputs, leaves)               gradients of sum(out * w), fixed random w
    kit.double(leaves)                       fp64 leaf copies for the reference run
    kit.close(a, b, what)                    a vs reference b, tolerance by a's dtype
    kit.compare(fast, ref, leaves, names)    outputs + every gradient, ref on fp64 copies
    kit.steps(step, seq, state, **kw)        a decode step applied token by token -> (o, state)
    kit.handoff(full, step, seq, T0)         prefill T0 tokens, decode the rest == one call
    kit.compare_exact(call, fast, ref, x, grad_names, tol)
    kit.Created()                            with-block recording (dtype, shape) of created tensors
                                             a Triton kernel vs the fp64 reference, same values
"""
from __future__ import annotations

import dataclasses
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


@dataclasses.dataclass(frozen=True)
class Shape:
    B: int
    T: int
    H: int
    K: int
    V: int
    Hkv: int = 0  # key/value heads (GQA); 0 = H
    C: int = 16  # chunk size

    @property
    def kv_heads(self) -> int:
        return self.Hkv or self.H

    @property
    def id(self) -> str:
        gqa = f"-KV{self.Hkv}" if self.Hkv else ""
        return f"B{self.B}-T{self.T}-H{self.H}{gqa}-K{self.K}-V{self.V}-C{self.C}"


SHAPES = [
    Shape(2, 100, 3, 16, 8, C=32),  # T not a multiple of the chunk, several chunks
    Shape(1, 64, 2, 8, 8, C=16),  # T an exact multiple
    Shape(1, 45, 4, 16, 16, Hkv=2, C=16),  # GQA: k, v repeated before the call
    Shape(1, 50, 2, 8, 4, C=12),  # chunk with an odd sub-block split, K != V
    Shape(1, 1, 2, 4, 4, C=16),  # a single token
]
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
# Max error relative to max |reference| (floored at 1e-3), by dtype of the fast form's
# tensor. References run in fp64; final states are fp32 by contract.
TOLS = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _explicitly_parametrized(metafunc, name: str) -> bool:
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        if name in names:
            return True
    return False


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames and not _explicitly_parametrized(metafunc, "shape"):
        metafunc.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
    if "dtype" in metafunc.fixturenames and not _explicitly_parametrized(metafunc, "dtype"):
        metafunc.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def qkv(shape: Shape, dtype, *, positive=False, seed=0):
    g = _gen(seed)
    q = torch.randn(shape.B, shape.T, shape.H, shape.K, generator=g, dtype=dtype)
    k = torch.randn(shape.B, shape.T, shape.kv_heads, shape.K, generator=g, dtype=dtype)
    v = torch.randn(shape.B, shape.T, shape.kv_heads, shape.V, generator=g, dtype=dtype)
    if positive:  # normalized attention needs a positive denominator, as feature maps give
        q, k = q.abs() + 0.1, k.abs() + 0.1
    return [x.requires_grad_() for x in (q, k, v)]


def heads(x: torch.Tensor, shape: Shape) -> torch.Tensor:
    """Repeat GQA heads (dim 2) to shape.H; gradients accumulate through the repeat."""
    return x.repeat_interleave(shape.H // x.shape[2], dim=2) if x.shape[2] != shape.H else x


def log_gates(size, regime: str, dtype, seed=1):
    """Leaf log-gates <= 0: typ (logsigmoid of a normal), near0 (about -8 per step: gates
    ~3e-4) or near1 (about -1e-4 per step)."""
    u = torch.rand(size, generator=_gen(seed), dtype=dtype)
    g = {"typ": torch.nn.functional.logsigmoid(4 * u - 2), "near0": -8 - 2 * u,
         "near1": -1e-4 * (0.5 + u)}[regime]
    return g.requires_grad_()


def grads(outputs, leaves, seed=123):
    """Gradients of sum_i sum(out_i * w_i) with fixed random w_i (None outputs skipped)."""
    g = _gen(seed)
    loss = 0
    for out in outputs:
        if out is not None:
            w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
            loss = loss + (out * w).sum()
    return torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)


def double(leaves):
    """Detached fp64 copies of the leaves (None kept): the reference runs on these, so a
    fp32 fast form is measured against exact-ish truth, not against fp32 rounding."""
    return [None if x is None else x.detach().double().requires_grad_() for x in leaves]


def close(a, b, what="tensor", tol=None, floor=1e-3):
    """max|a - b| <= tol * max(max|b|, floor), tol by a's dtype (b: the reference)."""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    dtype, tol = a.dtype, TOLS[a.dtype] if tol is None else tol
    a, b = a.detach().double(), b.detach().double()
    ref = max(b.abs().max().item() if b.numel() else 0.0, floor)
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= tol * ref, f"{what}: max err {err:.3e} > {tol:.0e} * {ref:.3e} ({dtype})"


def compare(fast, ref, leaves, names, out_names=("o", "final state"), floors=None):
    """Run fast(*leaves) and ref(*fp64 copies); compare every output and every gradient.

    leaves may hold None (an absent optional input); both callables get them as given.
    floors: {leaf name: magnitude floor} for gradients that are sums of many O(1) terms
    that cancel (their absolute error scales with the terms, not with the result).
    Returns the fast outputs (a tuple).
    """
    ref_leaves = double(leaves)
    out, out_ref = fast(*leaves), ref(*ref_leaves)
    out = out if isinstance(out, tuple) else (out,)
    out_ref = out_ref if isinstance(out_ref, tuple) else (out_ref,)
    for name, a, b in zip(out_names, out, out_ref):
        assert (a is None) == (b is None), name
        if a is not None:
            close(a, b, name)
    idx = [i for i, x in enumerate(leaves) if x is not None]
    got = grads(out, [leaves[i] for i in idx])
    want = grads(out_ref, [ref_leaves[i] for i in idx])
    for i, a, b in zip(idx, got, want):
        close(a, b, f"d{names[i]}", floor=(floors or {}).get(names[i], 1e-3))
    return out


def steps(step, seq, state=None, seq_kw=None, **kw):
    """The recurrent form over a whole sequence: step(*seq[:, t], state, **seq_kw[:, t], **kw)
    for t = 0 .. T-1. seq: (B, T, ...) tensors; seq_kw: {name: (B, T, ...) tensor or None}.
    Returns (o (B, T, ...) stacked, the last state); differentiable."""
    outs = []
    for t in range(seq[0].shape[1]):
        per_token = {n: None if x is None else x[:, t] for n, x in (seq_kw or {}).items()}
        o, state = step(*(x[:, t] for x in seq), state, **per_token, **kw)
        outs.append(o)
    return torch.stack(outs, 1), state


def rel(a, b) -> float:
    """max |a - b| / max |b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def compare_exact(call, fast, ref, x, grad_names, tol, what=""):
    """call(fast, x) -> (o, final or None) against call(ref, float64 copies of x): the same
    input values, so a fp32 or fp16 kernel is measured against exact-ish truth. Every output
    and the gradient of each tensor in grad_names: max |a - b| / max |b| <= tol.
    Returns the fast outputs."""
    ours = {n: t.clone().requires_grad_(n in grad_names) for n, t in x.items()}
    exact = {n: t.double().requires_grad_(n in grad_names) for n, t in x.items()}
    o, fin = call(fast, ours)
    o_ref, fin_ref = call(ref, exact)
    assert o.shape == o_ref.shape and (fin is None) == (fin_ref is None)
    gen = _gen(1)
    do = torch.randn(o_ref.shape, generator=gen, dtype=torch.float64).to(o_ref.device)
    loss, loss_ref = (o.double() * do).sum(), (o_ref * do).sum()
    errs = {"o": rel(o, o_ref)}
    if fin is not None:
        assert fin.dtype == torch.float32
        dfin = torch.randn(fin_ref.shape, generator=gen, dtype=torch.float64).to(o_ref.device)
        loss, loss_ref = loss + (fin.double() * dfin).sum(), loss_ref + (fin_ref * dfin).sum()
        errs["final"] = rel(fin, fin_ref)
    loss.backward()
    loss_ref.backward()
    for n in grad_names:
        assert ours[n].grad is not None and ours[n].grad.dtype == ours[n].dtype, n
        assert torch.isfinite(ours[n].grad).all(), n
        errs["d" + n] = rel(ours[n].grad, exact[n].grad)
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"{what}: errors over {tol}: {bad} (all: {errs})"
    return o, fin


def _cut(xs, sl):
    return {n: None if x is None else x[:, sl] for n, x in xs.items()}


def handoff(full, step, seq, T0, seq_kw=None, **kw):
    """Prefill T0 tokens with full(*seq, **seq_kw) -> (o, state) (a chunked form asked for
    its final state), decode the other tokens from that state with step, token by token:
    the outputs and the final state must equal one full call over all the tokens."""
    seq_kw = seq_kw or {}
    o_full, state_full = full(*seq, **seq_kw)
    state = None
    if T0:
        _, state = full(*(x[:, :T0] for x in seq), **_cut(seq_kw, slice(None, T0)))
    o, state = steps(step, [x[:, T0:] for x in seq], state, _cut(seq_kw, slice(T0, None)), **kw)
    # A prefill hands over an fp32 state (the contract), so decoding after it is fp32-exact.
    close(o, o_full[:, T0:], "o", tol=1e-4 if T0 else None)
    assert o.dtype == o_full.dtype
    if isinstance(state_full, tuple):  # window caches: tensors of the last tokens, kv sums
        assert type(state) is type(state_full)
        for field, a, b in zip(state_full._fields, state_full, state):
            close(a, b, f"state.{field}")
    else:
        close(state_full, state, "final state")


class Created(TorchDispatchMode):
    """Records (dtype, shape) of every tensor an op creates inside the `with` (not views or
    in-place results: outputs that alias an input in the op's schema): the memory tests'
    account of what a kernel materializes."""

    def __init__(self):
        super().__init__()
        self.tensors: list[tuple[torch.dtype, tuple]] = []

    def __torch_dispatch__(self, func, types=(), args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if all(r.alias_info is None for r in func._schema.returns):
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    self.tensors.append((t.dtype, tuple(t.shape)))
        return out


@pytest.fixture
def kit():
    return types.SimpleNamespace(qkv=qkv, heads=heads, log_gates=log_gates, grads=grads,
                                 double=double, close=close, compare=compare, steps=steps,
                                 handoff=handoff, rel=rel, compare_exact=compare_exact,
                                 Shape=Shape, Created=Created)


@pytest.fixture
def many_segments(monkeypatch):
    """Force one chunk per segment in the torch chunked scan (many checkpointed segments)."""
    from linbench.kernels.gla import chunked as gla_chunked
    from linbench.kernels.linear import chunked as linear_chunked
    monkeypatch.setattr(linear_chunked, "SEGMENT_TOKEN_HEADS", 1)
    monkeypatch.setattr(gla_chunked, "SEGMENT_TOKEN_HEADS", 1)
