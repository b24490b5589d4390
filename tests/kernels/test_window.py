"""window/: sliding-window softmax attention and the LoLCATs window + linear hybrid.

Every fast form against its reference (sliding_window_attention_ref,
window_linear_attention_ref), the output and every gradient (q, k, v; fq, fk, gamma):
the blockwise torch form (over the shape grid of conftest, fp32 and fp64, windows shorter
and longer than the block and than T, window 1), streamed over many groups (GQA keys as
stride-0 views), the recurrent steps, the Triton kernels (their own small cases, in the
interpreter on CPU; fp16 too; the hybrid over many groups). Then the decode states (after
a prefill and step by step) and the forms' own properties (memory: one group's
intermediates at any T, bad input).
"""
from __future__ import annotations

import pytest
import torch

import linbench.kernels as K
from linbench.kernels.window import chunked
from linbench.kernels.window.chunked import (sliding_window_attention_chunked,
                                             window_linear_attention_chunked)
from linbench.kernels.window.recurrent import (WindowState, sliding_window_attention_step,
                                               window_linear_attention_step)
from linbench.kernels.window.reference import (sliding_window_attention_ref,
                                               window_linear_attention_ref)
from tests.kernels.conftest import Created

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton():
    """The Triton module (its kernels run in the interpreter on CPU)."""
    pytest.importorskip("triton")
    from linbench.kernels.window import triton
    return triton


# ---- blockwise torch ----------------------------------------------------------------------

# (window, query block): window > block, block > window, window longer than every T, window 1
WINDOWS = [(16, 8), (5, 16), (256, 32), (1, 8)]
WINDOW_IDS = [f"W{w}-blk{b}" for w, b in WINDOWS]
FEAT = 6


def _features(shape, dtype, seed=7):
    """Positive feature-mapped fq, fk (B, T, H, F) and gamma (H,) in (0, 1), as leaves."""
    g = torch.Generator().manual_seed(seed)
    fq = torch.rand(shape.B, shape.T, shape.H, FEAT, generator=g, dtype=dtype)
    fk = torch.rand(shape.B, shape.T, shape.H, FEAT, generator=g, dtype=dtype)
    gamma = torch.sigmoid(torch.randn(shape.H, generator=g, dtype=dtype))
    return [x.requires_grad_() for x in (fq, fk, gamma)]


@pytest.mark.parametrize("window,block", WINDOWS, ids=WINDOW_IDS)
def test_chunked_sliding_window_matches_reference(kit, shape, dtype, window, block):
    q, k, v = kit.qkv(shape, dtype)

    def run(fn, **kw):
        return lambda q, k, v: fn(q, kit.heads(k, shape), kit.heads(v, shape), window=window, **kw)

    (o,) = kit.compare(run(sliding_window_attention_chunked, block=block),
                       run(sliding_window_attention_ref), [q, k, v], ["q", "k", "v"], ["o"])
    assert o.dtype == dtype


@pytest.mark.parametrize("window,block", WINDOWS, ids=WINDOW_IDS)
def test_chunked_hybrid_matches_reference(kit, shape, dtype, window, block):
    q, k, v = kit.qkv(shape, dtype)
    fq, fk, gamma = _features(shape, dtype)

    def run(fn, **kw):
        return lambda q, k, v, fq, fk, gamma: fn(q, kit.heads(k, shape), kit.heads(v, shape), fq, fk,
                                                 window=window, gamma=gamma, **kw)

    kit.compare(run(window_linear_attention_chunked, block=block),
                run(window_linear_attention_ref), [q, k, v, fq, fk, gamma],
                ["q", "k", "v", "fq", "fk", "gamma"], ["y"], floors={"gamma": 1.0})


@pytest.mark.parametrize("T", [10, 16, 41])
def test_chunked_hybrid_final_state(kit, T):
    """kv sums fk_j [v_j, 1] over tokens out of the window; k, v, fk are the last tokens."""
    shape, window = kit.Shape(2, T, 3, 8, 5), 16
    q, k, v = kit.qkv(shape, torch.float64)
    fq, fk, gamma = _features(shape, torch.float64)
    y, state = window_linear_attention_chunked(q, k, v, fq, fk, window=window, gamma=gamma,
                                               output_final_state=True, block=8)
    assert isinstance(state, WindowState)
    kit.close(y, window_linear_attention_ref(q, k, v, fq, fk, window=window, gamma=gamma), "y")
    old = max(T - window, 0)
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1)
    want = sum((fk[:, j, :, :, None] * v1[:, j, :, None, :] for j in range(old)),
               torch.zeros(2, 3, FEAT, 6, dtype=torch.float64))
    assert state.kv.dtype == torch.float32
    kit.close(state.kv, want, "kv")
    for name, got, full in (("k", state.k, k), ("v", state.v, v), ("fk", state.fk, fk)):
        assert torch.equal(got, full[:, old:]), name
    o, cache = sliding_window_attention_chunked(q, k, v, window=window, output_final_state=True)
    assert torch.equal(cache.k, k[:, -window:]) and torch.equal(cache.v, v[:, -window:])


