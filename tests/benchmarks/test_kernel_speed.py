"""pytest-benchmark entries for the CPU fast paths (timings only with --benchmark-enable):

    python -m pytest tests/benchmarks --benchmark-enable --benchmark-columns=median,iqr

Under the default --benchmark-disable each body runs once, as a smoke test. Sweeps over
sequence length, with status rows for timeouts and out-of-memory, are `linbench speed`
(kernel level: `--mode fwd,fwdbwd`; tests/speed checks its rows, not its timings).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linbench import kernels

B, H, D = 1, 8, 64


def _qkv(T):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, T, H, D, generator=g) for _ in range(3)]


@pytest.mark.parametrize("T", [2048, 8192], ids=lambda t: f"T{t}")
def test_linear_attention_chunked(benchmark, T):
    q, k, v = _qkv(T)
    o, _ = benchmark(kernels.linear_attention, q, k, v, backend="torch")
    assert o.shape == (B, T, H, D)


@pytest.mark.parametrize("T", [2048, 8192], ids=lambda t: f"T{t}")
def test_sdpa_causal(benchmark, T):
    q, k, v = (x.transpose(1, 2) for x in _qkv(T))
    o = benchmark(F.scaled_dot_product_attention, q, k, v, is_causal=True)
    assert o.shape == (B, H, T, D)


@pytest.mark.parametrize("name", ["gated_linear_attention", "delta_rule",
                                  "sliding_window_attention"])
def test_other_mixers_chunked_T8k(benchmark, name):
    q, k, v = _qkv(8192)
    extra = {"gated_linear_attention": lambda: (F.logsigmoid(torch.randn(B, 8192, H, D)) / 16,),
             "delta_rule": lambda: (torch.rand(B, 8192, H),),
             "sliding_window_attention": lambda: ()}[name]()
    if name == "delta_rule":
        k = F.normalize(k, dim=-1)
    out = benchmark(getattr(kernels, name), q, k, v, *extra, backend="torch")
    o = out[0] if isinstance(out, tuple) else out
    assert torch.isfinite(o).all()
