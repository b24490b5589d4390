"""Chunked causal linear attention in Triton, optional fixed per-head decay and normalizer.

Lightning Attention-2 (Qin et al. 2024, arXiv 2401.04658), blocks of BT = 64 (the
paper's block size). For a chunk starting at t0 with local rows i, j and state S (the
state before the chunk), w = e^lam the per-head decay (lam <= 0 the log-decay):
    o     = scale [ (Q K^T * D) V + (w^(i+1) Q) S ],   D_ij = w^(i-j) for i >= j
    S    <- w^L S + (K * w^(L-1-j))^T V                (L: valid rows of the chunk)
Every exponent is lam times a non-negative count, so nothing overflows.

One program per (value block, batch*head) sweeps its chunks in order with its fp32 state
slice S (K, BV) in registers; no per-chunk state is ever written to memory. The backward
recomputes states instead of storing them:
  dq: forward sweep, per key block, S (BK, V) recomputed;
  dk: backward sweep, per key block, dS (BK, V) accumulated from the end;
  dv: backward sweep, per value block, dS (K, BV).
Both state recursions are separable along K and V, so no partial sums are needed.
The decay gradient (when decay requires grad) is accumulated directly in the dq sweep.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from linbench.kernels.common import check_shapes, default_scale
from linbench.kernels.triton_common import (dot_precision, init_state, load_tile, pow2,
                                            store_tile, tuned)

BT = 64  # chunk length: Lightning Attention-2's block size


@triton.jit
def _weights(lam, t0, T, BT: tl.constexpr, HAS_DECAY: tl.constexpr):
    """Decay weights of one chunk: intra D (BT, BT), query qd, key kd (BT,), state sd, and
    the number of valid rows L (fp32)."""
    i = tl.arange(0, BT)
    L = tl.minimum(T - t0, BT)  # valid rows of this chunk
    causal = i[:, None] >= i[None, :]
    if HAS_DECAY:
        dist = tl.maximum(i[:, None] - i[None, :], 0).to(tl.float32)  # (BT, BT)
        D = tl.where(causal, tl.exp(lam * dist), 0.0)
        qd = tl.exp(lam * (i + 1).to(tl.float32))
        kd = tl.where(i < L, tl.exp(lam * tl.maximum(L - 1 - i, 0).to(tl.float32)), 0.0)
        sd = tl.exp(lam * L.to(tl.float32))
    else:
        D = tl.where(causal, 1.0, 0.0)
        qd = tl.full((BT,), 1.0, tl.float32)
        kd = tl.where(i < L, 1.0, 0.0)
        sd = L.to(tl.float32) * 0.0 + 1.0
    return D, qd, kd, sd, L.to(tl.float32)


@tuned("BV", fixed=32)
@triton.jit
def _fwd(q, k, v, decay, s0, o, sT, T, scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
         BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DECAY: tl.constexpr,
         HAS_S0: tl.constexpr, STORE_FINAL: tl.constexpr, PREC: tl.constexpr):
    iv, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    # state slice (K, BV), fp32
    S, s_off, s_mask = init_state(s0, bh, K, V, BK, BV, 0, iv * BV, HAS_S0)
    lam = tl.load(decay + h).to(tl.float32) if HAS_DECAY else 0.0
    for n in range(0, tl.cdiv(T, BT)):
        t0 = n * BT
        bq = load_tile(q, b, h, t0, T, H, K, BT, BK, 0) * scale  # (BT, K)
        bk = load_tile(k, b, h, t0, T, H, K, BT, BK, 0)  # (BT, K)
        bv = load_tile(v, b, h, t0, T, H, V, BT, BV, iv * BV)  # (BT, BV)
        D, qd, kd, sd, L = _weights(lam, t0, T, BT, HAS_DECAY)
        A = tl.dot(bq, tl.trans(bk), input_precision=PREC) * D  # (BT, BT)
        out = tl.dot(A, bv, input_precision=PREC)
        out += tl.dot(bq * qd[:, None], S, input_precision=PREC)
        store_tile(o, out, b, h, t0, T, H, V, BT, BV, iv * BV)
        S = S * sd + tl.dot(tl.trans(bk * kd[:, None]), bv, input_precision=PREC)
    if STORE_FINAL:
        tl.store(sT + s_off, S, mask=s_mask)


@tuned("BK", fixed=32, zero=("dlam",))
@triton.jit
def _bwd_dq(q, k, v, decay, s0, dsT, do, dq, dlam, T, scale, H: tl.constexpr, K: tl.constexpr,
            V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
            HAS_DECAY: tl.constexpr, HAS_S0: tl.constexpr, HAS_DST: tl.constexpr,
            WANT_DLAM: tl.constexpr, PREC: tl.constexpr):
    """dq = scale [ (dO V^T * D) K + w^(i+1) dO S^T ], S recomputed in a forward sweep.

    WANT_DLAM: also this key block's share of dL/dlam, directly (no cancelling identity):
    with S' = dS/dlam (S'_t = w S'_{t-1} + w S_{t-1}), per chunk
      intra  sum_ij dA_ij (scale Q K^T * D)_ij (i - j)
      inter  sum_i dO_i . scale w^(i+1) ((i + 1) q_i S + q_i S')
      final  sum dS_T * S'_T.
    """
    ik, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    S, s_off, s_mask = init_state(s0, bh, K, V, BK, BV, ik * BK, 0, HAS_S0)  # (BK, V)
    lam = tl.load(decay + h).to(tl.float32) if HAS_DECAY else 0.0
    i = tl.arange(0, BT)
    dist = tl.maximum(i[:, None] - i[None, :], 0).to(tl.float32)  # (BT, BT)
    Sd = tl.zeros((BK, BV), tl.float32)  # S' = dS/dlam
    acc_a = tl.zeros((BT, BT), tl.float32)
    acc_o = tl.zeros((BT, BV), tl.float32)
    for n in range(0, tl.cdiv(T, BT)):
        t0 = n * BT
        bk = load_tile(k, b, h, t0, T, H, K, BT, BK, ik * BK)  # (BT, BK)
        bv = load_tile(v, b, h, t0, T, H, V, BT, BV, 0)  # (BT, V)
        bdo = load_tile(do, b, h, t0, T, H, V, BT, BV, 0)  # (BT, V)
        D, qd, kd, sd, L = _weights(lam, t0, T, BT, HAS_DECAY)
        dA = tl.dot(bdo, tl.trans(bv), input_precision=PREC)  # (BT, BT)
        out = tl.dot(dA * D, bk, input_precision=PREC)
        out += tl.dot(bdo, tl.trans(S), input_precision=PREC) * qd[:, None]
        store_tile(dq, out * scale, b, h, t0, T, H, K, BT, BK, ik * BK)
        if WANT_DLAM:
            bq = load_tile(q, b, h, t0, T, H, K, BT, BK, ik * BK) * scale  # (BT, BK)
            acc_a += dA * tl.dot(bq, tl.trans(bk), input_precision=PREC) * D * dist
            bqd = bq * qd[:, None]
            X = tl.dot(bqd, S, input_precision=PREC) * (i + 1).to(tl.float32)[:, None]
            acc_o += (X + tl.dot(bqd, Sd, input_precision=PREC)) * bdo
            wk = bk * (kd * (L - 1.0 - i.to(tl.float32)))[:, None]  # kd is 0 past row L-1
            Sd = (Sd + L * S) * sd + tl.dot(tl.trans(wk), bv, input_precision=PREC)
        S = S * sd + tl.dot(tl.trans(bk * kd[:, None]), bv, input_precision=PREC)
    if WANT_DLAM:
        total = tl.sum(tl.sum(acc_a, 1), 0) + tl.sum(tl.sum(acc_o, 1), 0)
        if HAS_DST:
            total += tl.sum(tl.sum(tl.load(dsT + s_off, mask=s_mask, other=0.0) * Sd, 1), 0)
        tl.store(dlam + ik * tl.num_programs(1) + bh, total)


@tuned("BK", fixed=32)
@triton.jit
def _bwd_dk(q, v, decay, dsT, do, dk, ds0, T, scale, H: tl.constexpr, K: tl.constexpr,
            V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
            HAS_DECAY: tl.constexpr, HAS_DST: tl.constexpr, STORE_DS0: tl.constexpr,
            PREC: tl.constexpr):
    """dk = scale (dO V^T * D)^T Q + kd (V dS^T), dS swept from the last chunk to the first."""
    ik, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    # gradient of the state after the chunk (BK, V)
    dS, s_off, s_mask = init_state(dsT, bh, K, V, BK, BV, ik * BK, 0, HAS_DST)
    lam = tl.load(decay + h).to(tl.float32) if HAS_DECAY else 0.0
    NT = tl.cdiv(T, BT)
    for r in range(0, NT):
        t0 = (NT - 1 - r) * BT
        bq = load_tile(q, b, h, t0, T, H, K, BT, BK, ik * BK) * scale  # (BT, BK)
        bv = load_tile(v, b, h, t0, T, H, V, BT, BV, 0)  # (BT, V)
        bdo = load_tile(do, b, h, t0, T, H, V, BT, BV, 0)  # (BT, V)
        D, qd, kd, sd, L = _weights(lam, t0, T, BT, HAS_DECAY)
        dA = tl.dot(bdo, tl.trans(bv), input_precision=PREC) * D  # (BT_i, BT_j)
        out = tl.dot(tl.trans(dA), bq, input_precision=PREC)
        out += tl.dot(bv, tl.trans(dS), input_precision=PREC) * kd[:, None]
        store_tile(dk, out, b, h, t0, T, H, K, BT, BK, ik * BK)
        dS = dS * sd + tl.dot(tl.trans(bq * qd[:, None]), bdo, input_precision=PREC)
    if STORE_DS0:
        tl.store(ds0 + s_off, dS, mask=s_mask)


@tuned("BV", fixed=32)
@triton.jit
def _bwd_dv(q, k, decay, dsT, do, dv, T, scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
            BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DECAY: tl.constexpr,
            HAS_DST: tl.constexpr, PREC: tl.constexpr):
    """dv = scale (Q K^T * D)^T dO + (K * kd) dS, dS swept from the last chunk to the first."""
    iv, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    dS, s_off, s_mask = init_state(dsT, bh, K, V, BK, BV, 0, iv * BV, HAS_DST)  # (K, BV)
    lam = tl.load(decay + h).to(tl.float32) if HAS_DECAY else 0.0
    NT = tl.cdiv(T, BT)
    for r in range(0, NT):
        t0 = (NT - 1 - r) * BT
        bq = load_tile(q, b, h, t0, T, H, K, BT, BK, 0) * scale  # (BT, K)
        bk = load_tile(k, b, h, t0, T, H, K, BT, BK, 0)  # (BT, K)
        bdo = load_tile(do, b, h, t0, T, H, V, BT, BV, iv * BV)  # (BT, BV)
        D, qd, kd, sd, L = _weights(lam, t0, T, BT, HAS_DECAY)
        A = tl.dot(bq, tl.trans(bk), input_precision=PREC) * D  # (BT_i, BT_j)
        out = tl.dot(tl.trans(A), bdo, input_precision=PREC)
        out += tl.dot(bk * kd[:, None], dS, input_precision=PREC)
        store_tile(dv, out, b, h, t0, T, H, V, BT, BV, iv * BV)
        dS = dS * sd + tl.dot(tl.trans(bq * qd[:, None]), bdo, input_precision=PREC)


def _common(q, v, decay, chunk):
    B, T, H, K = q.shape
    V = v.shape[-1]
    return B, T, H, K, V, dict(T=T, H=H, K=K, V=V, BT=chunk, HAS_DECAY=decay is not None,
                               PREC=dot_precision(q.dtype))


class _LinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, decay, s0, scale, o_dtype, want_final):
        ctx.chunk = BT  # read at call time: a caller may set linear.BT (e.g. 32) to compare
        B, T, H, K, V, c = _common(q, v, decay, ctx.chunk)
        o = torch.empty(B, T, H, V, device=q.device, dtype=o_dtype)
        sT = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32) if want_final else None
        _fwd[lambda m: (triton.cdiv(V, m["BV"]), B * H)](
            q, k, v, decay, s0, o, sT, scale=scale, BK=pow2(K), HAS_S0=s0 is not None,
            STORE_FINAL=want_final, **c)
        ctx.save_for_backward(q, k, v, decay, s0)
        ctx.scale = scale
        ctx.set_materialize_grads(False)
        return o, sT

    @staticmethod
    def backward(ctx, do, dsT):
        q, k, v, decay, s0 = ctx.saved_tensors
        B, T, H, K, V, c = _common(q, v, decay, ctx.chunk)
        do = torch.zeros_like(v) if do is None else do.contiguous()
        dsT = None if dsT is None else dsT.float().contiguous()
        want_dlam = decay is not None and ctx.needs_input_grad[3]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        ds0 = torch.empty_like(s0, dtype=torch.float32) if s0 is not None else None
        # one slot per (key block, batch*head); sized for the smallest key block
        dlam = torch.zeros(triton.cdiv(K, 16), B * H, device=q.device) if want_dlam else None
        k_grid = lambda m: (triton.cdiv(K, m["BK"]), B * H)  # noqa: E731
        v_grid = lambda m: (triton.cdiv(V, m["BV"]), B * H)  # noqa: E731
        _bwd_dq[k_grid](q, k, v, decay, s0, dsT, do, dq, dlam, scale=ctx.scale, BV=pow2(V),
                        HAS_S0=s0 is not None, HAS_DST=dsT is not None, WANT_DLAM=want_dlam, **c)
        _bwd_dk[k_grid](q, v, decay, dsT, do, dk, ds0, scale=ctx.scale, BV=pow2(V),
                        HAS_DST=dsT is not None, STORE_DS0=s0 is not None, **c)
        _bwd_dv[v_grid](q, k, decay, dsT, do, dv, scale=ctx.scale, BK=pow2(K),
                        HAS_DST=dsT is not None, **c)
        ddecay = None
        if want_dlam:
            ddecay = dlam.sum(0).view(B, H).sum(0).to(decay.dtype)  # (H,)
        if ds0 is not None:
            ds0 = ds0.to(s0.dtype)
        return dq, dk, dv, ddecay, ds0, None, None, None


def linear_attention(q, k, v, *, decay=None, normalize=False, scale=None, eps=1e-6,
                     initial_state=None, output_final_state=False):
    """Causal linear attention (Triton, chunked); same contract as
    linbench.kernels.linear.reference.linear_attention_ref. Returns (o, final_state or None)."""
    check_shapes(q, k, v, initial_state=initial_state, state_extra=int(normalize),
                 decay=(decay, q.shape[2:3]))
    scale = default_scale(q, scale)
    out_dtype = v.dtype
    if normalize:  # v augmented with ones: the normalizer rides in the last state column
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    o, final = _LinearAttention.apply(
        q.contiguous(), k.contiguous(), v.contiguous(),
        None if decay is None else decay.float().contiguous(),
        None if initial_state is None else initial_state.float().contiguous(),
        float(scale), torch.float32 if normalize else out_dtype, bool(output_final_state))
    if normalize:
        o = (o[..., :-1] / (o[..., -1:] + eps)).to(out_dtype)
    return o, final
