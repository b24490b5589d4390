"""Chunked (gated) delta rule in torch: the WY representation, linear in T.

DeltaNet (Yang et al., "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length", arXiv 2406.06484) writes the recurrence

    S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T,   o_t = scale q_t^T S_t

(a_t = exp(g_t) is the scalar gate of Gated DeltaNet, arXiv 2412.06464; a_t = 1 without g).
Inside a chunk that starts from the state S (positions t = 1..C, gamma_t = exp(G_t) with
G the in-chunk cumulative sum of g, Gam_tj = exp(G_t - G_j) for j <= t, else 0), unroll:

    S_t = gamma_t S + sum_{j<=t} Gam_tj k_j n_j^T
    n_t = beta_t (v_t - gamma_t S^T k_t - sum_{j<t} Gam_tj (k_t . k_j) n_j)

i.e. (I + tril(diag(beta) (K K^T * Gam), -1)) n = beta V - diag(beta gamma) K S. With the
unit lower-triangular T = I + tril(...), W = T^-1 (beta gamma K) and U = T^-1 (beta V)
(the paper's WY form, solved by triangular substitution, never a general inverse):

    n   = U - W S                                   (the paper's v_new)
    o   = scale [(gamma Q) S + (tril(Q K^T) * Gam) n]
    S' = gamma_C S + (K * exp(G_C - G))^T n

Every exponent is <= 0, so nothing overflows however small the gates get.

Memory. The sequence is cut into segments of `segment_chunks` chunks (default about
sqrt(number of chunks)); only the fp32 state (B, H, K, V) crosses a segment boundary, and
each segment runs under torch.utils.checkpoint when a gradient is needed. Autograd then
keeps only the inputs (views, no copies), one (B, H, K, V) state per segment and the
output; the per-chunk states, T^-1, W and U of a segment exist only while that segment
is computed or recomputed in backward (O(segment * C * (C + K + V)) floats per head).
At T = 1M, C = 64 that is 128 saved states (16 MiB at B1 H8 K=V=64) instead of 16,384
(2 GiB). Without autograd the segments write into one preallocated output; with it the
segment outputs are concatenated once (one transient copy of o). Time is linear in T.
"""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from linbench.kernels.common import (acc_dtype, check_positive, check_shapes, default_scale,
                                     from_chunks, to_chunks)


def _segment(S, q, k, v, beta, g, *, scale: float, C: int):
    """Run the delta rule over one segment of whole chunks.

    S: (B, H, K, V) state before the segment (compute dtype); q, k: (B, L, H, K);
    v: (B, L, H, V); beta, g: (B, L, H). Returns o (B, L, H, V) and the state after.
    """
    dt = S.dtype
    B, L, H, _ = q.shape
    qc = to_chunks(q, C, dt) * scale  # (B, H, N, C, K)
    kc = to_chunks(k, C, dt)  # (B, H, N, C, K)
    vc = to_chunks(v, C, dt)  # (B, H, N, C, V)
    bc = to_chunks(beta, C, dt)[..., None]  # (B, H, N, C, 1)
    N = qc.shape[2]
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()  # j <= i
    if g is None:
        decay = lower.to(dt)  # Gam_ij: 1 on and below the diagonal
        gamma = torch.ones_like(bc)  # (B, H, N, C, 1)
        to_end = torch.ones_like(bc)  # exp(G_C - G_j)
        chunk_decay = torch.ones(B, H, N, 1, 1, dtype=dt, device=q.device)
    else:
        G = to_chunks(g, C, dt).cumsum(-1)  # (B, H, N, C): in-chunk log decay up to t
        diff = (G[..., :, None] - G[..., None, :]).masked_fill(~lower, float("-inf"))
        decay = diff.exp()  # (B, H, N, C, C)
        gamma = G.exp()[..., None]
        to_end = (G[..., -1:] - G).exp()[..., None]
        chunk_decay = G[..., -1].exp()[..., None, None]  # (B, H, N, 1, 1)

    # WY representation: solve (I + tril(diag(beta) K K^T * Gam, -1)) [W | U] = [bgK | bV]
    kk = kc @ kc.transpose(-1, -2)  # (B, H, N, C, C)
    eye = torch.eye(C, dtype=dt, device=q.device)
    tri = (bc * kk * decay).tril(-1) + eye
    rhs = torch.cat([bc * gamma * kc, bc * vc], dim=-1)  # (B, H, N, C, K + V)
    wu = torch.linalg.solve_triangular(tri, rhs, upper=False, unitriangular=True)
    K = kc.shape[-1]
    W, U = wu[..., :K], wu[..., K:]  # (B, H, N, C, K), (B, H, N, C, V)
    k_end = kc * to_end  # (B, H, N, C, K)

    # The only sequential part: carry the state across the chunks of this segment.
    # (unbind, not U[:, :, n]: indexing would give a full-size zero gradient per chunk)
    states, news = [], []
    for u_n, w_n, ke_n, cd_n in zip(U.unbind(2), W.unbind(2), k_end.unbind(2),
                                    chunk_decay.unbind(2)):
        states.append(S)
        v_new = u_n - w_n @ S  # (B, H, C, V)
        S = cd_n * S + ke_n.transpose(-1, -2) @ v_new
        news.append(v_new)
    states = torch.stack(states, dim=2)  # (B, H, N, K, V)
    news = torch.stack(news, dim=2)  # (B, H, N, C, V)

    attn = (qc @ kc.transpose(-1, -2)) * decay  # (B, H, N, C, C), zero above the diagonal
    o = (qc * gamma) @ states + attn @ news  # (B, H, N, C, V)
    return from_chunks(o, L), S  # (B, L, H, V)


