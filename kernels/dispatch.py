"""The backend dispatcher behind the public API of linbench.kernels (see its docstring):
each full-sequence op resolves `backend` to its torch, Triton or reference form."""
from __future__ import annotations

import importlib
import inspect

from linbench.kernels.common import OPS
from linbench.kernels.delta.recurrent import delta_rule_step
from linbench.kernels.gla.recurrent import gated_linear_attention_step
from linbench.kernels.linear.recurrent import linear_attention_step
from linbench.kernels.window.recurrent import (WindowCache, WindowState,
                                               sliding_window_attention_step,
                                               window_linear_attention_step)

BACKENDS = ("auto", "torch", "triton", "reference")

# name -> the keyword of its torch form that takes `chunk_size` (the window ones: a query block)
_CHUNK_KEYWORD = {
    "linear_attention": "chunk_size",
    "gated_linear_attention": "chunk_size",
    "delta_rule": "chunk_size",
    "sliding_window_attention": "block",
    "window_linear_attention": "block",
}


def _torch_form(name: str, form: str):
    """<op>/reference.py:<name>_ref or <op>/chunked.py:<name>_chunked."""
    module = importlib.import_module(f"linbench.kernels.{OPS[name]}.{form}")
    return getattr(module, name + {"reference": "_ref", "chunked": "_chunked"}[form])


def _triton(name: str):
    """The Triton kernel `name`, or a RuntimeError saying why it cannot be used."""
    try:
        module = importlib.import_module("linbench.kernels.triton")
        return getattr(module, name)
    except (ImportError, AttributeError) as err:
        raise RuntimeError(f"backend='triton': the Triton kernel {name!r} is not available "
                           f"({type(err).__name__}: {err}); use backend='torch'") from err


def _resolve(name: str, backend: str, q, chunk_size):
    """(function, its chunk keyword argument): the form `backend` picks for kernel `name`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "torch"
        if q.is_cuda:
            from linbench.kernels.triton import available
            backend = "triton" if available(name) else "torch"
    if backend == "reference":
        return _torch_form(name, "reference"), {}
    if backend == "torch":
        return _torch_form(name, "chunked"), {_CHUNK_KEYWORD[name]: chunk_size}
    fn = _triton(name)
    try:
        accepts = "chunk_size" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        accepts = False
    return fn, ({"chunk_size": chunk_size} if accepts else {})


def _call_linear(name, seq, kwargs, *, initial_state, output_final_state, cu_seqlens,
                 chunk_size, backend, seq_kwargs=None):
    fn, extra = _resolve(name, backend, seq[0], chunk_size)
    kwargs = {**kwargs, **extra}
    if cu_seqlens is not None:
        from linbench.kernels.varlen import run_varlen
        return run_varlen(fn, seq, cu_seqlens, initial_state=initial_state,
                          output_final_state=output_final_state, seq_kwargs=seq_kwargs, **kwargs)
    return fn(*seq, **(seq_kwargs or {}), **kwargs, initial_state=initial_state,
              output_final_state=output_final_state)


def linear_attention(q, k, v, *, decay=None, normalize=False, scale=None, eps=1e-6,
                     initial_state=None, output_final_state=False, cu_seqlens=None,
                     chunk_size=64, backend="auto"):
    """Causal linear attention (optional fixed per-head log-decay and normalizer)."""
    return _call_linear("linear_attention", (q, k, v),
                        dict(decay=decay, normalize=normalize, scale=scale, eps=eps),
                        initial_state=initial_state, output_final_state=output_final_state,
                        cu_seqlens=cu_seqlens, chunk_size=chunk_size, backend=backend)


def gated_linear_attention(q, k, v, g, *, scale=None, initial_state=None,
                           output_final_state=False, cu_seqlens=None, chunk_size=64,
                           backend="auto"):
    """GLA with per-channel log-gates g (B, T, H, K)."""
    return _call_linear("gated_linear_attention", (q, k, v, g), dict(scale=scale),
                        initial_state=initial_state, output_final_state=output_final_state,
                        cu_seqlens=cu_seqlens, chunk_size=chunk_size, backend=backend)


def delta_rule(q, k, v, beta, *, g=None, scale=None, initial_state=None,
               output_final_state=False, cu_seqlens=None, chunk_size=64, backend="auto"):
    """(Gated) delta rule; beta (B, T, H), g (B, T, H) optional scalar log-gate."""
    return _call_linear("delta_rule", (q, k, v, beta), dict(scale=scale),
                        initial_state=initial_state, output_final_state=output_final_state,
                        cu_seqlens=cu_seqlens, chunk_size=chunk_size, backend=backend,
                        seq_kwargs={"g": g})


def _continued(state, q, k, v, fq=None, fk=None):
    """Inputs extended by a window state's cached tokens in front (their queries zero and
    their outputs dropped by the caller), so a prefill continues in one call: returns
    (q, k, v, fq, fk, n cached tokens). Feature maps given as callables stay as they are."""
    import torch
    n = state.k.shape[1]
    if n == 0:
        return q, k, v, fq, fk, 0

    def front(x, cached):
        return torch.cat([cached.to(x.dtype), x], 1)

    def zeros(x):
        return torch.cat([x.new_zeros(x.shape[0], n, *x.shape[2:]), x], 1)
    q, k, v = zeros(q), front(k, state.k), front(v, state.v)
    if fq is not None and not callable(fq):
        fq, fk = zeros(fq), front(fk, state.fk)
    return q, k, v, fq, fk, n


def sliding_window_attention(q, k, v, *, window=64, scale=None, output_final_state=False,
                             initial_state=None, chunk_size=64, backend="auto"):
    """Softmax over the last `window` keys -> o, or (o, WindowCache) with output_final_state.
    initial_state: the WindowCache of the tokens before q (a prefill continued in chunks)."""
    fn, extra = _resolve("sliding_window_attention", backend, q, chunk_size)
    n = 0
    if initial_state is not None:
        q, k, v, _, _, n = _continued(initial_state, q, k, v)
    o = fn(q, k, v, window=window, scale=scale, **extra)
    o = o[:, n:] if n else o
    if not output_final_state:
        return o
    from linbench.kernels.window.recurrent import window_cache
    return o, window_cache(k, v, window)


def window_linear_attention(q, k, v, fq, fk, *, window=64, gamma, scale=None, eps=1e-6,
                            output_final_state=False, initial_state=None, chunk_size=64,
                            backend="auto"):
    """LoLCATs window + linear hybrid -> y, or (y, WindowState) with output_final_state.
    initial_state: the WindowState of the tokens before q (a prefill continued in chunks):
    its cached tokens are the window's first keys, its linear state the older keys'."""
    fn, extra = _resolve("window_linear_attention", backend, q, chunk_size)
    n, kv = 0, None
    if initial_state is not None:
        q, k, v, fq, fk, n = _continued(initial_state, q, k, v, fq, fk)
        kv = initial_state.kv
    y = fn(q, k, v, fq, fk, window=window, gamma=gamma, scale=scale, eps=eps, initial_kv=kv,
           **extra)
    y = y[:, n:] if n else y
    if not output_final_state:
        return y
    from linbench.kernels.window.recurrent import window_state
    return y, window_state(k, v, fk, window, initial_kv=kv)


__all__ = ["BACKENDS", "linear_attention", "gated_linear_attention", "delta_rule",
           "sliding_window_attention", "window_linear_attention", "linear_attention_step",
           "gated_linear_attention_step", "delta_rule_step", "sliding_window_attention_step",
           "window_linear_attention_step", "WindowCache", "WindowState"]