# (window, T): a window longer than a group (its keys reach back over several groups),
# window 1, window > T; T never a multiple of the block (8)
STREAM_CASES = [(12, 75), (1, 45), (100, 75), (30, 61)]


@pytest.mark.parametrize("window,T", STREAM_CASES, ids=[f"W{w}-T{t}" for w, t in STREAM_CASES])
def test_chunked_streamed_groups_match_reference(kit, monkeypatch, window, T):
    """One query block (8 tokens) per group: every group is streamed, recomputed in the
    backward, its key gradients carried back to the groups before. GQA through stride-0
    expanded key / value heads (no copy), so their gradients sum over the shared heads."""
    monkeypatch.setattr(chunked, "GROUP_SCORE_ELEMENTS", 1)
    shape = kit.Shape(2, T, 4, 8, 4, Hkv=2)
    q, k, v = kit.qkv(shape, torch.float64)
    fq, fk, gamma = _features(shape, torch.float64)

    def heads(x):  # (B, T, 2, D) -> (B, T, 4, D), a view
        return x[:, :, :, None].expand(-1, -1, -1, 2, -1).flatten(2, 3)

    def swa(fn, **kw):
        return lambda q, k, v: fn(q, heads(k), heads(v), window=window, **kw)

    def hybrid(fn, **kw):
        return lambda q, k, v, fq, fk, gamma: fn(q, heads(k), heads(v), fq, fk, window=window,
                                                 gamma=gamma, **kw)
    kit.compare(swa(sliding_window_attention_chunked, block=8), swa(sliding_window_attention_ref),
                [q, k, v], ["q", "k", "v"], ["o"])
    kit.compare(hybrid(window_linear_attention_chunked, block=8),
                hybrid(window_linear_attention_ref), [q, k, v, fq, fk, gamma],
                ["q", "k", "v", "fq", "fk", "gamma"], ["y"], floors={"gamma": 1.0})


class _Map(torch.nn.Module):
    """A per-token feature map with parameters (Hedgehog-like): softmax(x W_h), (H, D, F)."""

    def __init__(self, H, D, Fd, dtype, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(H, D, Fd, generator=g, dtype=dtype))

    def forward(self, x):
        return torch.einsum("bthd,hdf->bthf", x, self.weight.to(x.dtype)).softmax(-1)


@pytest.mark.parametrize("window,T", [(12, 75), (100, 40)], ids=["W12-T75", "W100-T40"])
def test_chunked_hybrid_applies_feature_maps_per_group(kit, monkeypatch, window, T):
    """fq, fk given as the feature maps: applied to each group's q and k (never to the
    whole sequence), the output and the gradients of q, k, v, gamma and of the maps'
    parameters equal the reference's on the mapped features."""
    monkeypatch.setattr(chunked, "GROUP_SCORE_ELEMENTS", 1)  # one block of 8 per group
    shape = kit.Shape(2, T, 2, 8, 4)
    q, k, v = kit.qkv(shape, torch.float64)
    gamma = _features(shape, torch.float64)[2]
    mq, mk = _Map(2, 8, FEAT, torch.float64, 1), _Map(2, 8, FEAT, torch.float64, 2)
    y = window_linear_attention_chunked(q, k, v, mq, mk, window=window, gamma=gamma, block=8)
    y_ref = window_linear_attention_ref(q, k, v, mq(q), mk(k), window=window, gamma=gamma)
    kit.close(y, y_ref, "y")
    leaves = [q, k, v, gamma, mq.weight, mk.weight]
    for name, a, b in zip(["q", "k", "v", "gamma", "Wq", "Wk"], kit.grads([y], leaves),
                          kit.grads([y_ref], leaves)):
        kit.close(a, b, f"d{name}", floor=1.0 if name == "gamma" else 1e-3)
    state = K.window_linear_attention(q, k, v, mq, mk, window=window, gamma=gamma,
                                      output_final_state=True, backend="torch")[1]
    want = K.window_linear_attention(q, k, v, mq(q), mk(k), window=window, gamma=gamma,
                                     output_final_state=True, backend="torch")[1]
    for field, a, b in zip(want._fields, state, want):
        kit.close(a, b, f"state.{field}")


