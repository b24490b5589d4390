"""Decoding the window mixers: their states, the state after a prefill, one-token steps.

The window mixers keep their last tokens in (B, n, H, D) caches, the kernels' [batch,
seq, heads, dim] layout, n <= window. Steps take one token (q, k (B, H, K), v (B, H, V),
fq, fk (B, H, F), no T axis) and return (o, new state); `state=None` is the empty state.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from linbench.kernels.common import acc_dtype, augment_ones, default_scale


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


def window_cache(k, v, window=64) -> WindowCache:
    """Decode cache after a prefill of (B, T, H, D) keys and values: the last `window`."""
    return WindowCache(k[:, -window:], v[:, -window:])


def window_state(k, v, fk, window=64, chunk=1 << 14, initial_kv=None) -> WindowState:
    """Hybrid decode state after a prefill, computed directly in O(T) (any backend), `chunk`
    tokens at a time (no whole-sequence copy in the compute dtype). fk: (B, T, H, F) key
    features or the key feature map (applied chunk by chunk). initial_kv: the linear state
    of tokens before k (a continued prefill), added."""
    dt = acc_dtype(v)
    B, T, H, V = v.shape
    old = max(T - window, 0)  # tokens already out of the window

    def feats(sl):  # key features of tokens sl
        return fk(k[:, sl]) if callable(fk) else fk[:, sl]
    kv = None
    for t0 in range(0, old, chunk):
        sl = slice(t0, min(old, t0 + chunk))
        v1 = augment_ones(v[:, sl].to(dt))  # (B, n, H, V + 1)
        part = torch.einsum("bthf,bthv->bhfv", feats(sl).to(dt), v1)
        kv = part if kv is None else kv + part
    fk_win = feats(slice(old, T))
    if kv is None:
        kv = fk_win.new_zeros(B, H, fk_win.shape[-1], V + 1, dtype=dt)
    if initial_kv is not None:
        kv = kv + initial_kv.to(kv.dtype)
    return WindowState(kv.float(), k[:, old:], v[:, old:], fk_win)


def _append(cache, x, window):
    """Append token x (B, H, D) to a (B, n, H, D) cache; returns (full, kept last window)."""
    full = x[:, None] if cache is None else torch.cat([cache, x[:, None].to(cache.dtype)], 1)
    return full, full[:, -window:]


def sliding_window_attention_step(q, k, v, cache, *, window=64, scale=None):
    """Softmax over the last `window` keys (this token included). cache: WindowCache | None."""
    _, k_win = _append(None if cache is None else cache.k, k, window)
    _, v_win = _append(None if cache is None else cache.v, v, window)
    dt = acc_dtype(q)
    s = torch.einsum("bhk,bnhk->bhn", q.to(dt) * default_scale(q, scale), k_win.to(dt))
    o = torch.einsum("bhn,bnhv->bhv", s.softmax(-1), v_win.to(dt))
    return o.to(v.dtype), WindowCache(k_win, v_win)


def window_linear_attention_step(q, k, v, fq, fk, state, *, window=64, gamma, scale=None, eps=1e-6):
    """LoLCATs hybrid decode step; state: WindowState | None; fq, fk: (B, H, F); gamma (H,).

    The token joins the window; tokens pushed out of it are folded into kv. Then
    y = (gamma sum_win e^{s - m} v + fq^T kv[:, :V]) / (gamma sum_win e^{s - m} + fq^T kv[:, V] + eps).
    """
    dt = acc_dtype(q, None if state is None else state.kv)
    full_k, k_win = _append(None if state is None else state.k, k, window)
    full_v, v_win = _append(None if state is None else state.v, v, window)
    full_fk, fk_win = _append(None if state is None else state.fk, fk, window)
    if state is None:
        kv = fk.new_zeros(*fk.shape, v.shape[-1] + 1, dtype=dt)  # (B, H, F, V + 1)
    else:
        kv = state.kv.to(dt)
    out = full_k.shape[1] - k_win.shape[1]  # tokens leaving the window
    if out > 0:
        v_out = augment_ones(full_v[:, :out].to(dt))  # (B, out, H, V + 1)
        kv = kv + torch.einsum("bnhf,bnhv->bhfv", full_fk[:, :out].to(dt), v_out)
    s = torch.einsum("bhk,bnhk->bhn", q.to(dt) * default_scale(q, scale), k_win.to(dt))
    e = gamma.to(dt)[:, None] * torch.exp(s - s.amax(-1, keepdim=True))  # (B, H, n)
    lin = torch.einsum("bhf,bhfv->bhv", fq.to(dt), kv)  # (B, H, V + 1)
    num = torch.einsum("bhn,bnhv->bhv", e, v_win.to(dt)) + lin[..., :-1]
    den = e.sum(-1, keepdim=True) + lin[..., -1:]
    return (num / (den + eps)).to(v.dtype), WindowState(kv, k_win, v_win, fk_win)
