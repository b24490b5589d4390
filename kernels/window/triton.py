"""Sliding-window softmax attention (Triton, forward + backward) and the LoLCATs hybrid.

Query i attends to keys j in (i - window, i]. The forward is FlashAttention-style (online
softmax over the key blocks of the band, Dao et al. 2022) and also stores, per query, the
log-sum-exp `lse` and the row max `m` with the key index where it sits; the backward
recomputes the probabilities from `lse` in two kernels (FlashAttention-2, arXiv
2307.08691): one owns a query block and writes dq, one owns a key block and writes
dk, dv. Work O(T * window), extra memory O(T).

`window_linear_attention` (LoLCATs, arXiv 2410.10254) composes that kernel with a causal
linear attention, group by group over the sequence (linbench.kernels.window.stream: peak
memory inputs + output + one group): see its docstring for which code path runs the
linear branch.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from linbench.kernels.common import augment_ones, check_positive, check_shapes, default_scale
from linbench.kernels.triton_common import INTERPRET, mm, pow2, tile
from linbench.kernels.window.chunked import check_features, feature_dim
from linbench.kernels.window.stream import streamed

# Fixed launch config (no autotuner: it does not run under the CPU interpreter).
_BLOCK_M, _BLOCK_N = (32, 32) if INTERPRET else (64, 64)
# Token-heads (B * H * tokens) per group of the hybrid's streamed form: its fp32 group
# intermediates are ~10 x this x the head dim x 4 bytes (5 GB at 2^20 and D = 128).
GROUP_TOKEN_HEADS = 1 << 20


def _num_warps(dk: int, dv: int) -> int:
    """4 warps, 8 for head dims >= 128 (untuned guess: not yet timed on a GPU)."""
    return 8 if max(dk, dv) >= 128 else 4


@triton.jit
def _band(rows, cols, T, WINDOW):
    """(rows, cols) mask: key `cols` is among the last WINDOW keys of query `rows`."""
    return (cols[None, :] <= rows[:, None]) & (cols[None, :] > rows[:, None] - WINDOW) \
        & (cols[None, :] < T)


@triton.jit
def _keys_of(pid_m, BM: tl.constexpr, BN: tl.constexpr, T, WINDOW):
    """[lo, hi): the key blocks (BN-aligned) that query block pid_m can see."""
    lo = (tl.maximum(pid_m * BM - WINDOW + 1, 0) // BN) * BN
    hi = tl.minimum((pid_m + 1) * BM, T)
    return lo, hi


@triton.jit
def _swa_fwd_kernel(Q, K, V, O, LSE, M, IDX, T, H, scale, WINDOW,
                    DK: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, STORE_MAX: tl.constexpr,
                    PREC: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rm = pid_m * BM + tl.arange(0, BM)
    rn = tl.arange(0, BN)
    # (B, T, H, D) tiles via tile(): int64 offsets (B*T*H*D can pass 2^31) and mask
    q_off, q_mask = tile(b, h, pid_m * BM, T, H, DK, BM, BK, 0)
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)  # (BM, BK)
    m_i = tl.full([BM], -1e30, tl.float32)  # finite start: fully masked blocks stay NaN-free
    l_i = tl.zeros([BM], tl.float32)
    idx = tl.zeros([BM], tl.int32)
    acc = tl.zeros([BM, BV], tl.float32)
    lo, hi = _keys_of(pid_m, BM, BN, T, WINDOW)
    for start_n in range(lo, hi, BN):
        cols = start_n + rn
        k_off, k_mask = tile(b, h, start_n, T, H, DK, BN, BK, 0)
        k = tl.load(K + k_off, mask=k_mask, other=0.0)  # (BN, BK)
        s = mm(q, tl.trans(k), PREC) * scale  # (BM, BN) fp32
        s = tl.where(_band(rm, cols, T, WINDOW), s, float("-inf"))
        m_blk = tl.max(s, 1)
        if STORE_MAX:
            idx = tl.where(m_blk > m_i, tl.argmax(s, 1) + start_n, idx)
        m_new = tl.maximum(m_i, m_blk)
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_off, v_mask = tile(b, h, start_n, T, H, DV, BN, BV, 0)
        v = tl.load(V + v_off, mask=v_mask, other=0.0)  # (BN, BV)
        acc = acc * alpha[:, None] + mm(p.to(v.dtype), v, PREC)
        m_i = m_new
    l_i = tl.where(l_i > 0, l_i, 1.0)  # only rows past T can be empty
    o = acc / l_i[:, None]
    o_off, o_mask = tile(b, h, pid_m * BM, T, H, DV, BM, BV, 0)
    tl.store(O + o_off, o.to(O.dtype.element_ty), mask=o_mask)
    row = bh * T + rm  # (B, H, T) row statistics
    tl.store(LSE + row, m_i + tl.log(l_i), mask=rm < T)
    if STORE_MAX:
        tl.store(M + row, m_i, mask=rm < T)
        tl.store(IDX + row, idx, mask=rm < T)


@triton.jit
def _swa_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DM, IDX, DQ, T, H, scale, WINDOW,
                       DK: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, HAS_DM: tl.constexpr,
                       PREC: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rm = pid_m * BM + tl.arange(0, BM)
    rn = tl.arange(0, BN)
    q_off, q_mask = tile(b, h, pid_m * BM, T, H, DK, BM, BK, 0)
    do_off, do_mask = tile(b, h, pid_m * BM, T, H, DV, BM, BV, 0)
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)  # (BM, BK)
    do = tl.load(DO + do_off, mask=do_mask, other=0.0)  # (BM, BV)
    row = bh * T + rm
    lse = tl.load(LSE + row, mask=rm < T, other=0.0)
    delta = tl.load(DELTA + row, mask=rm < T, other=0.0)
    if HAS_DM:
        dm = tl.load(DM + row, mask=rm < T, other=0.0)
        idx = tl.load(IDX + row, mask=rm < T, other=-1)
    dq = tl.zeros([BM, BK], tl.float32)
    lo, hi = _keys_of(pid_m, BM, BN, T, WINDOW)
    for start_n in range(lo, hi, BN):
        cols = start_n + rn
        k_off, k_mask = tile(b, h, start_n, T, H, DK, BN, BK, 0)
        k = tl.load(K + k_off, mask=k_mask, other=0.0)  # (BN, BK)
        v_off, v_mask = tile(b, h, start_n, T, H, DV, BN, BV, 0)
        v = tl.load(V + v_off, mask=v_mask, other=0.0)  # (BN, BV)
        s = mm(q, tl.trans(k), PREC) * scale
        p = tl.exp(tl.where(_band(rm, cols, T, WINDOW), s - lse[:, None], float("-inf")))
        dp = mm(do, tl.trans(v), PREC)  # (BM, BN)
        ds = p * (dp - delta[:, None])
        if HAS_DM:  # d m_i lands on the score of the key holding the max
            ds += tl.where(cols[None, :] == idx[:, None], dm[:, None], 0.0)
        dq += mm(ds.to(k.dtype), k, PREC)
    tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _swa_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DM, IDX, DK_, DV_, T, H, scale, WINDOW,
                         DK: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr,
                         BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                         HAS_DM: tl.constexpr, PREC: tl.constexpr):
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rn = pid_n * BN + tl.arange(0, BN)
    rm0 = tl.arange(0, BM)
    k_off, k_mask = tile(b, h, pid_n * BN, T, H, DK, BN, BK, 0)
    v_off, v_mask = tile(b, h, pid_n * BN, T, H, DV, BN, BV, 0)
    k = tl.load(K + k_off, mask=k_mask, other=0.0)  # (BN, BK)
    v = tl.load(V + v_off, mask=v_mask, other=0.0)  # (BN, BV)
    dk = tl.zeros([BN, BK], tl.float32)
    dv = tl.zeros([BN, BV], tl.float32)
    lo = (pid_n * BN // BM) * BM
    hi = tl.minimum(pid_n * BN + BN - 1 + WINDOW, T)  # last query that sees key n: n+W-1
    for start_m in range(lo, hi, BM):
        rm = start_m + rm0
        q_off, q_mask = tile(b, h, start_m, T, H, DK, BM, BK, 0)
        q = tl.load(Q + q_off, mask=q_mask, other=0.0)  # (BM, BK)
        do_off, do_mask = tile(b, h, start_m, T, H, DV, BM, BV, 0)
        do = tl.load(DO + do_off, mask=do_mask, other=0.0)  # (BM, BV)
        row = bh * T + rm
        lse = tl.load(LSE + row, mask=rm < T, other=0.0)
        delta = tl.load(DELTA + row, mask=rm < T, other=0.0)
        s_t = mm(k, tl.trans(q), PREC) * scale  # (BN, BM): scores transposed
        band_t = tl.trans(_band(rm, rn, T, WINDOW))
        p_t = tl.exp(tl.where(band_t, s_t - lse[None, :], float("-inf")))
        dv += mm(p_t.to(do.dtype), do, PREC)
        ds_t = p_t * (mm(v, tl.trans(do), PREC) - delta[None, :])
        if HAS_DM:
            dm = tl.load(DM + row, mask=rm < T, other=0.0)
            idx = tl.load(IDX + row, mask=rm < T, other=-1)
            ds_t += tl.where(rn[:, None] == idx[None, :], dm[None, :], 0.0)
        dk += mm(ds_t.to(q.dtype), q, PREC)
    tl.store(DK_ + k_off, (dk * scale).to(DK_.dtype.element_ty), mask=k_mask)
    tl.store(DV_ + v_off, dv.to(DV_.dtype.element_ty), mask=v_mask)


def _prec(x: torch.Tensor) -> str:
    """fp32 inputs get full-precision dots (matches the fp32 reference); half types use
    the tensor cores as usual ("tf32" is the default and only affects fp32 operands)."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


