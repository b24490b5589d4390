"""One-token decode step of causal linear attention: (o, new state) from one token and
the state. Conventions: linbench.kernels.common, with no T axis (q, k (B, H, K),
v (B, H, V)); `state=None` is the empty state. The math and the returned state are in
promote(dtype, fp32), so fp32 states from the chunked forms can be passed in directly.
"""
from __future__ import annotations

import torch

from linbench.kernels.common import acc_dtype, augment_ones, default_scale, normalize_output, outer


def linear_attention_step(q, k, v, state, *, decay=None, normalize=False, scale=None, eps=1e-6):
    """S = exp(decay) S + k v^T; o = scale q^T S (normalize: v -> [v, 1], o = num / (den + eps)).

    decay: (H,) log-decay; state: (B, H, K, V) or (B, H, K, V + 1) with normalize.
    """
    dt = acc_dtype(q, state)
    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
    if normalize:
        vf = augment_ones(vf)
    S = outer(kf, vf)
    if state is not None:
        prev = state.to(dt)
        if decay is not None:
            prev = prev * torch.exp(decay.to(dt))[:, None, None]
        S = prev + S
    o = torch.einsum("bhk,bhkv->bhv", qf * default_scale(q, scale), S)
    if normalize:
        o = normalize_output(o, eps)
    return o.to(v.dtype), S