def delta_rule_chunked(q, k, v, beta, *, g=None, scale=None, initial_state=None,
                       output_final_state=False, chunk_size=64, segment_chunks=None):
    """(Gated) delta rule, chunkwise; same contract as
    linbench.kernels.delta.reference.delta_rule_ref.

    q, k: (B, T, H, K) (used as given: DeltaNet L2-normalizes them first); v: (B, T, H, V);
    beta: (B, T, H); g: (B, T, H) optional log-gate <= 0; initial_state: (B, H, K, V).
    chunk_size: tokens per chunk C (the paper uses 64). segment_chunks: chunks per
    checkpointed segment (default ~sqrt(T / C)); see the module docstring for memory.
    Returns (o (B, T, H, V) in v's dtype, final fp32 state (B, H, K, V) or None).
    """
    check_positive(chunk_size=chunk_size)
    check_shapes(q, k, v, beta=(beta, q.shape[:3]), g=(g, q.shape[:3]))
    dt, out_dtype = acc_dtype(q), v.dtype
    scale = default_scale(q, scale)
    B, T, H, K = q.shape
    C = int(chunk_size)
    n_chunks = max(1, math.ceil(T / C))
    seg = segment_chunks or max(1, math.isqrt(n_chunks))
    seg_len = seg * C

    S = torch.zeros(B, H, K, v.shape[-1], dtype=dt, device=q.device)
    if initial_state is not None:
        S = S + initial_state.to(dt)
    tensors = [t for t in (q, k, v, beta, g, initial_state) if t is not None]
    use_ckpt = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)

    # Without autograd, segments write into one preallocated output (no concatenation copy).
    out = None if use_ckpt else torch.empty(B, T, H, v.shape[-1], dtype=out_dtype, device=q.device)
    # torch.split, not x[:, s:e]: one backward node joins the segment gradients at once,
    # where slicing would allocate and add a full-size zero gradient per segment.
    pieces = [x.split(seg_len, dim=1) for x in (q, k, v, beta)]
    pieces.append(g.split(seg_len, dim=1) if g is not None else [None] * len(pieces[0]))
    outs = []
    for s, part in zip(range(0, T, seg_len), zip(*pieces)):
        if use_ckpt:
            o, S = checkpoint(_segment, S, *part, scale=scale, C=C, use_reentrant=False)
            outs.append(o.to(out_dtype))
        else:
            o, S = _segment(S, *part, scale=scale, C=C)
            out[:, s:s + seg_len] = o
    if use_ckpt:
        out = torch.cat(outs, dim=1) if outs else v.new_zeros(B, 0, H, v.shape[-1])
    return out, (S.float() if output_final_state else None)