class _SlidingWindow(torch.autograd.Function):
    """(q, k, v) -> (o, lse, m); o in `out_dtype`, lse and m fp32 (B, H, T).

    The gradient of m goes to the score of the first key holding the max (torch's amax
    splits it between exact ties, which real-valued inputs practically never have)."""

    @staticmethod
    def forward(ctx, q, k, v, window, scale, out_dtype, blocks):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, T, H, DK = q.shape
        DV = v.shape[-1]
        bm, bn = blocks
        o = torch.empty(B, T, H, DV, device=q.device, dtype=out_dtype)
        lse, m = (torch.empty(B, H, T, device=q.device, dtype=torch.float32) for _ in range(2))
        idx = torch.empty(B, H, T, device=q.device, dtype=torch.int32)
        _swa_fwd_kernel[(triton.cdiv(T, bm), B * H)](
            q, k, v, o, lse, m, idx, T, H, scale, window, DK=DK, DV=DV, BM=bm, BN=bn,
            BK=pow2(DK), BV=pow2(DV), STORE_MAX=True, PREC=_prec(q),
            num_warps=_num_warps(DK, DV))
        ctx.save_for_backward(q, k, v, o, lse, idx)
        ctx.cfg = (window, scale, blocks)
        return o, lse, m

    @staticmethod
    def backward(ctx, do, dlse, dm):
        q, k, v, o, lse, idx = ctx.saved_tensors
        window, scale, (bm, bn) = ctx.cfg
        B, T, H, DK = q.shape
        DV = v.shape[-1]
        do = torch.zeros_like(o) if do is None else do
        # delta_i = do_i . o_i - dlse_i   (d lse_i adds p_ij to every ds_ij)
        delta = torch.einsum("bthv,bthv->bht", do.float(), o.float())
        if dlse is not None:
            delta = delta - dlse.float()
        delta = delta.contiguous()
        do = do.to(v.dtype).contiguous()
        has_dm = dm is not None
        dm = dm.float().contiguous() if has_dm else lse  # dummy pointer when unused
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = dict(DK=DK, DV=DV, BM=bm, BN=bn, BK=pow2(DK), BV=pow2(DV), HAS_DM=has_dm,
                      PREC=_prec(q), num_warps=_num_warps(DK, DV))
        _swa_bwd_dq_kernel[(triton.cdiv(T, bm), B * H)](
            q, k, v, do, lse, delta, dm, idx, dq, T, H, scale, window, **common)
        _swa_bwd_dkdv_kernel[(triton.cdiv(T, bn), B * H)](
            q, k, v, do, lse, delta, dm, idx, dk, dv, T, H, scale, window, **common)
        return dq, dk, dv, None, None, None, None


