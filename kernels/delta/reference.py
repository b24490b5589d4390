"""(Gated) delta rule token by token in torch: the recurrence is its own definition.

The chunked, recurrent-step and Triton forms of delta/ are tested against this.
Conventions: linbench.kernels.common.
"""
from __future__ import annotations

import torch

from linbench.kernels.common import acc_dtype, default_scale


def delta_rule_ref(q, k, v, beta, *, g=None, scale=None, initial_state=None,
                   output_final_state=False):
    """(Gated) delta rule, token by token.

    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T ; o_t = scale q_t^T S_t.
    beta (B, T, H); g (B, T, H) optional scalar log-gate. q, k are used as given
    (DeltaNet L2-normalizes them before calling).
    """
    dt, out_dtype = acc_dtype(q), v.dtype
    scale = default_scale(q, scale)
    q, k, v, beta = q.to(dt), k.to(dt), v.to(dt), beta.to(dt)
    B, T, H, K = q.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=dt, device=q.device)
    if initial_state is not None:
        S = S + initial_state.to(dt)
    outs = []
    for t in range(T):
        if g is not None:
            S = S * torch.exp(g[:, t].to(dt))[..., None, None]
        kt, vt, bt = k[:, t], v[:, t], beta[:, t]
        v_new = bt[..., None] * (vt - torch.einsum("bhk,bhkv->bhv", kt, S))
        S = S + kt[..., :, None] * v_new[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    o = torch.stack(outs, 1)
    return o.to(out_dtype), (S.float() if output_final_state else None)
