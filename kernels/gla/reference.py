"""Gated linear attention (per-channel gates), quadratic in torch: slow, obviously correct.

The chunked, recurrent and Triton forms of gla/ are tested against this. It builds the
pairwise (T, T, K) gate products and is meant for T of a few hundred.
Conventions: linbench.kernels.common.
"""
from __future__ import annotations

import torch

from linbench.kernels.common import acc_dtype, default_scale


def gated_linear_attention_ref(q, k, v, g, *, scale=None, initial_state=None,
                               output_final_state=False):
    """GLA with per-channel log-gates g (B, T, H, K):
    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T ;  o_t = scale * q_t^T S_t."""
    dt, out_dtype = acc_dtype(q), v.dtype
    scale = default_scale(q, scale)
    q, k, v, g = q.to(dt), k.to(dt), v.to(dt), g.to(dt)
    T = q.shape[1]
    G = g.cumsum(1)  # (B, T, H, K): log of the product of gates up to t
    diff = G[:, :, None] - G[:, None, :]  # (B, Ti, Tj, H, K)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    diff = torch.where(causal[None, :, :, None, None], diff, torch.full_like(diff, float("-inf")))
    a = torch.einsum("bihk,bjhk,bijhk->bhij", q * scale, k, torch.exp(diff))
    o = torch.einsum("bhij,bjhv->bihv", a, v)
    if initial_state is not None:
        o = o + torch.einsum("bihk,bhkv->bihv", q * scale * torch.exp(G), initial_state.to(dt))
    final = None
    if output_final_state:
        to_end = torch.exp(G[:, -1:] - G)  # (B, T, H, K)
        final = torch.einsum("bjhk,bjhv->bhkv", k * to_end, v)
        if initial_state is not None:
            final = final + initial_state.to(dt) * torch.exp(G[:, -1])[..., None]
        final = final.float()
    return o.to(out_dtype), final
