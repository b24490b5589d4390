"""Chunked gated linear attention (per-channel gates) in Triton, forward and backward.

GLA (Yang et al. 2024, arXiv 2312.06635): S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,
o_t = scale q_t^T S_t, log-gates g (B, T, H, K) <= 0. Chunks of BT = 16 rows (the smallest
tl.dot tile: the pairwise intra-chunk work below grows as BT^2 K). With G the cumulative
log-gate inside the chunk (G_i = g_t0 + ... + g_i) and Gl = G of the last row, for the state
S before the chunk:
    o   = scale [ (Q * e^G) S + A V ],   A_ij = sum_c q_ic k_jc e^(G_ic - G_jc), j <= i
    S  <- e^Gl * S + (K * e^(Gl - G))^T V
Every exponent is a difference "later minus earlier" of a cumulative sum of g <= 0, so it is
<= 0: A is computed pairwise (a (BT, BT, BK) tensor, one key slice at a time) and never as
(Q e^G)(K e^-G)^T, whose e^-G overflows fp32 once a chunk's gates sum below -88 (e.g. -8 per
step over 12 steps).

Grids as in linbench.kernels.linear.triton: forward and dv sweep per (value block,
batch*head) with full K, dq and dk per (key block, batch*head) with full V; states live in
registers, never in memory.

Gate gradient: write q~_t = q_t e^(G_t), k~_t = k_t e^(-G_t) with G the global cumulative
log-gate. The outputs depend on G only through q~ and k~, so dL/dG_t = q_t dq_t - k_t dk_t,
and since G_t = sum_{s<=t} g_s, dg_t = sum_{s>=t} dL/dG_s: a reverse cumulative sum. Two
terms cancel exactly in it and are left out rather than subtracted in floating point (with
gates near 0 the rounding would swamp dg): the diagonal j = i of the intra-chunk sums, and,
for the final state S_T = e^(G_T) S_0 + sum_j e^(G_T - G_j) k_j v_j^T, the pair
"+dS_T * S_T at G_T, -k_j dk_j^final at G_j"; that path contributes directly
    dg_t += sum_{j<t} k_j dk_j^final + e^(G_T) sum_v S_0 * dS_T.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from linbench.kernels.common import check_shapes, default_scale
from linbench.kernels.triton_common import (dot_precision, init_state, load_tile, pow2,
                                            state_tile, store_tile, tile, tuned)

BT = 16  # chunk length (tl.dot needs >= 16)
BKS = 32  # key slice of the pairwise (BT, BT, BKS) tensor


@triton.jit
def _decays(bg, BT: tl.constexpr):
    """Cumulative log-gate G (BT, BK), its last row Gl (BK,), and the pairwise decays
    P_ijc = e^(G_ic - G_jc) strictly below the diagonal (i > j), 0 elsewhere (BT, BT, BK)."""
    G = tl.cumsum(bg, 0)
    i = tl.arange(0, BT)
    below = (i[:, None] > i[None, :])[:, :, None]
    P = tl.where(below, tl.exp(tl.minimum(G[:, None, :] - G[None, :, :], 0.0)), 0.0)
    return G, tl.sum(bg, 0), P


@triton.jit
def _intra(q, k, g, bq, bk, bg, b, h, t0, T, H, K: tl.constexpr, BT: tl.constexpr,
           BK: tl.constexpr, BKS: tl.constexpr):
    """A_ij = sum_c q_ic k_jc e^(G_ic - G_jc) for j <= i (BT, BT), slice by slice over K."""
    i = tl.arange(0, BT)
    A = tl.where(i[:, None] == i[None, :], tl.sum(bq * bk, 1)[:, None], 0.0)  # diagonal: e^0
    if BK <= BKS:  # the loaded tiles are the only slice
        _, _, P = _decays(bg, BT)
        A += tl.sum(bq[:, None, :] * bk[None, :, :] * P, axis=2)
    else:
        for s in tl.static_range(0, BK // BKS):
            sq = load_tile(q, b, h, t0, T, H, K, BT, BKS, s * BKS)
            sk = load_tile(k, b, h, t0, T, H, K, BT, BKS, s * BKS)
            _, _, P = _decays(load_tile(g, b, h, t0, T, H, K, BT, BKS, s * BKS), BT)
            A += tl.sum(sq[:, None, :] * sk[None, :, :] * P, axis=2)
    return A


@tuned("BV", fixed=32)
@triton.jit
def _fwd(q, k, v, g, s0, o, sT, T, scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
         BT: tl.constexpr, BK: tl.constexpr, BKS: tl.constexpr, BV: tl.constexpr,
         HAS_S0: tl.constexpr, STORE_FINAL: tl.constexpr, PREC: tl.constexpr):
    iv, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    # state slice (K, BV), fp32
    S, s_off, s_mask = init_state(s0, bh, K, V, BK, BV, 0, iv * BV, HAS_S0)
    for n in range(0, tl.cdiv(T, BT)):
        t0 = n * BT
        bq = load_tile(q, b, h, t0, T, H, K, BT, BK, 0)  # (BT, K)
        bk = load_tile(k, b, h, t0, T, H, K, BT, BK, 0)
        bg = load_tile(g, b, h, t0, T, H, K, BT, BK, 0)  # zero past T: G stays flat there
        bv = load_tile(v, b, h, t0, T, H, V, BT, BV, iv * BV)  # (BT, BV)
        G = tl.cumsum(bg, 0)
        Gl = tl.sum(bg, 0)  # (K,)
        A = _intra(q, k, g, bq, bk, bg, b, h, t0, T, H, K, BT, BK, BKS)
        out = tl.dot(bq * tl.exp(G), S, input_precision=PREC) + tl.dot(A, bv, input_precision=PREC)
        store_tile(o, out * scale, b, h, t0, T, H, V, BT, BV, iv * BV)
        S = S * tl.exp(Gl)[:, None] + tl.dot(tl.trans(bk * tl.exp(Gl[None, :] - G)), bv,
                                             input_precision=PREC)
    if STORE_FINAL:
        tl.store(sT + s_off, S, mask=s_mask)


@tuned("BK", fixed=32, choices=(16, 32))
@triton.jit
def _bwd_dq(q, k, v, g, s0, do, dq, dG, T, scale, H: tl.constexpr, K: tl.constexpr,
            V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
            HAS_S0: tl.constexpr, WANT_DG: tl.constexpr, PREC: tl.constexpr):
    """dq_ic = scale [ e^G_ic (dO S^T)_ic + sum_j dA_ij k_jc e^(G_ic - G_jc) ], dA = dO V^T;
    S (BK, V) recomputed in a forward sweep. WANT_DG: dG = q * dq without its diagonal
    (j = i) term, which cancels exactly against k * dk and would only add rounding error."""
    ik, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    S, s_off, s_mask = init_state(s0, bh, K, V, BK, BV, ik * BK, 0, HAS_S0)
    i = tl.arange(0, BT)
    eye = i[:, None] == i[None, :]
    for n in range(0, tl.cdiv(T, BT)):
        t0 = n * BT
        bk = load_tile(k, b, h, t0, T, H, K, BT, BK, ik * BK)  # (BT, BK)
        bg = load_tile(g, b, h, t0, T, H, K, BT, BK, ik * BK)
        bv = load_tile(v, b, h, t0, T, H, V, BT, BV, 0)  # (BT, V)
        bdo = load_tile(do, b, h, t0, T, H, V, BT, BV, 0)
        G, Gl, P = _decays(bg, BT)
        dA = tl.dot(bdo, tl.trans(bv), input_precision=PREC)  # (BT_i, BT_j)
        diag = tl.sum(tl.where(eye, dA, 0.0), 1)  # (BT,)
        out = tl.sum(dA[:, :, None] * bk[None, :, :] * P, axis=1)
        out += tl.dot(bdo, tl.trans(S), input_precision=PREC) * tl.exp(G)
        store_tile(dq, (out + diag[:, None] * bk) * scale, b, h, t0, T, H, K, BT, BK, ik * BK)
        if WANT_DG:
            bq = load_tile(q, b, h, t0, T, H, K, BT, BK, ik * BK)
            store_tile(dG, bq * out * scale, b, h, t0, T, H, K, BT, BK, ik * BK)
        S = S * tl.exp(Gl)[:, None] + tl.dot(tl.trans(bk * tl.exp(Gl[None, :] - G)), bv,
                                             input_precision=PREC)


@tuned("BK", fixed=32, choices=(16, 32), restore=("dG",))
@triton.jit
def _bwd_dk(q, k, v, g, dsT, do, dk, ds0, dG, u, T, scale, H: tl.constexpr, K: tl.constexpr,
            V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
            HAS_DST: tl.constexpr, STORE_DS0: tl.constexpr, WANT_DG: tl.constexpr,
            PREC: tl.constexpr):
    """dk_jc = scale sum_i dA_ij q_ic e^(G_ic - G_jc) + e^(Gl_c - G_jc) (V dS^T)_jc, with dS
    (BK, V) the gradient from later outputs, swept from the last chunk to the first; the
    final-state gradient dS_T enters as its own term e^(Gsuf + Gl - G) (V dS_T^T), Gsuf the
    gates after the chunk. WANT_DG: dG (holding q * dq from _bwd_dq) -= k * dk without the
    diagonal and dS_T terms, then summed from the end: dG becomes dg but for the dS_T path;
    u = k * (the dS_T term), which the wrapper sums forward."""
    ik, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    s_off, s_mask = state_tile(bh, K, V, BK, BV, ik * BK, 0)
    dS = tl.zeros((BK, BV), tl.float32)  # gradient of the state after the chunk, from outputs
    dF = tl.zeros((BK, BV), tl.float32)  # gradient of the final state
    if HAS_DST:
        dF += tl.load(dsT + s_off, mask=s_mask, other=0.0)
    Gsuf = tl.zeros((BK,), tl.float32)  # sum of the log-gates after the chunk
    carry = tl.zeros((BK,), tl.float32)  # sum of dL/dG over the later chunks
    i = tl.arange(0, BT)
    eye = i[:, None] == i[None, :]
    NT = tl.cdiv(T, BT)
    for r in range(0, NT):
        t0 = (NT - 1 - r) * BT
        bq = load_tile(q, b, h, t0, T, H, K, BT, BK, ik * BK)  # (BT, BK)
        bg = load_tile(g, b, h, t0, T, H, K, BT, BK, ik * BK)
        bv = load_tile(v, b, h, t0, T, H, V, BT, BV, 0)  # (BT, V)
        bdo = load_tile(do, b, h, t0, T, H, V, BT, BV, 0)
        G, Gl, P = _decays(bg, BT)
        dA = tl.dot(bdo, tl.trans(bv), input_precision=PREC)  # (BT_i, BT_j)
        diag = tl.sum(tl.where(eye, dA, 0.0), 1)
        out = tl.sum(dA[:, :, None] * bq[:, None, :] * P, axis=0) * scale
        out += tl.dot(bv, tl.trans(dS), input_precision=PREC) * tl.exp(Gl[None, :] - G)
        dk_tile = out + diag[:, None] * bq * scale
        off, mask = tile(b, h, t0, T, H, K, BT, BK, ik * BK)
        if WANT_DG:  # dL/dG of these rows, then dg_t = sum_{s >= t} dL/dG_s in place
            bk = tl.load(k + off, mask=mask, other=0.0).to(tl.float32)
            dGt = tl.load(dG + off, mask=mask, other=0.0) - bk * out  # (BT, BK)
            tl.store(dG + off, tl.cumsum(dGt, 0, reverse=True) + carry[None, :], mask=mask)
            carry += tl.sum(dGt, 0)
        if HAS_DST:
            fin = tl.dot(bv, tl.trans(dF), input_precision=PREC)  # (BT, BK)
            fin *= tl.exp(Gsuf[None, :] + Gl[None, :] - G)
            dk_tile += fin
            if WANT_DG:
                tl.store(u + off, bk * fin, mask=mask)
            Gsuf += Gl
        tl.store(dk + off, dk_tile.to(dk.dtype.element_ty), mask=mask)
        dS = dS * tl.exp(Gl)[:, None] + tl.dot(tl.trans(bq * tl.exp(G)), bdo,
                                               input_precision=PREC) * scale
    if STORE_DS0:
        tl.store(ds0 + s_off, dS + dF * tl.exp(Gsuf)[:, None], mask=s_mask)


@tuned("BV", fixed=32)
@triton.jit
def _bwd_dv(q, k, g, dsT, do, dv, T, scale, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
            BT: tl.constexpr, BK: tl.constexpr, BKS: tl.constexpr, BV: tl.constexpr,
            HAS_DST: tl.constexpr, PREC: tl.constexpr):
    """dv = scale A^T dO + (K * e^(Gl - G)) dS, dS (K, BV) swept from the last chunk."""
    iv, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    dS, s_off, s_mask = init_state(dsT, bh, K, V, BK, BV, 0, iv * BV, HAS_DST)
    NT = tl.cdiv(T, BT)
    for r in range(0, NT):
        t0 = (NT - 1 - r) * BT
        bq = load_tile(q, b, h, t0, T, H, K, BT, BK, 0)  # (BT, K)
        bk = load_tile(k, b, h, t0, T, H, K, BT, BK, 0)
        bg = load_tile(g, b, h, t0, T, H, K, BT, BK, 0)
        bdo = load_tile(do, b, h, t0, T, H, V, BT, BV, iv * BV)  # (BT, BV)
        G = tl.cumsum(bg, 0)
        Gl = tl.sum(bg, 0)
        A = _intra(q, k, g, bq, bk, bg, b, h, t0, T, H, K, BT, BK, BKS) * scale
        out = tl.dot(tl.trans(A), bdo, input_precision=PREC)
        out += tl.dot(bk * tl.exp(Gl[None, :] - G), dS, input_precision=PREC)
        store_tile(dv, out, b, h, t0, T, H, V, BT, BV, iv * BV)
        dS = dS * tl.exp(Gl)[:, None] + tl.dot(tl.trans(bq * tl.exp(G)), bdo,
                                               input_precision=PREC) * scale


def _common(q, v):
    B, T, H, K = q.shape
    V = v.shape[-1]
    return B, T, H, K, V, dict(T=T, H=H, K=K, V=V, BT=BT, PREC=dot_precision(q.dtype))


class _GatedLinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, s0, scale, want_final):
        B, T, H, K, V, c = _common(q, v)
        o = torch.empty_like(v)
        sT = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32) if want_final else None
        BK = pow2(K)
        _fwd[lambda m: (triton.cdiv(V, m["BV"]), B * H)](
            q, k, v, g, s0, o, sT, scale=scale, BK=BK, BKS=min(BK, BKS),
            HAS_S0=s0 is not None, STORE_FINAL=want_final, **c)
        ctx.save_for_backward(q, k, v, g, s0)
        ctx.scale = scale
        ctx.set_materialize_grads(False)
        return o, sT

    @staticmethod
    def backward(ctx, do, dsT):
        q, k, v, g, s0 = ctx.saved_tensors
        B, T, H, K, V, c = _common(q, v)
        do = torch.zeros_like(v) if do is None else do.contiguous()
        dsT = None if dsT is None else dsT.float().contiguous()
        want_dg = ctx.needs_input_grad[3]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        ds0 = torch.empty_like(s0, dtype=torch.float32) if s0 is not None else None
        dG = torch.empty_like(q, dtype=torch.float32) if want_dg else None  # dL/dG (B, T, H, K)
        u = torch.empty_like(dG) if want_dg and dsT is not None else None
        k_grid = lambda m: (triton.cdiv(K, m["BK"]), B * H)  # noqa: E731
        v_grid = lambda m: (triton.cdiv(V, m["BV"]), B * H)  # noqa: E731
        _bwd_dq[k_grid](q, k, v, g, s0, do, dq, dG, scale=ctx.scale, BV=pow2(V),
                        HAS_S0=s0 is not None, WANT_DG=want_dg, **c)
        _bwd_dk[k_grid](q, k, v, g, dsT, do, dk, ds0, dG, u, scale=ctx.scale, BV=pow2(V),
                        HAS_DST=dsT is not None, STORE_DS0=s0 is not None, WANT_DG=want_dg, **c)
        _bwd_dv[v_grid](q, k, g, dsT, do, dv, scale=ctx.scale, BK=pow2(K), BKS=min(pow2(K), BKS),
                        HAS_DST=dsT is not None, **c)
        dg = None
        if want_dg:  # gate identity (module docstring), the final state's terms summed forward
            dg = dG
            if u is not None:
                dg[:, 1:] += u[:, :-1].cumsum(1)  # sum_{j < t} u_j
                if s0 is not None:  # S_T = e^(G_T) S_0 + ...: every gate sees S_0 * dS_T
                    dg += (torch.exp(g.float().sum(1)) * (s0 * dsT).sum(-1))[:, None]
            dg = dg.to(g.dtype)
        if ds0 is not None:
            ds0 = ds0.to(s0.dtype)
        return dq, dk, dv, dg, ds0, None, None


def gated_linear_attention(q, k, v, g, *, scale=None, initial_state=None,
                           output_final_state=False):
    """GLA with per-channel log-gates g (B, T, H, K) (Triton, chunked); same contract as
    linbench.kernels.gla.reference.gated_linear_attention_ref. Returns (o, final_state or None)."""
    check_shapes(q, k, v, initial_state=initial_state, g=(g, q.shape))
    scale = default_scale(q, scale)
    return _GatedLinearAttention.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(),
        None if initial_state is None else initial_state.float().contiguous(),
        float(scale), bool(output_final_state))
