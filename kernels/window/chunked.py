"""Sliding-window softmax and the LoLCATs window + linear hybrid, blockwise in torch.

Query blocks of `block` tokens attend to the band of keys (i - window, i]: each block
sees block + window - 1 keys, so scores take O(T * (block + window)) memory, never T x T.
Blocks are processed in groups of bounded size; when a gradient is needed and there is
more than one group, each group runs under torch.utils.checkpoint, so autograd keeps
only the inputs and the outputs (scores are recomputed in backward).

The hybrid (LoLCATs, arXiv 2410.10254, eq. 6): query i sees the last `window` keys with
weight gamma_h exp(scale q_i.k_j - m_i) (m_i the window max, gradient flowing through it
as in the reference) and older keys j <= i - window with weight fq_i.fk_j, one shared
normalizer. The linear branch is plain causal linear attention of fq against fk and
[v, 1] shifted right by `window` positions (zero padded), computed by
linear_attention_chunked (unnormalized numerator and denominator together).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from linbench.kernels.common import (acc_dtype, augment_ones, check_positive, check_shapes,
                                     default_scale)
from linbench.kernels.linear.chunked import linear_attention_chunked
from linbench.kernels.window.recurrent import WindowState, window_cache

# Score elements (B * H * blocks * block * keys) per group of query blocks.
GROUP_SCORE_ELEMENTS = 1 << 22


def check_features(q, fq, fk) -> None:
    """The hybrid's feature maps: fq, fk (B, T, H, F) beside q (B, T, H, K)."""
    if fq.shape != fk.shape or fq.dim() != 4 or fq.shape[:3] != q.shape[:3]:
        raise ValueError(f"feature shape mismatch: fq {tuple(fq.shape)}, fk {tuple(fk.shape)} "
                         f"(expected (B, T, H, F) beside q {tuple(q.shape)})")


def _band_mask(b0: int, nb: int, bq: int, W: int, device) -> torch.Tensor:
    """(nb, bq, bq + W - 1): key c of block b is visible to query r.

    Block b's keys start at absolute position b * bq - (W - 1); key c is visible when it
    lies in (r - W, r] relative to the query and is not left padding.
    """
    r = torch.arange(bq, device=device)[:, None]
    c = torch.arange(bq + W - 1, device=device)[None, :]
    band = (c >= r) & (c <= r + W - 1)  # (bq, Lk)
    start = (torch.arange(b0, b0 + nb, device=device) * bq - (W - 1))[:, None, None]
    return band & (start + c >= 0)


def _group(qg, kg, vg, gamma, b0: int, W: int, bq: int, scale: float):
    """One group of query blocks. qg: (B, nb * bq, H, K); kg, vg: their key bands.

    gamma None: softmax output (B, nb * bq, H, V). Else the hybrid's window numerator and
    denominator [num, den] (B, nb * bq, H, V + 1), both scaled by gamma_h exp(-m_i).
    """
    B, Lq, H, K = qg.shape
    nb, Lk = Lq // bq, bq + W - 1
    kb = kg.unfold(1, Lk, bq)  # (B, nb, H, K, Lk)
    vb = vg.unfold(1, Lk, bq)  # (B, nb, H, V, Lk)
    s = torch.einsum("bnrhk,bnhkc->bnhrc", qg.reshape(B, nb, bq, H, K) * scale, kb)
    s = s.masked_fill(~_band_mask(b0, nb, bq, W, qg.device)[None, :, None], float("-inf"))
    if gamma is None:
        o = torch.einsum("bnhrc,bnhvc->bnrhv", s.softmax(-1), vb)
        return o.reshape(B, Lq, H, -1)
    e = torch.exp(s - s.amax(-1, keepdim=True)) * gamma[:, None, None]  # (B, nb, H, bq, Lk)
    num = torch.einsum("bnhrc,bnhvc->bnrhv", e, vb)
    den = e.sum(-1).permute(0, 1, 3, 2)[..., None]  # (B, nb, bq, H, 1)
    return torch.cat([num, den], -1).reshape(B, Lq, H, -1)