def test_chunked_half_inputs_stream_in_fp32(kit):
    """bf16 inputs: computed in fp32 group by group, the output in bf16 (no fp32 copy of
    the sequence, see the memory test): close to the fp64 reference at bf16 accuracy."""
    shape = kit.Shape(1, 70, 2, 8, 8)
    q, k, v = kit.qkv(shape, torch.bfloat16)
    fq, fk, gamma = _features(shape, torch.bfloat16)
    kit.compare(lambda *a: window_linear_attention_chunked(*a[:5], window=16, gamma=a[5], block=8),
                lambda *a: window_linear_attention_ref(*a[:5], window=16, gamma=a[5]),
                [q, k, v, fq, fk, gamma], ["q", "k", "v", "fq", "fk", "gamma"], ["y"],
                floors={"gamma": 1.0})


def _largest_intermediates(fn, leaves, T, states=None):
    """(whole-sequence tensors created in forward, in backward, the largest other tensor):
    whole-sequence = at least B * T * H elements; `states`: the shape of the hybrid's
    stack of group-start states (T / group of them, by design), left out."""
    seq = leaves[0].shape[0] * T * leaves[0].shape[2]
    do = None
    counts, largest = [], 0
    for phase in ("forward", "backward"):
        with Created() as rec:
            if phase == "forward":
                out = fn(*leaves)
            else:
                torch.autograd.grad(out, leaves, do)
        if do is None:
            do = torch.randn_like(out)
        sizes = [torch.Size(s).numel() for _, s in rec.tensors if s != states]
        counts.append(sum(n >= seq for n in sizes))
        largest = max([largest] + [n for n in sizes if n < seq])
    return counts, largest


