"""The public dispatcher linbench.kernels: backend routing, errors, the lazy Triton
namespace linbench.kernels.triton, and importing no triton until asked."""
from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

import linbench.kernels as K
from linbench.kernels import dispatch
from linbench.kernels.common import OPS
from linbench.kernels.linear.chunked import linear_attention_chunked
from linbench.kernels.window.chunked import (sliding_window_attention_chunked,
                                             window_linear_attention_chunked)

B, T, H, D = 1, 40, 2, 8


def _inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    fq, fk = (torch.rand(B, T, H, 4, generator=g, dtype=torch.float64) for _ in range(2))
    return dict(q=q, k=k, v=v, fq=fq, fk=fk, g=torch.nn.functional.logsigmoid(q),
                beta=torch.rand(B, T, H, generator=g, dtype=torch.float64),
                gamma=torch.tensor([0.2, 0.7], dtype=torch.float64))


CALLS = {
    "linear_attention": lambda d, **kw: K.linear_attention(d["q"], d["k"], d["v"], decay=-d["gamma"],
                                                           output_final_state=True, **kw),
    "gated_linear_attention": lambda d, **kw: K.gated_linear_attention(
        d["q"], d["k"], d["v"], d["g"], output_final_state=True, **kw),
    "delta_rule": lambda d, **kw: K.delta_rule(d["q"], torch.nn.functional.normalize(d["k"], dim=-1),
                                               d["v"], d["beta"], output_final_state=True, **kw),
    "sliding_window_attention": lambda d, **kw: K.sliding_window_attention(
        d["q"], d["k"], d["v"], window=8, **kw),
    "window_linear_attention": lambda d, **kw: K.window_linear_attention(
        d["q"], d["k"], d["v"], d["fq"], d["fk"], window=8, gamma=d["gamma"], **kw),
}


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name", list(CALLS))
def test_torch_auto_and_reference_agree(kit, name):
    d = _inputs()
    torch_out = CALLS[name](d, backend="torch", chunk_size=16)
    auto_out = CALLS[name](d, chunk_size=16)  # CPU tensors: auto means torch
    ref_out = CALLS[name](d, backend="reference")
    assert torch.equal(_first(torch_out), _first(auto_out))
    kit.close(_first(torch_out), _first(ref_out), "o")
    if isinstance(torch_out, tuple):
        kit.close(torch_out[1], ref_out[1], "final state")


def test_torch_backend_is_the_chunked_form():
    d = _inputs()
    o, s = K.linear_attention(d["q"], d["k"], d["v"], output_final_state=True, chunk_size=8,
                              backend="torch")
    o2, s2 = linear_attention_chunked(d["q"], d["k"], d["v"], output_final_state=True,
                                      chunk_size=8)
    assert torch.equal(o, o2) and torch.equal(s, s2)
    o = K.sliding_window_attention(d["q"], d["k"], d["v"], window=5, chunk_size=4, backend="torch")
    assert torch.equal(o, sliding_window_attention_chunked(d["q"], d["k"], d["v"], window=5, block=4))


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_window_states_from_any_backend(kit, backend):
    d = _inputs()
    y, state = K.window_linear_attention(d["q"], d["k"], d["v"], d["fq"], d["fk"], window=8,
                                         gamma=d["gamma"], output_final_state=True, backend=backend)
    _, want = window_linear_attention_chunked(d["q"], d["k"], d["v"], d["fq"], d["fk"], window=8,
                                              gamma=d["gamma"], output_final_state=True)
    assert isinstance(state, K.WindowState)
    kit.close(state.kv, want.kv, "kv")
    assert all(torch.equal(a, b) for a, b in zip(state[1:], want[1:]))
    o, cache = K.sliding_window_attention(d["q"], d["k"], d["v"], window=8, output_final_state=True,
                                          backend=backend)
    assert isinstance(cache, K.WindowCache) and torch.equal(cache.k, d["k"][:, -8:])


def test_unknown_backend_names_the_valid_ones():
    d = _inputs()
    with pytest.raises(ValueError, match="'cuda'.*auto, torch, triton, reference"):
        K.linear_attention(d["q"], d["k"], d["v"], backend="cuda")


