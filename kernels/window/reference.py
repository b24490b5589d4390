"""Sliding-window softmax and the LoLCATs window + linear hybrid, quadratic in torch:
slow, obviously correct.

The chunked (blockwise), recurrent and Triton forms of window/ are tested against these.
They materialize the full [T, T] scores. Conventions: linbench.kernels.common.
"""
from __future__ import annotations

import torch

from linbench.kernels.common import acc_dtype, default_scale


def window_mask(T: int, window: int, device) -> torch.Tensor:
    """mask[i, j] = True when key j is among the last `window` keys of query i (j <= i)."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return (j <= i) & (j > i - window)


def sliding_window_attention_ref(q, k, v, *, window=64, scale=None):
    """Softmax attention over the last `window` keys (the current token included)."""
    dt, out_dtype = acc_dtype(q), v.dtype
    scale = default_scale(q, scale)
    s = torch.einsum("bihk,bjhk->bhij", q.to(dt) * scale, k.to(dt))
    s = s.masked_fill(~window_mask(q.shape[1], window, q.device), float("-inf"))
    return torch.einsum("bhij,bjhv->bihv", s.softmax(-1), v.to(dt)).to(out_dtype)


def window_linear_weights(q, k, fq, fk, *, window=64, gamma, scale=None, rows=None):
    """The hybrid's unnormalized weights of queries rows = (i0, i1) over all T keys,
    (B, H, i1 - i0, T) in the accumulation dtype:

    a_ij = gamma_h exp(scale q_i.k_j - m_i) for the last `window` keys (m_i: their max),
    a_ij = fq_i . fk_j for older keys, 0 for later ones. fq, fk: (B, T, H, F) features.
    The reference below normalizes them over all rows; lolcats' attention-weight transfer
    (HybridWindow.weights) over a block of rows at a time."""
    dt = acc_dtype(q)
    scale = default_scale(q, scale)
    i0, i1 = rows if rows is not None else (0, q.shape[1])
    d = (torch.arange(i0, i1, device=q.device)[:, None]
         - torch.arange(k.shape[1], device=q.device)[None])  # query - key distance
    s = torch.einsum("bihk,bjhk->bhij", q[:, i0:i1].to(dt) * scale, k.to(dt))
    s = s.masked_fill(~((d >= 0) & (d < window)), float("-inf"))
    a_win = gamma.to(dt)[:, None, None] * torch.exp(s - s.amax(-1, keepdim=True))
    return a_win + torch.einsum("bihf,bjhf->bhij", fq[:, i0:i1].to(dt), fk.to(dt)) * (d >= window)


def window_linear_attention_ref(q, k, v, fq, fk, *, window=64, gamma, scale=None, eps=1e-6,
                                initial_kv=None):
    """LoLCATs hybrid: window softmax + linear attention beyond it, one shared normalizer.

    y_i = sum_j a_ij v_j / (sum_j a_ij + eps), a = window_linear_weights. gamma: (H,) > 0,
    the window weight (lolcats: sigmoid(w), or exp(w) with its affine factors); the linear
    part has weight 1. fq, fk: (B, T, H, F) features, or the feature maps (then applied to
    q and k here). initial_kv (B, H, F, V + 1): sum of fk_j [v_j, 1] over keys before the
    sequence (a continued prefill), added to every query's linear part.
    """
    if callable(fq):
        fq, fk = fq(q), fk(k)
    dt, out_dtype = acc_dtype(q), v.dtype
    a = window_linear_weights(q, k, fq, fk, window=window, gamma=gamma, scale=scale)
    num = torch.einsum("bhij,bjhv->bihv", a, v.to(dt))
    den = a.sum(-1)[..., None].transpose(1, 2)
    if initial_kv is not None:
        before = torch.einsum("bihf,bhfv->bihv", fq.to(dt), initial_kv.to(dt))
        num, den = num + before[..., :-1], den + before[..., -1:]
    return (num / (den + eps)).to(out_dtype)