def _windowed(q, k, v, gamma, window: int, scale: float, block: int):
    """Run `_group` over all query blocks; q, k, v already in the compute dtype."""
    B, T, H, K = q.shape
    if T == 0:
        return v.new_zeros(B, 0, H, v.shape[-1] + (gamma is not None))
    W, bq = min(int(window), T), int(block)
    nb_all = -(-T // bq)
    qp = F.pad(q, (0, 0, 0, 0, 0, nb_all * bq - T))
    kp = F.pad(k, (0, 0, 0, 0, W - 1, nb_all * bq - T))  # block b's keys start at b * bq
    vp = F.pad(v, (0, 0, 0, 0, W - 1, nb_all * bq - T))
    per = max(1, GROUP_SCORE_ELEMENTS // (B * H * bq * (bq + W - 1)))
    ckpt = torch.is_grad_enabled() and nb_all > per and any(
        t is not None and t.requires_grad for t in (q, k, v, gamma))
    outs = []
    for b0 in range(0, nb_all, per):
        nb = min(per, nb_all - b0)
        args = (qp[:, b0 * bq:(b0 + nb) * bq], kp[:, b0 * bq:(b0 + nb) * bq + W - 1],
                vp[:, b0 * bq:(b0 + nb) * bq + W - 1], gamma, b0, W, bq, scale)
        outs.append(checkpoint(_group, *args, use_reentrant=False) if ckpt else _group(*args))
    return torch.cat(outs, 1)[:, :T]


def sliding_window_attention_chunked(q, k, v, *, window=64, scale=None, block=64,
                                     output_final_state=False):
    """Softmax attention over the last `window` keys; same contract as
    linbench.kernels.window.reference.sliding_window_attention_ref (returns o). With
    output_final_state=True returns (o, WindowCache) for decoding.
    """
    check_positive(window=window, block=block)
    check_shapes(q, k, v)
    dt = acc_dtype(q)
    scale = default_scale(q, scale)
    o = _windowed(q.to(dt), k.to(dt), v.to(dt), None, window, scale, block).to(v.dtype)
    return (o, window_cache(k, v, window)) if output_final_state else o


def window_linear_attention_chunked(q, k, v, fq, fk, *, window=64, gamma, scale=None, eps=1e-6,
                                    output_final_state=False, block=64, chunk_size=64):
    """LoLCATs hybrid; same contract as
    linbench.kernels.window.reference.window_linear_attention_ref (returns y).

    q, k: (B, T, H, K); v: (B, T, H, V); fq, fk: (B, T, H, F) feature-mapped q, k;
    gamma: (H,) in (0, 1). With output_final_state=True returns (y, WindowState) where
    kv (B, H, F, V + 1) fp32 sums fk_j [v_j, 1] over the tokens out of the window.
    """
    check_positive(window=window, block=block)
    check_shapes(q, k, v)
    check_features(q, fq, fk)
    dt = acc_dtype(q)
    scale = default_scale(q, scale)
    B, T, H, V = v.shape
    vf = v.to(dt)
    nd = _windowed(q.to(dt), k.to(dt), vf, gamma.to(dt), window, scale, block)  # (B, T, H, V + 1)
    kv = fk.new_zeros(B, H, fk.shape[-1], V + 1, dtype=torch.float32)
    if T > window:  # keys j <= i - window: causal linear attention on inputs shifted by window
        shift = (0, 0, 0, 0, window, 0)
        v1 = augment_ones(vf)  # (B, T, H, V + 1)
        lin, kv = linear_attention_chunked(
            fq.to(dt), F.pad(fk.to(dt), shift)[:, :T], F.pad(v1, shift)[:, :T], scale=1.0,
            output_final_state=output_final_state, chunk_size=chunk_size)
        nd = nd + lin
    y = (nd[..., :V] / (nd[..., V:] + eps)).to(v.dtype)
    if not output_final_state:
        return y
    old = max(T - window, 0)
    return y, WindowState(kv, k[:, old:], v[:, old:], fk[:, old:])