def _fake_triton(monkeypatch, **fns):
    fake = types.ModuleType("linbench.kernels.triton")
    for name, fn in fns.items():
        setattr(fake, name, fn)
    fake.available = lambda name: name in fns
    monkeypatch.setitem(sys.modules, "linbench.kernels.triton", fake)


def test_triton_backend_routes_and_binds_chunk_size_only_if_accepted(monkeypatch):
    seen = {}

    def linear_attention(q, k, v, *, chunk_size=64, **kw):
        seen["linear"] = (chunk_size, kw["output_final_state"])
        return "triton-linear", None

    def sliding_window_attention(q, k, v, *, window=64, scale=None):
        seen["swa"] = window
        return "triton-swa"

    _fake_triton(monkeypatch, linear_attention=linear_attention,
                 sliding_window_attention=sliding_window_attention)
    d = _inputs()
    assert K.linear_attention(d["q"], d["k"], d["v"], chunk_size=32, backend="triton")[0] == "triton-linear"
    assert seen["linear"] == (32, False)
    assert K.sliding_window_attention(d["q"], d["k"], d["v"], window=4, backend="triton") == "triton-swa"
    assert seen["swa"] == 4
    # auto picks triton only for CUDA tensors whose kernel is available
    cuda_like = types.SimpleNamespace(is_cuda=True)
    assert dispatch._resolve("linear_attention", "auto", cuda_like, 64)[0] is linear_attention
    assert dispatch._resolve("delta_rule", "auto", cuda_like, 64)[0].__name__ == "delta_rule_chunked"
    assert dispatch._resolve("linear_attention", "auto", d["q"], 64)[0] is linear_attention_chunked


def test_missing_triton_kernel_is_a_clear_error(monkeypatch):
    _fake_triton(monkeypatch)
    d = _inputs()
    with pytest.raises(RuntimeError, match="Triton kernel 'gated_linear_attention' is not available"):
        K.gated_linear_attention(d["q"], d["k"], d["v"], d["g"], backend="triton")


def test_real_triton_kernel_when_available(kit):
    """Through the Triton CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""
    from linbench.kernels.triton import available
    if not available("sliding_window_attention"):
        pytest.skip("the Triton sliding-window kernel is not available")
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 20, 2, 16, generator=g) for _ in range(3))
    o = K.sliding_window_attention(q, k, v, window=6, backend="triton")
    kit.close(o, K.sliding_window_attention(q.double(), k.double(), v.double(), window=6,
                                            backend="reference"), "o", tol=1e-3)


def test_every_form_of_every_kernel_is_in_its_op_folder():
    """<op>/reference.py <name>_ref, chunked.py <name>_chunked, recurrent.py <name>_step,
    triton.py <name> (the Triton one imported through linbench.kernels.triton)."""
    import importlib
    assert set(OPS) == set(CALLS)
    for name, op in OPS.items():
        for form, attr in (("reference", name + "_ref"), ("chunked", name + "_chunked"),
                           ("recurrent", name + "_step")):
            module = importlib.import_module(f"linbench.kernels.{op}.{form}")
            assert callable(getattr(module, attr)), (op, form, attr)
        assert getattr(K, name + "_step") is getattr(
            importlib.import_module(f"linbench.kernels.{op}.recurrent"), name + "_step")


def test_available_reports_every_kernel():
    pytest.importorskip("triton")
    from linbench.kernels import triton as kt
    from linbench.kernels.linear.triton import linear_attention
    assert all(kt.available(name) for name in OPS)
    assert not kt.available("no_such_kernel")
    assert kt.linear_attention is linear_attention


def test_import_does_not_import_triton():
    code = ("import sys, torch, linbench.kernels as K\n"
            "x = torch.randn(1, 9, 2, 4)\n"
            "K.linear_attention(x, x, x); K.sliding_window_attention(x, x, x, window=3)\n"
            "K.linear_attention_step(x[:, 0], x[:, 0], x[:, 0], None)\n"
            "assert 'triton' not in sys.modules, 'triton was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
