"""Quadratic (or token-recurrent) torch references: slow, obviously correct.

Every fast form in linbench.kernels (chunked torch, recurrent step, Triton) is tested
against these. They materialize the full [T, T] interaction and are meant for T of a
few thousand at most.

Conventions (shared by every form):
  q, k: (B, T, H, K)   v: (B, T, H, V)   states fp32 (B, H, K, V)
  `scale` multiplies q.k (default K ** -0.5).  Log-decays / log-gates are <= 0.
  Outputs keep the dtype of v; the math runs in at least fp32.
"""
from __future__ import annotations

import torch


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _default_scale(q: torch.Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def _augment_ones(v: torch.Tensor) -> torch.Tensor:
    """Append a ones column to v: the normalizer z = sum phi(k) rides in the state."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def normalize_output(o_aug: torch.Tensor, eps: float) -> torch.Tensor:
    """Split the augmented output into numerator / denominator and divide."""
    return o_aug[..., :-1] / (o_aug[..., -1:] + eps)


def linear_attention_ref(q, k, v, *, decay=None, normalize=False, scale=None, eps=1e-6,
                         initial_state=None, output_final_state=False):
    """Causal linear attention, optional fixed per-head log-decay (H,), optional normalizer.

    S_t = exp(decay) S_{t-1} + k_t v_t^T ;  o_t = scale * q_t^T S_t.
    With normalize=True, v is augmented with ones, the state is (B, H, K, V + 1) and
    o_t = num_t / (den_t + eps).
    """
    dt, out_dtype = acc_dtype(q), v.dtype
    scale = _default_scale(q, scale)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if normalize:
        v = _augment_ones(v)
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


def gated_linear_attention_ref(q, k, v, g, *, scale=None, initial_state=None,
                               output_final_state=False):
    """GLA with per-channel log-gates g (B, T, H, K):
    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T ;  o_t = scale * q_t^T S_t."""
    dt, out_dtype = acc_dtype(q), v.dtype
    scale = _default_scale(q, scale)
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


def delta_rule_ref(q, k, v, beta, *, g=None, scale=None, initial_state=None,
                   output_final_state=False):
    """(Gated) delta rule, token by token — the recurrence is its own definition.

    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T ; o_t = scale q_t^T S_t.
    beta (B, T, H); g (B, T, H) optional scalar log-gate. q, k are used as given
    (DeltaNet L2-normalizes them before calling).
    """
    dt, out_dtype = acc_dtype(q), v.dtype
    scale = _default_scale(q, scale)
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


def _window_mask(T: int, window: int, device) -> torch.Tensor:
    """mask[i, j] = True when key j is among the last `window` keys of query i (j <= i)."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return (j <= i) & (j > i - window)


def sliding_window_attention_ref(q, k, v, *, window=64, scale=None):
    """Softmax attention over the last `window` keys (the current token included)."""
    dt, out_dtype = acc_dtype(q), v.dtype
    scale = _default_scale(q, scale)
    s = torch.einsum("bihk,bjhk->bhij", q.to(dt) * scale, k.to(dt))
    s = s.masked_fill(~_window_mask(q.shape[1], window, q.device), float("-inf"))
    return torch.einsum("bhij,bjhv->bihv", s.softmax(-1), v.to(dt)).to(out_dtype)


def window_linear_attention_ref(q, k, v, fq, fk, *, window=64, gamma, scale=None, eps=1e-6):
    """LoLCATs hybrid: window softmax + linear attention beyond it, one shared normalizer.

    a_ij = gamma_h exp(scale q_i.k_j - m_i) for the last `window` keys (m_i: their max),
    a_ij = fq_i . fk_j for older keys;  y_i = sum_j a_ij v_j / (sum_j a_ij + eps).
    gamma: (H,) in (0, 1) (already passed through the sigmoid).
    """
    dt, out_dtype = acc_dtype(q), v.dtype
    scale = _default_scale(q, scale)
    T = q.shape[1]
    win = _window_mask(T, window, q.device)
    lin = torch.ones(T, T, dtype=torch.bool, device=q.device).tril(-window)
    s = torch.einsum("bihk,bjhk->bhij", q.to(dt) * scale, k.to(dt))
    s = s.masked_fill(~win, float("-inf"))
    m = s.amax(-1, keepdim=True)
    a_win = gamma.to(dt)[:, None, None] * torch.exp(s - m)
    a_lin = torch.einsum("bihf,bjhf->bhij", fq.to(dt), fk.to(dt)) * lin
    a = a_win + a_lin
    y = torch.einsum("bhij,bjhv->bihv", a, v.to(dt)) / (a.sum(-1)[..., None].transpose(1, 2) + eps)
    return y.to(out_dtype)