def test_chunked_memory_is_one_group_not_the_sequence(monkeypatch):
    """Forward and backward of both window forms at T = 1K and 2K (the hybrid given its
    feature maps, as HybridWindow calls it): the only whole-sequence tensors created are
    the output (forward) and one gradient per input (backward): no feature tensor of the
    sequence (besides, the hybrid keeps its T / group states); every other tensor is a group's (one block x (block + window) scores here),
    the same at both T (the quadratic reference would hold T x T, a blockwise form
    T x window)."""
    monkeypatch.setattr(chunked, "GROUP_SCORE_ELEMENTS", 1 << 10)  # one block of 16 per group
    B, H, D, Fd, window, block = 1, 2, 8, 4, 16, 16
    per_group = B * H * block * (block + window)
    largest = {}
    for T in (1024, 2048):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, T, H, D, generator=g).requires_grad_() for _ in range(3))
        gamma = torch.full((H,), 0.1, requires_grad=True)
        mq, mk = _Map(H, D, Fd, torch.float32, 1), _Map(H, D, Fd, torch.float32, 2)
        swa = _largest_intermediates(
            lambda q, k, v: sliding_window_attention_chunked(q, k, v, window=window, block=block),
            [q, k, v], T)
        hybrid = _largest_intermediates(
            lambda q, k, v, gamma, wq, wk: window_linear_attention_chunked(
                q, k, v, mq, mk, window=window, gamma=gamma, block=block),
            [q, k, v, gamma, mq.weight, mk.weight], T, states=(T // block, B, H, Fd, D + 1))
        assert swa[0] == [1, 3] and hybrid[0] == [1, 3], (swa, hybrid)
        largest[T] = (swa[1], hybrid[1])
        assert max(largest[T]) <= 4 * per_group, (largest[T], per_group)
    assert largest[1024] == largest[2048]


def test_chunked_bad_arguments():
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="window"):
        sliding_window_attention_chunked(q, q, q, window=0)
    with pytest.raises(ValueError, match="shape mismatch"):
        sliding_window_attention_chunked(q, q[:, :, :1], q)
    with pytest.raises(ValueError, match="feature shape"):
        window_linear_attention_chunked(q, q, q, q, q[..., :2], gamma=torch.ones(2))


# ---- recurrent steps ----------------------------------------------------------------------

STEP_WINDOWS = [5, 256]  # shorter than most T (tokens leave the window), longer than every T


@pytest.mark.parametrize("window", STEP_WINDOWS, ids=[f"W{w}" for w in STEP_WINDOWS])
def test_steps_sliding_window_match_reference(kit, shape, dtype, window):
    """sliding_window_attention_step token by token: outputs and every gradient."""
    q, k, v = kit.qkv(shape, dtype)

    def steps(q, k, v):
        o, _ = kit.steps(sliding_window_attention_step,
                         [q, kit.heads(k, shape), kit.heads(v, shape)], window=window)
        return o

    (o,) = kit.compare(steps, lambda q, k, v: sliding_window_attention_ref(
        q, kit.heads(k, shape), kit.heads(v, shape), window=window), [q, k, v],
        ["q", "k", "v"], ["o"])
    assert o.dtype == dtype


@pytest.mark.parametrize("window", STEP_WINDOWS, ids=[f"W{w}" for w in STEP_WINDOWS])
def test_steps_hybrid_match_reference(kit, shape, dtype, window):
    """window_linear_attention_step token by token (tokens leaving the window fold into
    kv): outputs and every gradient."""
    q, k, v = kit.qkv(shape, dtype)
    fq, fk, gamma = _features(shape, dtype)

    def steps(q, k, v, fq, fk, gamma):
        o, _ = kit.steps(window_linear_attention_step,
                         [q, kit.heads(k, shape), kit.heads(v, shape), fq, fk], window=window,
                         gamma=gamma)
        return o

    def ref(q, k, v, fq, fk, gamma):
        return window_linear_attention_ref(q, kit.heads(k, shape), kit.heads(v, shape), fq, fk,
                                           window=window, gamma=gamma)

    kit.compare(steps, ref, [q, k, v, fq, fk, gamma], ["q", "k", "v", "fq", "fk", "gamma"],
                ["y"], floors={"gamma": 1.0})


@pytest.mark.parametrize("T0", [0, 1, 29], ids=lambda t: f"prefill{t}")
@pytest.mark.parametrize("kind", ["sliding-window", "window-linear"])
def test_prefill_then_decode(kit, dtype, kind, T0):
    """The blockwise form (public API, backend torch) prefills T0 tokens and hands over its
    WindowCache / WindowState; steps decode the rest: outputs and the final decode state
    equal one call."""
    shape, window = kit.Shape(2, 45, 3, 8, 4), 8
    q, k, v = (x.detach() for x in kit.qkv(shape, dtype))
    if kind == "sliding-window":
        kit.handoff(lambda q, k, v: K.sliding_window_attention(
                        q, k, v, window=window, output_final_state=True, chunk_size=16,
                        backend="torch"),
                    sliding_window_attention_step, [q, k, v], T0, window=window)
        return
    fq, fk, _ = (x.detach() for x in _features(shape, dtype))
    gamma = torch.tensor([0.1, 0.5, 0.9], dtype=dtype)
    kit.handoff(lambda q, k, v, fq, fk: K.window_linear_attention(
                    q, k, v, fq, fk, window=window, gamma=gamma, output_final_state=True,
                    chunk_size=16, backend="torch"),
                window_linear_attention_step, [q, k, v, fq, fk], T0, window=window, gamma=gamma)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("T0", [3, 8, 29], ids=lambda t: f"first{t}")  # <, =, > the window
@pytest.mark.parametrize("kind", ["sliding-window", "window-linear"])
def test_prefill_continues_in_chunks_from_a_state(kit, kind, T0, backend):
    """A prefill in two calls, the second given the first's final state (initial_state):
    the outputs, the final state and every gradient (through the handed-over state too)
    equal one call over all the tokens."""
    shape, window = kit.Shape(2, 45, 3, 8, 4), 8
    q, k, v = (x.detach().requires_grad_() for x in kit.qkv(shape, torch.float64))
    if kind == "sliding-window":
        leaves = [q, k, v]

        def call(q, k, v, state=None):
            return K.sliding_window_attention(q, k, v, window=window, output_final_state=True,
                                              initial_state=state, chunk_size=16, backend=backend)
    else:
        fq, fk, gamma = _features(shape, torch.float64)
        leaves = [q, k, v, fq, fk, gamma]

        def call(q, k, v, fq, fk, gamma, state=None):
            return K.window_linear_attention(q, k, v, fq, fk, window=window, gamma=gamma,
                                             output_final_state=True, initial_state=state,
                                             chunk_size=16, backend=backend)
    o_full, s_full = call(*leaves)
    o1, s1 = call(*(x if x.dim() == 1 else x[:, :T0] for x in leaves))
    o2, s2 = call(*(x if x.dim() == 1 else x[:, T0:] for x in leaves), state=s1)
    o = torch.cat([o1, o2], 1)
    tol = 1e-10 if kind == "sliding-window" else 1e-5  # the hybrid's linear state is fp32
    torch.testing.assert_close(o, o_full, rtol=tol, atol=tol)
    for a, b in zip(s2, s_full):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    dy = torch.randn(o.shape, generator=torch.Generator().manual_seed(3), dtype=o.dtype)
    got = torch.autograd.grad((o * dy).sum(), leaves)
    want = torch.autograd.grad((o_full * dy).sum(), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize("T0", [5, 29])
def test_triton_hybrid_continues_from_a_linear_state(T0):
    """The Triton hybrid's `initial_kv` (interpreter on CPU): the second half of a sequence
    from the state of the first equals one call."""
    tri = _triton()
    g = torch.Generator().manual_seed(0)
    B, T, H, D, Fd, W = 1, 40, 2, 16, 8, 8
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    fq, fk = (torch.randn(B, T, H, Fd, generator=g).softmax(-1) for _ in range(2))
    gamma = torch.tensor([0.3, 2.0])
    full = tri.window_linear_attention(q, k, v, fq, fk, window=W, gamma=gamma)
    _, state = K.window_linear_attention(q[:, :T0], k[:, :T0], v[:, :T0], fq[:, :T0], fk[:, :T0],
                                         window=W, gamma=gamma, output_final_state=True,
                                         backend="torch")
    n = state.k.shape[1]
    ext = [torch.cat([a, b[:, T0:]], 1) for a, b in ((state.k, k), (state.v, v), (state.fk, fk))]
    qe = torch.cat([torch.zeros(B, n, H, D), q[:, T0:]], 1)
    fqe = torch.cat([torch.zeros(B, n, H, Fd), fq[:, T0:]], 1)
    rest = tri.window_linear_attention(qe, ext[0], ext[1], fqe, ext[2], window=W, gamma=gamma,
                                       initial_kv=state.kv)[:, n:]
    torch.testing.assert_close(rest, full[:, T0:], rtol=1e-4, atol=1e-5)


def test_step_caches_stay_bounded(kit):
    shape = kit.Shape(2, 20, 3, 8, 4)
    q, k, v = (x.detach() for x in kit.qkv(shape, torch.float32))
    fq, fk, _ = (x.detach() for x in _features(shape, torch.float32))
    gamma = torch.full((3,), 0.5)
    _, cache = kit.steps(sliding_window_attention_step, [q, k, v], window=4)
    _, state = kit.steps(window_linear_attention_step, [q, k, v, fq, fk], window=4, gamma=gamma)
    assert cache.k.shape == (2, 4, 3, 8) and state.fk.shape == (2, 4, 3, FEAT)
    assert state.kv.shape == (2, 3, FEAT, 4 + 1) and state.kv.dtype == torch.float32
    assert torch.allclose(state.kv[..., -1], fk[:, :16].sum(1))


# ---- Triton -------------------------------------------------------------------------------

TRITON_DTYPES = [torch.float32, torch.float16]
TRITON_TOL = {torch.float32: 2e-5, torch.float16: 5e-3}  # max error / max |reference|
# (B, T, H, K, V, window, scale, blocks): T never a multiple of the block; window 24 is
# not a multiple of it, window 1 is the degenerate band, window > T the causal limit.
TRITON_SHAPES = {
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
        tol = TRITON_TOL[dtype] * (loosen or {}).get(name, 1)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def _triton_inputs(shape, dtype, gqa=False, seed=0):
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


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", list(TRITON_SHAPES.values()), ids=list(TRITON_SHAPES))
def test_triton_sliding_window_matches_reference(shape, dtype):
    torch.manual_seed(0)  # the random cotangents
    window, scale, blocks = shape[5:]
    leaves, (q, k, v) = _triton_inputs(shape, dtype)
    o = _triton().sliding_window_attention(q, k, v, window=window, scale=scale, _blocks=blocks)
    assert o.dtype == dtype
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, leaves, do)
    o_ref = sliding_window_attention_ref(q, k, v, window=window, scale=scale)
    refs = torch.autograd.grad(o_ref, leaves, do)
    _assert_close([o, *grads], [o_ref, *refs], dtype, ["o", "dq", "dk", "dv"])


def test_triton_sliding_window_gqa_repeated_keys():
    shape = (1, 70, 4, 32, 32, 24)
    leaves, (q, k, v) = _triton_inputs(shape, torch.float32, gqa=True)
    o = _triton().sliding_window_attention(q, k, v, window=24)
    grads = torch.autograd.grad(o.square().sum(), leaves)
    o_ref = sliding_window_attention_ref(q, k, v, window=24)
    refs = torch.autograd.grad(o_ref.square().sum(), leaves)
    _assert_close([o, *grads], [o_ref, *refs], torch.float32, ["o", "dq", "dk", "dv"])


def test_triton_window_stats_and_their_gradients():
    """(o, lse, m) of the autograd Function, with cotangents on all three, vs torch.

    The m cotangent must reach only the score of the arg-max key, as amax's does."""
    torch.manual_seed(0)  # the random cotangents
    B, T, H, K, V, window = 1, 90, 2, 32, 16, 24
    leaves, (q, k, v) = _triton_inputs((B, T, H, K, V), torch.float32, seed=1)
    o, lse, m = _triton()._SlidingWindow.apply(q, k, v, window, K ** -0.5, torch.float32, (32, 32))
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
    assert _rel_err(dq_nom, refs[0]) > 100 * TRITON_TOL[torch.float32]


def _band(T, window):
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return ((j <= i) & (j > i - window)).to(DEVICE)


TRITON_HYBRID = {
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
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", list(TRITON_HYBRID.values()), ids=list(TRITON_HYBRID))
def test_triton_hybrid_matches_reference(shape, dtype, linear):
    """Each linear-branch implementation that imports (Triton, torch chunked)."""
    torch.manual_seed(0)  # the random cotangents
    if _triton()._linear_impl(linear) is None:
        pytest.skip(f"linear branch '{linear}' is not importable")
    window = shape[-1]
    ins = _hybrid_inputs(shape, dtype)
    q, k, v, fq, fk, gamma = ins
    y = _triton().window_linear_attention(q, k, v, fq, fk, window=window, gamma=gamma,
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


@pytest.mark.parametrize("window,group", [(8, 7), (1, 16)], ids=["W8-group7", "W1-group16"])
def test_triton_hybrid_streamed_groups(window, group):
    """Groups shorter than the window and than T (not a multiple of them): each group's
    band kernel and linear branch from the carried state, recomputed in the backward,
    equal the reference (outputs and every gradient); GQA keys through a stride-0 view."""
    torch.manual_seed(0)  # the random cotangents
    B, T, H, K, V, Fd = 1, 30, 2, 16, 16, 16
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, T, H, K, generator=g)
    k, v = torch.randn(B, T, 1, K, generator=g), torch.randn(B, T, 1, V, generator=g)
    fq, fk = (torch.randn(B, T, H, Fd, generator=g).softmax(-1) for _ in range(2))
    ins = [x.to(DEVICE).requires_grad_() for x in (q, k, v, fq, fk)]
    gamma = torch.tensor([0.2, 0.6], device=DEVICE).requires_grad_()
    q, k, v, fq, fk = ins
    k, v = k.expand(-1, -1, H, -1), v.expand(-1, -1, H, -1)
    y = _triton().window_linear_attention(q, k, v, fq, fk, window=window, gamma=gamma,
                                          _group=group, _blocks=(16, 16))
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, ins + [gamma], dy)
    y_ref = window_linear_attention_ref(q, k, v, fq, fk, window=window, gamma=gamma)
    refs = torch.autograd.grad(y_ref, ins + [gamma], dy)
    _assert_close([y, *grads], [y_ref, *refs], torch.float32,
                  ["y", "dq", "dk", "dv", "dfq", "dfk", "dgamma"], floors={"dgamma": 1.0},
                  loosen={"dgamma": 10})


def test_triton_bad_window_and_shapes_raise():
    q = torch.randn(1, 8, 1, 16)
    with pytest.raises(ValueError, match="window"):
        _triton().sliding_window_attention(q, q, q, window=0)
    with pytest.raises(ValueError, match="shape"):
        _triton().sliding_window_attention(q, q[:, :, :, :8], q)