def sliding_window_attention(q, k, v, *, window=64, scale=None, _blocks=None):
    """Softmax attention over the last `window` keys, current token included.

    q, k: (B, T, H, K); v: (B, T, H, V) -> o (B, T, H, V) in v's dtype.
    """
    check_positive(window=window)
    check_shapes(q, k, v)
    scale = default_scale(q, scale)
    o, _, _ = _SlidingWindow.apply(q, k, v, window, scale, v.dtype,
                                   _blocks or (_BLOCK_M, _BLOCK_N))
    return o


def _linear_impl(name: str):
    """Causal linear attention `fn(fq, fk, v_aug, s0) -> (o, final state)`: "triton" or
    "chunked", or None when that module does not import."""
    try:
        if name == "triton":
            from linbench.kernels.linear.triton import linear_attention as fn
        else:
            from linbench.kernels.linear.chunked import linear_attention_chunked as fn
    except ImportError:
        return None
    return lambda fq, fk, v, s0: fn(fq, fk, v, decay=None, normalize=False, scale=1.0,
                                    initial_state=s0, output_final_state=True)


def _causal_linear(fq, fk, v_aug, s0, prefer=("triton", "chunked")):
    """(sum_{j <= i} (fq_i . fk_j) v_aug_j + fq_i S0, S_final) with the first importable
    implementation."""
    for name in prefer:
        fn = _linear_impl(name)
        if fn is not None:
            return fn(fq, fk, v_aug, s0)
    raise ImportError(f"no linear attention implementation among {prefer}")


