"""One-token decode step of gated linear attention (per-channel gates). Conventions as in
linbench.kernels.linear.recurrent: q, k (B, H, K), v (B, H, V), g (B, H, K), no T axis.
"""
from __future__ import annotations

import torch

from linbench.kernels.common import acc_dtype, default_scale, outer


def gated_linear_attention_step(q, k, v, g, state, *, scale=None):
    """S = diag(exp(g)) S + k v^T; o = scale q^T S.  g: (B, H, K) log-gates."""
    dt = acc_dtype(q, state)
    S = outer(k.to(dt), v.to(dt))
    if state is not None:
        S = state.to(dt) * torch.exp(g.to(dt))[..., None] + S
    o = torch.einsum("bhk,bhkv->bhv", q.to(dt) * default_scale(q, scale), S)
    return o.to(v.dtype), S
