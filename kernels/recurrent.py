"""One-token decode steps for every mixer: (o, new_state) from one token and the state.

q, k: (B, H, K); v: (B, H, V) -- a single token, no T axis. `state=None` means the empty
state. Outputs keep v's dtype; the math and the returned linear states are in
promote(dtype, fp32) (fp32 for fp32/fp16/bf16 inputs, fp64 for fp64), so fp32 states
from the chunked kernels can be passed in directly.

Window mixers keep their last tokens in (B, n, H, D) caches, the kernels' [batch, seq,
heads, dim] layout, n <= window.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class WindowCache(NamedTuple):
    """Sliding-window softmax decode state: the last `window` keys and values (B, n, H, D)."""

    k: torch.Tensor
    v: torch.Tensor


class WindowState(NamedTuple):
    """LoLCATs hybrid decode state (arXiv 2410.10254, sec. 3.2: tokens leaving the window
    are folded into the linear state).

    kv: (B, H, F, V + 1) sum over tokens already out of the window of fk_j [v_j, 1];
    k, v, fk: (B, n, H, D) the last n = min(T, window) tokens.
    """

    kv: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    fk: torch.Tensor


def _dt(*xs) -> torch.dtype:
    dt = torch.float32
    for x in xs:
        if x is not None:
            dt = torch.promote_types(dt, x.dtype)
    return dt


def _scale(q, scale):
    return q.shape[-1] ** -0.5 if scale is None else scale


def _outer(k, v):  # (B, H, K), (B, H, V) -> (B, H, K, V)
    return k[..., :, None] * v[..., None, :]


def linear_attention_step(q, k, v, state, *, decay=None, normalize=False, scale=None, eps=1e-6):
    """S = exp(decay) S + k v^T; o = scale q^T S (normalize: v -> [v, 1], o = num / (den + eps)).

    decay: (H,) log-decay; state: (B, H, K, V) or (B, H, K, V + 1) with normalize.
    """
    dt = _dt(q, state)
    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
    if normalize:
        vf = torch.cat([vf, torch.ones_like(vf[..., :1])], -1)
    S = _outer(kf, vf)
    if state is not None:
        prev = state.to(dt)
        if decay is not None:
            prev = prev * torch.exp(decay.to(dt))[:, None, None]
        S = prev + S
    o = torch.einsum("bhk,bhkv->bhv", qf * _scale(q, scale), S)
    if normalize:
        o = o[..., :-1] / (o[..., -1:] + eps)
    return o.to(v.dtype), S


def gated_linear_attention_step(q, k, v, g, state, *, scale=None):
    """S = diag(exp(g)) S + k v^T; o = scale q^T S.  g: (B, H, K) log-gates."""
    dt = _dt(q, state)
    S = _outer(k.to(dt), v.to(dt))
    if state is not None:
        S = state.to(dt) * torch.exp(g.to(dt))[..., None] + S
    o = torch.einsum("bhk,bhkv->bhv", q.to(dt) * _scale(q, scale), S)
    return o.to(v.dtype), S


def delta_rule_step(q, k, v, beta, state, *, g=None, scale=None):
    """Gated delta rule: S = a S + beta k (v - a S^T k)^T, a = exp(g); o = scale q^T S.

    beta: (B, H); g: (B, H) optional scalar log-gate (arXiv 2406.06484, 2412.06464).
    """
    dt = _dt(q, state)
    kf, vf = k.to(dt), v.to(dt)
    if state is None:
        S = kf.new_zeros(*kf.shape, vf.shape[-1])
    else:
        S = state.to(dt)
        if g is not None:
            S = S * torch.exp(g.to(dt))[..., None, None]
    v_new = beta.to(dt)[..., None] * (vf - torch.einsum("bhk,bhkv->bhv", kf, S))
    S = S + _outer(kf, v_new)
    o = torch.einsum("bhk,bhkv->bhv", q.to(dt) * _scale(q, scale), S)
    return o.to(v.dtype), S


def _append(cache, x, window):
    """Append token x (B, H, D) to a (B, n, H, D) cache; returns (full, kept last window)."""
    full = x[:, None] if cache is None else torch.cat([cache, x[:, None].to(cache.dtype)], 1)
    return full, full[:, -window:]


def sliding_window_attention_step(q, k, v, cache, *, window=64, scale=None):
    """Softmax over the last `window` keys (this token included). cache: WindowCache | None."""
    _, k_win = _append(None if cache is None else cache.k, k, window)
    _, v_win = _append(None if cache is None else cache.v, v, window)
    dt = _dt(q)
    s = torch.einsum("bhk,bnhk->bhn", q.to(dt) * _scale(q, scale), k_win.to(dt))
    o = torch.einsum("bhn,bnhv->bhv", s.softmax(-1), v_win.to(dt))
    return o.to(v.dtype), WindowCache(k_win, v_win)


def window_linear_attention_step(q, k, v, fq, fk, state, *, window=64, gamma, scale=None, eps=1e-6):
    """LoLCATs hybrid decode step; state: WindowState | None; fq, fk: (B, H, F); gamma (H,).

    The token joins the window; tokens pushed out of it are folded into kv. Then
    y = (gamma sum_win e^{s - m} v + fq^T kv[:, :V]) / (gamma sum_win e^{s - m} + fq^T kv[:, V] + eps).
    """
    dt = _dt(q, None if state is None else state.kv)
    full_k, k_win = _append(None if state is None else state.k, k, window)
    full_v, v_win = _append(None if state is None else state.v, v, window)
    full_fk, fk_win = _append(None if state is None else state.fk, fk, window)
    if state is None:
        kv = fk.new_zeros(*fk.shape, v.shape[-1] + 1, dtype=dt)  # (B, H, F, V + 1)
    else:
        kv = state.kv.to(dt)
    out = full_k.shape[1] - k_win.shape[1]  # tokens leaving the window
    if out > 0:
        v_out = full_v[:, :out].to(dt)
        v_out = torch.cat([v_out, torch.ones_like(v_out[..., :1])], -1)  # (B, out, H, V + 1)
        kv = kv + torch.einsum("bnhf,bnhv->bhfv", full_fk[:, :out].to(dt), v_out)
    s = torch.einsum("bhk,bnhk->bhn", q.to(dt) * _scale(q, scale), k_win.to(dt))
    e = gamma.to(dt)[:, None] * torch.exp(s - s.amax(-1, keepdim=True))  # (B, H, n)
    lin = torch.einsum("bhf,bhfv->bhv", fq.to(dt), kv)  # (B, H, V + 1)
    num = torch.einsum("bhn,bnhv->bhv", e, v_win.to(dt)) + lin[..., :-1]
    den = e.sum(-1, keepdim=True) + lin[..., -1:]
    return (num / (den + eps)).to(v.dtype), WindowState(kv, k_win, v_win, fk_win)


__all__ = ["WindowCache", "WindowState", "linear_attention_step", "gated_linear_attention_step",
           "delta_rule_step", "sliding_window_attention_step", "window_linear_attention_step"]