def _hybrid_group(q, k, v, fq, fk, gamma, S, lead, *, window, scale, eps, blocks, linear):
    """One group of the hybrid (linbench.kernels.window.stream): queries q, fq (B, L, H, .),
    keys k, v, fk (B, lead + L, H, .) starting `lead` tokens before them; S (B, H, F, V + 1)
    fp32 sums fk_j [v_j, 1] over keys j < s - window (s: the group's first query).

    Window: the band kernel over the keys, the queries zero-padded in front to line up
    (the `lead` padded rows are computed and dropped). Linear: keys shifted by `window`.
    """
    L, DV = q.shape[1], v.shape[-1]
    q_ext = F.pad(q, (0, 0, 0, 0, lead, 0))
    o_w, lse, m = _SlidingWindow.apply(q_ext, k, v, window, scale, torch.float32, blocks)
    o_w = o_w[:, lead:]  # (B, L, H, V)
    e = torch.exp(lse - m).transpose(1, 2)[:, lead:, :, None]  # window sum of exp(s - m)
    g_w = gamma.float()[None, None, :, None] * e
    num, den = g_w * o_w, g_w
    if lead + L > window:  # the group's queries reach keys before their window
        shift = (0, 0, 0, 0, window - lead, 0)  # key i - window for query i
        fk_s = F.pad(fk.float(), shift)[:, :L]
        v_s = F.pad(augment_ones(v.float()), shift)[:, :L]
        lin, S = _causal_linear(fq.float().contiguous(), fk_s.contiguous(), v_s.contiguous(),
                                S, linear)
        num, den = num + lin[..., :DV].float(), den + lin[..., DV:].float()
    return num / (den + eps), S


def window_linear_attention(q, k, v, fq, fk, *, window=64, gamma, scale=None, eps=1e-6,
                            initial_kv=None, _blocks=None, _linear=("triton", "chunked"),
                            _group=None):
    """LoLCATs sliding-window + linear hybrid (arXiv 2410.10254), one shared normalizer:
    a_ij = gamma_h exp(scale q_i.k_j - m_i) on the last `window` keys, fq_i.fk_j on older
    keys; y_i = sum_j a_ij v_j / (sum_j a_ij + eps), m_i the window max (not detached).
    fq, fk: (B, T, H, F) features or the feature maps (applied group by group).

    Streamed over groups of queries (linbench.kernels.window.stream; about
    GROUP_TOKEN_HEADS token-heads each, `_group` tokens when given): per group, window
    branch: the Triton kernel above returns o_w (fp32), lse and m, so the window's
    numerator is gamma e o_w and its denominator gamma e, with e = exp(lse - m).
    Linear branch: keys j <= i - window equal causal linear attention of fq against fk
    and [v, 1] shifted right by `window`, from the state of the keys before the group,
    computed in fp32 by `linbench.kernels.linear.triton.linear_attention(normalize=False,
    scale=1)` when that module imports, else by
    `linbench.kernels.linear.chunked.linear_attention_chunked` (torch); `_linear` names the
    order tried. Gradients: each group recomputed in backward, through torch autograd
    around the two kernels.
    """
    check_positive(window=window)
    check_shapes(q, k, v)
    check_features(q, fq, fk)
    scale = default_scale(q, scale)
    B, T, H, DV = v.shape
    W = max(1, min(int(window), T))
    group = _group or max(1, GROUP_TOKEN_HEADS // (B * H))
    fn = functools.partial(_hybrid_group, window=W, scale=scale, eps=eps,
                           blocks=_blocks or (_BLOCK_M, _BLOCK_N), linear=_linear)
    s0 = q.new_zeros(B, H, feature_dim(q, fq), DV + 1, dtype=torch.float32)
    if initial_kv is not None:  # the linear state of keys before q (a continued prefill)
        s0 = initial_kv.float()
    return streamed(fn, q, k, v, fq, fk, gamma, s0, window=W, group=group)
