"""One-token decode step of the (gated) delta rule. Conventions as in
linbench.kernels.linear.recurrent: q, k (B, H, K), v (B, H, V), beta and g (B, H).
"""
from __future__ import annotations

import torch

from linbench.kernels.common import acc_dtype, default_scale, outer


def delta_rule_step(q, k, v, beta, state, *, g=None, scale=None):
    """Gated delta rule: S = a S + beta k (v - a S^T k)^T, a = exp(g); o = scale q^T S.

    beta: (B, H); g: (B, H) optional scalar log-gate (arXiv 2406.06484, 2412.06464).
    """
    dt = acc_dtype(q, state)
    kf, vf = k.to(dt), v.to(dt)
    if state is None:
        S = kf.new_zeros(*kf.shape, vf.shape[-1])
    else:
        S = state.to(dt)
        if g is not None:
            S = S * torch.exp(g.to(dt))[..., None, None]
    v_new = beta.to(dt)[..., None] * (vf - torch.einsum("bhk,bhkv->bhv", kf, S))
    S = S + outer(kf, v_new)
    o = torch.einsum("bhk,bhkv->bhv", q.to(dt) * default_scale(q, scale), S)
    return o.to(v.dtype), S
