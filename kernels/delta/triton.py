"""(Gated) delta rule, chunked WY form: torch for the per-chunk pieces, Triton for the
sequential state sweep (forward and backward).

Recurrence (DeltaNet, arXiv 2406.06484; scalar gate as in Gated DeltaNet, arXiv 2412.06464):
    S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T,   a_t = exp(g_t),
    o_t = scale q_t^T S_t.
Inside a chunk of C tokens with S the state before it, G_r = sum_{s<=r} g_s (chunk-local
cumsum), gam_r = exp(G_r), D_rs = exp(G_r - G_s) for s <= r (0 above the diagonal):
    A = (I + tril(diag(beta) (K K^T * D), -1))^-1,  W = A (beta gam K),  U = A (beta V)
    v_new = U - W S
    o     = (scale gam Q) S + scale (Q K^T * D) v_new          (D includes the diagonal)
    S'    = gam_C S + (exp(G_C - G) K)^T v_new
With g = None every gate factor is 1 and this is the DeltaNet chunk form verbatim.

What runs where:
  torch (autograd): chunking/padding, A, W, U (batched triangular solves), the gate
    factors, the intra-chunk term scale (Q K^T * D) v_new and its gradients.
  Triton: `_delta_fwd_kernel` (v_new, the inter-chunk output (scale gam Q) S, final
    state) and `_delta_bwd_kernel` (the reverse sweep that carries dS and writes the
    gradients of W, U, scale gam Q, exp(G_C - G) K, gam_C and the initial state).
Memory: the forward keeps one state every SEG chunks (SEG ~ sqrt(#chunks)); the
backward re-runs one segment from its checkpoint into a SEG-state scratch and sweeps it
in reverse, so no tensor of all chunk states ever exists. O(T) for the rest.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from linbench.kernels.common import check_shapes, default_scale, from_chunks, to_chunks
from linbench.kernels.triton_common import INTERPRET, mm, pow2

_CHUNK = 32 if INTERPRET else 64  # fixed config: no autotuner under the interpreter
# The sweep is fp32 state math: full-precision dots ("tf32" trades ~1e-3 error for speed).
_PRECISION = "ieee"
# Software-pipelining stages of the sweeps' chunk loops. Triton's default (3) keeps extra
# copies of every loaded tile in shared memory: the backward at K = V = 128 then needs
# 296 KB, over the 227 KB an sm_90 block may use (it would not launch on an H100/H200),
# and spills more (python -m linbench.kernels.compile). One stage: 48 KB, and the same math.
_STAGES = 1


@triton.jit
def _rows(X, bh, c, Tp, rc, cols, mcol, D: tl.constexpr, C: tl.constexpr):
    """Load the (C, cols) tile of chunk c from a (B*H, Tp, D) contiguous tensor."""
    ptr = X + (bh * Tp + c * C + rc[:, None]) * D + cols[None, :]
    return tl.load(ptr, mask=mcol[None, :], other=0.0)


@triton.jit
def _delta_fwd_kernel(W, U, QG, KD, GL, S0, VN, O, SF, CKPT, NT, SEG, NS,
                      K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, HAS_S0: tl.constexpr, STORE_CKPT: tl.constexpr,
                      PREC: tl.constexpr):
    bh, iv = tl.program_id(0).to(tl.int64), tl.program_id(1)  # int64 offsets
    rc, rk, rv = tl.arange(0, C), tl.arange(0, BK), iv * BV + tl.arange(0, BV)
    mk, mv = rk < K, rv < V
    st = rk[:, None] * V + rv[None, :]  # offsets of this program's (BK, BV) state tile
    mst = mk[:, None] & mv[None, :]
    Tp = NT * C
    if HAS_S0:
        S = tl.load(S0 + bh * K * V + st, mask=mst, other=0.0)
    else:
        S = tl.zeros([BK, BV], tl.float32)
    for c in range(NT):
        if STORE_CKPT:
            if c % SEG == 0:
                tl.store(CKPT + (bh * NS + c // SEG) * K * V + st, S, mask=mst)
        w = _rows(W, bh, c, Tp, rc, rk, mk, K, C)  # (C, BK)
        qg = _rows(QG, bh, c, Tp, rc, rk, mk, K, C)
        kd = _rows(KD, bh, c, Tp, rc, rk, mk, K, C)
        u = _rows(U, bh, c, Tp, rc, rv, mv, V, C)  # (C, BV)
        vn = u - mm(w, S, PREC)
        o = mm(qg, S, PREC)
        S = S * tl.load(GL + bh * NT + c) + mm(tl.trans(kd), vn, PREC)
        out = (bh * Tp + c * C + rc[:, None]) * V + rv[None, :]
        tl.store(VN + out, vn, mask=mv[None, :])
        tl.store(O + out, o, mask=mv[None, :])
    tl.store(SF + bh * K * V + st, S, mask=mst)


@triton.jit
def _delta_bwd_kernel(W, QG, KD, GL, VN, DVX, DO, DSF, CKPT, SCR, DU, DW, DQG, DKD, DGL, DS0,
                      NT, SEG, NS, BH, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, HAS_DSF: tl.constexpr,
                      PREC: tl.constexpr):
    bh, iv = tl.program_id(0).to(tl.int64), tl.program_id(1)  # int64 offsets
    rc, rk, rv = tl.arange(0, C), tl.arange(0, BK), iv * BV + tl.arange(0, BV)
    mk, mv = rk < K, rv < V
    st = rk[:, None] * V + rv[None, :]
    mst = mk[:, None] & mv[None, :]
    Tp = NT * C
    if HAS_DSF:
        dS = tl.load(DSF + bh * K * V + st, mask=mst, other=0.0)
    else:
        dS = tl.zeros([BK, BV], tl.float32)
    for i in range(NS):
        s = NS - 1 - i
        c0 = s * SEG
        c1 = tl.minimum(c0 + SEG, NT)
        # 1) recompute the states entering chunks c0 .. c1-1 (v_new was saved)
        S = tl.load(CKPT + (bh * NS + s) * K * V + st, mask=mst, other=0.0)
        for c in range(c0, c1):
            tl.store(SCR + (bh * SEG + c - c0) * K * V + st, S, mask=mst)
            kd = _rows(KD, bh, c, Tp, rc, rk, mk, K, C)
            vn = _rows(VN, bh, c, Tp, rc, rv, mv, V, C)
            S = S * tl.load(GL + bh * NT + c) + mm(tl.trans(kd), vn, PREC)
        tl.debug_barrier()
        # 2) sweep the segment backwards, carrying dS = dL/d(state after chunk c)
        for j in range(c1 - c0):
            c = c1 - 1 - j
            s_in = tl.load(SCR + (bh * SEG + c - c0) * K * V + st, mask=mst, other=0.0)
            w = _rows(W, bh, c, Tp, rc, rk, mk, K, C)  # (C, BK)
            qg = _rows(QG, bh, c, Tp, rc, rk, mk, K, C)
            kd = _rows(KD, bh, c, Tp, rc, rk, mk, K, C)
            vn = _rows(VN, bh, c, Tp, rc, rv, mv, V, C)  # (C, BV)
            do = _rows(DO, bh, c, Tp, rc, rv, mv, V, C)
            dvn = _rows(DVX, bh, c, Tp, rc, rv, mv, V, C) + mm(kd, dS, PREC)  # total dL/dv_new
            gl = tl.load(GL + bh * NT + c)
            row = bh * Tp + c * C + rc[:, None]
            tl.store(DU + row * V + rv[None, :], dvn, mask=mv[None, :])
            part = ((iv * BH + bh) * Tp + c * C + rc[:, None]) * K + rk[None, :]  # (nV, BH, Tp, K)
            tl.store(DW + part, -mm(dvn, tl.trans(s_in), PREC), mask=mk[None, :])
            tl.store(DQG + part, mm(do, tl.trans(s_in), PREC), mask=mk[None, :])
            tl.store(DKD + part, mm(vn, tl.trans(dS), PREC), mask=mk[None, :])
            tl.store(DGL + (iv * BH + bh) * NT + c, tl.sum(tl.sum(s_in * dS, 1), 0))
            dS = dS * gl + mm(tl.trans(qg), do, PREC) - mm(tl.trans(w), dvn, PREC)
        tl.debug_barrier()  # the next segment overwrites the scratch
    tl.store(DS0 + bh * K * V + st, dS, mask=mst)


def _num_warps(chunk: int, k: int) -> int:
    """8 warps. Not timed on a GPU; chosen with ptxas for sm_90a (python -m
    linbench.kernels.compile): at K = V = 64, 4 warps and BV 64 compiled to 32 registers
    and ~10 KB of spills per thread in both sweeps, 8 warps and BV 32 to 255 registers and
    0.3-0.5 KB. At K = V = 128 (BV 32) the forward still spills ~6 KB per thread: its fp32
    FMA dots ("ieee") hold whole (C, K) tiles in registers."""
    return 8


class _DeltaSweep(torch.autograd.Function):
    """(W, U, Qg, Kd, gl, S0) -> (v_new, o_inter, S_final); (B, H, Tp, D) fp32 tensors,
    gl (B, H, NT) fp32, S0 (B, H, K, V) fp32 or None."""

    @staticmethod
    def forward(ctx, w, u, qg, kd, gl, s0, chunk, seg, bv):
        B, H, Tp, K = w.shape
        V, NT = u.shape[-1], gl.shape[-1]
        ns = triton.cdiv(NT, seg)
        grid = (B * H, triton.cdiv(V, bv))
        vn, o = torch.empty_like(u), torch.empty_like(u)
        sf = w.new_empty(B, H, K, V)
        ckpt = w.new_empty(B, H, ns, K, V)  # one state every `seg` chunks
        _delta_fwd_kernel[grid](w, u, qg, kd, gl, s0 if s0 is not None else sf, vn, o, sf,
                                ckpt, NT, seg, ns, K=K, V=V, C=chunk, BK=pow2(K), BV=bv,
                                HAS_S0=s0 is not None, STORE_CKPT=True, PREC=_PRECISION,
                                num_warps=_num_warps(chunk, K), num_stages=_STAGES)
        ctx.save_for_backward(w, qg, kd, gl, vn, ckpt)
        ctx.cfg = (chunk, seg, bv, s0 is not None)
        return vn, o, sf

    @staticmethod
    def backward(ctx, dvn, do, dsf):
        w, qg, kd, gl, vn, ckpt = ctx.saved_tensors
        chunk, seg, bv, has_s0 = ctx.cfg
        B, H, Tp, K = w.shape
        V, NT, ns = vn.shape[-1], gl.shape[-1], ckpt.shape[2]
        nv = triton.cdiv(V, bv)
        dvn = torch.zeros_like(vn) if dvn is None else dvn.float().contiguous()
        do = torch.zeros_like(vn) if do is None else do.float().contiguous()
        du = torch.empty_like(vn)
        dw, dqg, dkd = (w.new_empty(nv, B, H, Tp, K) for _ in range(3))
        dgl = w.new_empty(nv, B, H, NT)
        ds0 = w.new_empty(B, H, K, V)
        scratch = w.new_empty(B, H, seg, K, V)
        _delta_bwd_kernel[(B * H, nv)](
            w, qg, kd, gl, vn, dvn, do, dsf.float().contiguous() if dsf is not None else ds0,
            ckpt, scratch, du, dw, dqg, dkd, dgl, ds0, NT, seg, ns, B * H, K=K, V=V, C=chunk,
            BK=pow2(K), BV=bv, HAS_DSF=dsf is not None, PREC=_PRECISION,
            num_warps=_num_warps(chunk, K), num_stages=_STAGES)
        return (dw.sum(0), du, dqg.sum(0), dkd.sum(0), dgl.sum(0), ds0 if has_s0 else None,
                None, None, None)


def delta_rule(q, k, v, beta, *, g=None, scale=None, initial_state=None,
               output_final_state=False, _chunk=None, _seg=None, _bv=None):
    """Chunked (gated) delta rule. q, k: (B, T, H, K); v: (B, T, H, V); beta, g: (B, T, H).

    Returns (o (B, T, H, V) in v's dtype, final state (B, H, K, V) fp32 or None).
    `_chunk`, `_seg` (chunks per checkpoint), `_bv` (V tile) override the launch config.
    """
    check_shapes(q, k, v, initial_state=initial_state, beta=(beta, q.shape[:3]),
                 g=(g, q.shape[:3]))
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = default_scale(q, scale)
    C = _chunk or _CHUNK
    f32 = torch.float32
    qc, kc, vc = (to_chunks(x, C, f32) for x in (q, k, v))  # (B, H, NT, C, D)
    bc = to_chunks(beta, C, f32)  # (B, H, NT, C); padded tokens: beta = 0
    NT = qc.shape[2]
    tri = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    if g is None:
        decay = tri.float()  # D_rs
        bk, qg, kd = bc[..., None] * kc, scale * qc, kc
        gl = qc.new_ones(B, H, NT)
    else:
        G = to_chunks(g, C, f32).cumsum(-1)  # (B, H, NT, C) padded: g = 0
        decay = torch.exp((G[..., :, None] - G[..., None, :]).masked_fill(~tri, float("-inf")))
        bk = (bc * torch.exp(G))[..., None] * kc
        qg = scale * torch.exp(G)[..., None] * qc
        kd = torch.exp(G[..., -1:] - G)[..., None] * kc
        gl = torch.exp(G[..., -1])  # (B, H, NT)
    kk = kc @ kc.transpose(-1, -2)  # (B, H, NT, C, C)
    a = torch.eye(C, device=q.device) + (bc[..., None] * kk * decay).tril(-1)
    w = torch.linalg.solve_triangular(a, bk, upper=False, unitriangular=True)  # (.., C, K)
    u = torch.linalg.solve_triangular(a, bc[..., None] * vc, upper=False, unitriangular=True)
    flat = lambda x: x.reshape(B, H, NT * C, x.shape[-1]).contiguous()  # noqa: E731
    s0 = None if initial_state is None else initial_state.float().contiguous()
    seg = _seg or max(1, math.isqrt(NT - 1) + 1)  # ~sqrt(NT) chunks per checkpoint
    bv = _bv or (pow2(V) if INTERPRET else min(pow2(V), 32))  # see _num_warps
    vn, o_inter, sf = _DeltaSweep.apply(flat(w), flat(u), flat(qg), flat(kd), gl.contiguous(),
                                        s0, C, seg, bv)
    vn = vn.view(B, H, NT, C, V)
    attn = (qc @ kc.transpose(-1, -2)) * decay * scale  # (B, H, NT, C, C), causal incl. diag
    o = o_inter.view(B, H, NT, C, V) + attn @ vn
    return from_chunks(o, T).to(v.dtype), (sf if output_final_state else None)
