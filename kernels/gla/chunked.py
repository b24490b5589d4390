"""Chunked gated linear attention (per-channel gates) in torch, linear in T.

The chunk scan of linbench.kernels.linear.chunked (its docstring: algorithm, memory) with
per-channel log-gates g (B, T, H, K), streamed: each segment is cast to the compute dtype
inside the scan, so a half-precision call holds no fp32 copy of the whole sequence
(peak: inputs + output + one segment; backward: + their gradients). What is GLA's own is the intra-chunk weight
(Q K^T * exp(G_i - G_j)) per channel, which cannot be one (C, C) product: the chunk is
cut into sub-blocks of s ~ sqrt(C) tokens (8 for C = 64); diagonal sub-blocks use the
pairwise (s, s, K) form with a -inf mask, the others factor through a reference point
(the last token before the query's sub-block), which keeps both factors <= 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from linbench.kernels.common import check_shapes, default_scale
from linbench.kernels.linear.chunked import scan

# Token-heads (B * H * L) per segment: the (s, s, K) pairwise blocks make it smaller than
# linear's. Tests shrink it to force many segments.
SEGMENT_TOKEN_HEADS = 1 << 12


def sub_block(C: int) -> int:
    """Diagonal sub-block size s for per-channel gates: the divisor of C minimizing the
    elementwise work per token, s (pairwise) + C / s (reference-point factors)."""
    return min((d for d in range(1, C + 1) if C % d == 0), key=lambda d: (d + C // d, -d))


def intra_channel(qc, kc, G):
    """(Q K^T * exp(G_i - G_j))_{j<=i} with per-channel G, (B, H, n, C, C), overflow-free."""
    B, H, n, C, K = qc.shape
    sub = sub_block(C)
    m = C // sub
    qb, kb, Gb = (x.view(B, H, n, m, sub, K) for x in (qc, kc, G))
    below = torch.ones(sub, sub, dtype=torch.bool, device=qc.device).tril(-1)
    diff = Gb[..., :, None, :] - Gb[..., None, :, :]  # (B, H, n, m, sub, sub, K): G_i - G_j
    pair = diff.masked_fill_(~below[..., None], float("-inf")).exp_()
    a_diag = (qb[..., :, None, :] * pair).mul_(kb[..., None, :, :]).sum(-1)  # (.., m, sub, sub)
    a_diag = a_diag + torch.diag_embed((qb * kb).sum(-1))  # i = j: weight 1, no gate gradient
    if m == 1:
        return a_diag.view(B, H, n, C, C)
    # Off-diagonal sub-blocks: reference point r_a = last token before sub-block a.
    g_ref = F.pad(Gb[..., :-1, -1, :], (0, 0, 1, 0))  # (B, H, n, m, K): G_{r_a}, 0 for a = 0
    q_ref = qb * torch.exp(Gb - g_ref[..., None, :])  # (B, H, n, m, sub, K), exponent <= 0
    pos = torch.arange(C, device=qc.device)
    before = pos[None, :] < pos[:m, None] * sub  # (m, C): key j precedes sub-block a
    k_exp = g_ref[..., None, :] - G[:, :, :, None]  # (B, H, n, m, C, K), <= 0 where j <= r_a
    k_ref = k_exp.masked_fill_(~before[..., None], float("-inf")).exp_() * kc[:, :, :, None]
    a = (q_ref @ k_ref.transpose(-1, -2)).view(B, H, n, m, sub, m, sub)
    eye = torch.eye(m, dtype=torch.bool, device=qc.device)[:, None, :, None]  # (m, 1, m, 1)
    return torch.where(eye, a_diag[..., :, :, None, :], a).view(B, H, n, C, C)


def gated_linear_attention_chunked(q, k, v, g, *, scale=None, initial_state=None,
                                   output_final_state=False, chunk_size=64):
    """GLA, chunked; same contract as linbench.kernels.gla.reference.gated_linear_attention_ref.

    g: (B, T, H, K) per-channel log-gates <= 0 (gates near 0 and near 1 are both exact:
    no exp of a positive exponent is ever taken). Returns (o, fp32 final state or None).
    """
    check_shapes(q, k, v, g=(g, q.shape))
    scale = default_scale(q, scale)
    # the scan casts each segment to the compute dtype (acc_dtype of q) and writes o in v's
    o, final = scan(q, k, v, g, initial_state, scale, chunk_size, budget=SEGMENT_TOKEN_HEADS,
                    intra=intra_channel)
    return o, (final.float() if output_final_state else None)
