"""Packed variable-length sequences (`cu_seqlens`) for the linear mixers.

Sequences are packed along T: q (1, total, H, K), sequence n occupying
[cu_seqlens[n], cu_seqlens[n + 1]). This is a generic wrapper, not a fused kernel: it
splits the packed tensors, runs the per-sequence function on each (with its own initial
state), concatenates the outputs along T and stacks the final states (N, H, K, V).
Cost: one call per sequence (fine for training batches of a few long sequences; many
short sequences pay Python overhead per call). The public functions of linbench.kernels
take `cu_seqlens=` and call this with the form their backend picked.
"""
from __future__ import annotations

from typing import Callable

import torch


def _bounds(cu_seqlens, total: int) -> list[int]:
    cu = torch.as_tensor(cu_seqlens)
    if cu.dim() != 1 or cu.numel() < 2 or cu.dtype.is_floating_point:
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor of N + 1 offsets, got {cu!r}")
    b = [int(x) for x in cu.tolist()]
    if b[0] != 0 or b[-1] != total or any(x > y for x, y in zip(b, b[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to the packed length {total}, got {b}")
    return b


def run_varlen(fn: Callable, seq: tuple, cu_seqlens, *, initial_state=None,
               output_final_state=False, seq_kwargs: dict | None = None, **kwargs):
    """Apply fn(*seq_n, **seq_kwargs_n, initial_state=s0_n, output_final_state=..., **kwargs)
    to each packed sequence n.

    seq: packed tensors (1, total, ...) split along dim 1 (q, k, v, and g / beta);
    seq_kwargs: packed keyword tensors split the same way (None values passed through);
    initial_state: (N, H, K, V) or None. Returns (o (1, total, H, V), (N, ...) fp32 or None).
    An empty sequence contributes no output; its final state is its initial state (or
    zeros shaped like the other sequences' states).
    """
    total = seq[0].shape[1]
    if seq[0].shape[0] != 1:
        raise ValueError(f"packed inputs must have batch size 1, got {tuple(seq[0].shape)}")
    b = _bounds(cu_seqlens, total)
    N = len(b) - 1
    if initial_state is not None and initial_state.shape[0] != N:
        raise ValueError(f"initial_state has {initial_state.shape[0]} states for {N} sequences")
    seq_kwargs = seq_kwargs or {}
    outs, finals = [], [None] * N
    for n in range(N):
        lo, hi = b[n], b[n + 1]
        if lo == hi:
            continue
        kw = {key: (None if x is None else x[:, lo:hi]) for key, x in seq_kwargs.items()}
        s0 = None if initial_state is None else initial_state[n:n + 1]
        o, final = fn(*(x[:, lo:hi] for x in seq), **kw, **kwargs, initial_state=s0,
                      output_final_state=output_final_state)
        outs.append(o)
        finals[n] = final
    if not outs:
        raise ValueError("cu_seqlens describes only empty sequences")
    o = torch.cat(outs, 1)
    if not output_final_state:
        return o, None
    like = next(f for f in finals if f is not None)[0]
    for n in range(N):
        if finals[n] is None:
            finals[n] = (initial_state[n] if initial_state is not None else torch.zeros_like(like)
                         ).float()[None]
    return o, torch.cat(finals, 0)
