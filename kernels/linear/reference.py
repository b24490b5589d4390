"""Causal linear attention, quadratic in torch: slow, obviously correct.

The chunked, recurrent and Triton forms of linear/ are tested against this. It
materializes the full [T, T] interaction and is meant for T of a few thousand at most.
Conventions: linbench.kernels.common.
"""
from __future__ import annotations

import torch

from linbench.kernels.common import acc_dtype, augment_ones, default_scale, normalize_output


def linear_attention_ref(q, k, v, *, decay=None, normalize=False, scale=None, eps=1e-6,
                         initial_state=None, output_final_state=False):
    """Causal linear attention, optional fixed per-head log-decay (H,), optional normalizer.

    S_t = exp(decay) S_{t-1} + k_t v_t^T ;  o_t = scale * q_t^T S_t.
    With normalize=True, v is augmented with ones, the state is (B, H, K, V + 1) and
    o_t = num_t / (den_t + eps).
    """
    dt, out_dtype = acc_dtype(q), v.dtype
    scale = default_scale(q, scale)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if normalize:
        v = augment_ones(v)
    B, T, H, K = q.shape
    pos = torch.arange(T, device=q.device, dtype=dt)
    s = torch.einsum("bihk,bjhk->bhij", q * scale, k)  # (B, H, T, T)
    causal = pos[:, None] >= pos[None, :]
    if decay is None:
        weight = causal.to(dt).expand(H, T, T)
        to_end = torch.ones(H, T, device=q.device, dtype=dt)  # decay from j to T-1
        from_start = torch.ones(H, T, device=q.device, dtype=dt)  # decay from -1 to i
    else:
        ld = decay.to(dt)[:, None, None]  # (H, 1, 1)
        diff = (pos[:, None] - pos[None, :]).clamp_min(0)
        weight = torch.where(causal, torch.exp(ld * diff), torch.zeros((), dtype=dt, device=q.device))
        to_end = torch.exp(ld[:, :, 0] * (T - 1 - pos))
        from_start = torch.exp(ld[:, :, 0] * (pos + 1))
    o = torch.einsum("bhij,bjhv->bihv", s * weight, v)
    if initial_state is not None:
        s0 = initial_state.to(dt)
        o = o + torch.einsum("bihk,bhkv,hi->bihv", q * scale, s0, from_start)
    final = None
    if output_final_state:
        final = torch.einsum("bjhk,bjhv,hj->bhkv", k, v, to_end)
        if initial_state is not None:
            final = final + initial_state.to(dt) * from_start[None, :, -1, None, None]
        final = final.float()
    if normalize:
        o = normalize_output(o, eps)
    return o.to(out_dtype), final
