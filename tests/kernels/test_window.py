"""Blockwise sliding-window softmax and the LoLCATs hybrid against the quadratic
references: outputs, every gradient (q, k, v; fq, fk, gamma), decode states, memory."""
from __future__ import annotations

import pytest
import torch

from linbench.kernels import window as window_mod
from linbench.kernels.reference import sliding_window_attention_ref, window_linear_attention_ref
from linbench.kernels.window import (WindowState, sliding_window_attention_chunked,
                                     window_linear_attention_chunked)

# (window, query block): window > block, block > window, window longer than every T
WINDOWS = [(16, 8), (5, 16), (256, 32)]
WINDOW_IDS = [f"W{w}-blk{b}" for w, b in WINDOWS]
FEAT = 6


def _features(shape, dtype, seed=7):
    """Positive feature-mapped fq, fk (B, T, H, F) and gamma (H,) in (0, 1), as leaves."""
    g = torch.Generator().manual_seed(seed)
    fq = torch.rand(shape.B, shape.T, shape.H, FEAT, generator=g, dtype=dtype)
    fk = torch.rand(shape.B, shape.T, shape.H, FEAT, generator=g, dtype=dtype)
    gamma = torch.sigmoid(torch.randn(shape.H, generator=g, dtype=dtype))
    return [x.requires_grad_() for x in (fq, fk, gamma)]


@pytest.mark.parametrize("window,block", WINDOWS, ids=WINDOW_IDS)
def test_sliding_window_matches_reference(kit, shape, dtype, window, block):
    q, k, v = kit.qkv(shape, dtype)

    def run(fn, **kw):
        return lambda q, k, v: fn(q, kit.heads(k, shape), kit.heads(v, shape), window=window, **kw)

    (o,) = kit.compare(run(sliding_window_attention_chunked, block=block),
                       run(sliding_window_attention_ref), [q, k, v], ["q", "k", "v"], ["o"])
    assert o.dtype == dtype


@pytest.mark.parametrize("window,block", WINDOWS, ids=WINDOW_IDS)
def test_hybrid_matches_reference(kit, shape, dtype, window, block):
    q, k, v = kit.qkv(shape, dtype)
    fq, fk, gamma = _features(shape, dtype)

    def run(fn, **kw):
        return lambda q, k, v, fq, fk, gamma: fn(q, kit.heads(k, shape), kit.heads(v, shape), fq, fk,
                                                 window=window, gamma=gamma, **kw)

    kit.compare(run(window_linear_attention_chunked, block=block, chunk_size=shape.C),
                run(window_linear_attention_ref), [q, k, v, fq, fk, gamma],
                ["q", "k", "v", "fq", "fk", "gamma"], ["y"], floors={"gamma": 1.0})


@pytest.mark.parametrize("T", [10, 16, 41])
def test_hybrid_final_state(kit, T):
    """kv sums fk_j [v_j, 1] over tokens out of the window; k, v, fk are the last tokens."""
    shape, window = kit.Shape(2, T, 3, 8, 5), 16
    q, k, v = kit.qkv(shape, torch.float64)
    fq, fk, gamma = _features(shape, torch.float64)
    y, state = window_linear_attention_chunked(q, k, v, fq, fk, window=window, gamma=gamma,
                                               output_final_state=True, chunk_size=8)
    assert isinstance(state, WindowState)
    kit.close(y, window_linear_attention_ref(q, k, v, fq, fk, window=window, gamma=gamma), "y")
    old = max(T - window, 0)
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1)
    want = sum((fk[:, j, :, :, None] * v1[:, j, :, None, :] for j in range(old)),
               torch.zeros(2, 3, FEAT, 6, dtype=torch.float64))
    assert state.kv.dtype == torch.float32
    kit.close(state.kv, want, "kv")
    for name, got, full in (("k", state.k, k), ("v", state.v, v), ("fk", state.fk, fk)):
        assert torch.equal(got, full[:, old:]), name
    o, cache = sliding_window_attention_chunked(q, k, v, window=window, output_final_state=True)
    assert torch.equal(cache.k, k[:, -window:]) and torch.equal(cache.v, v[:, -window:])


def test_many_groups_checkpointed(kit, monkeypatch):
    """One query block per group: every group runs under checkpoint in the backward."""
    monkeypatch.setattr(window_mod, "GROUP_SCORE_ELEMENTS", 1)
    shape = kit.Shape(2, 75, 2, 8, 4)
    q, k, v = kit.qkv(shape, torch.float64)
    fq, fk, gamma = _features(shape, torch.float64)
    kit.compare(lambda q, k, v: sliding_window_attention_chunked(q, k, v, window=12, block=8),
                lambda q, k, v: sliding_window_attention_ref(q, k, v, window=12),
                [q, k, v], ["q", "k", "v"], ["o"])
    kit.compare(lambda *a: window_linear_attention_chunked(*a[:5], window=12, gamma=a[5], block=8,
                                                          chunk_size=16),
                lambda *a: window_linear_attention_ref(*a[:5], window=12, gamma=a[5]),
                [q, k, v, fq, fk, gamma], ["q", "k", "v", "fq", "fk", "gamma"], ["y"])


def test_scores_are_banded_not_quadratic():
    """Autograd keeps O(T * (block + window)) per head for the scores, never T x T."""
    B, T, H, D, window, block = 1, 1024, 2, 8, 16, 16
    q, k, v = (torch.randn(B, T, H, D, requires_grad=True) for _ in range(3))
    fq, fk = (torch.rand(B, T, H, 4, requires_grad=True) for _ in range(2))
    gamma = torch.full((H,), 0.1, requires_grad=True)
    band = B * H * T * (block + window)
    for fn in (lambda: sliding_window_attention_chunked(q, k, v, window=window, block=block),
               lambda: window_linear_attention_chunked(q, k, v, fq, fk, window=window, gamma=gamma,
                                                       block=block)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                      lambda t: t):
            out = fn()
        assert max(saved) <= band < B * H * T * T // 16, (max(saved), band)
        out.sum().backward()


def test_bad_arguments():
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="window"):
        sliding_window_attention_chunked(q, q, q, window=0)
    with pytest.raises(ValueError, match="shape mismatch"):
        sliding_window_attention_chunked(q, q[:, :, :1], q)
    with pytest.raises(ValueError, match="feature shape"):
        window_linear_attention_chunked(q, q, q, q, q[..., :2], gamma=torch.ones(2))
