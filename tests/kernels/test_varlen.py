"""Packed sequences (cu_seqlens) against one reference call per sequence: outputs, final
states and gradients, for the three linear mixers through the public API."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import linbench.kernels as K
from linbench.kernels.delta.reference import delta_rule_ref
from linbench.kernels.gla.reference import gated_linear_attention_ref
from linbench.kernels.linear.reference import linear_attention_ref
from linbench.kernels.varlen import run_varlen

CU = [0, 17, 17, 60, 100]  # an empty sequence and lengths that are not multiples of 16
N, TOTAL, H, DK, DV = len(CU) - 1, CU[-1], 2, 8, 4


def _per_sequence(fn, seq, initial_state, seq_kw=None, **kw):
    """The obvious loop: fn on each sequence, outputs concatenated, states stacked."""
    outs, finals = [], []
    for n in range(N):
        lo, hi = CU[n], CU[n + 1]
        s0 = None if initial_state is None else initial_state[n:n + 1]
        if lo == hi:  # an empty sequence keeps its initial state
            finals.append(s0.float())
            continue
        extra = {key: x[:, lo:hi] for key, x in (seq_kw or {}).items()}
        o, f = fn(*(x[:, lo:hi] for x in seq), **extra, initial_state=s0, output_final_state=True, **kw)
        outs.append(o)
        finals.append(f)
    return torch.cat(outs, 1), torch.cat(finals, 0)


def _packed(dtype, seed=0, positive=False):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, TOTAL, H, DK, generator=g, dtype=dtype) for _ in range(2))
    if positive:
        q, k = q.abs() + 0.1, k.abs() + 0.1
    v = torch.randn(1, TOTAL, H, DV, generator=g, dtype=dtype)
    return q, k, v, g


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_linear_varlen(kit, dtype, backend):
    q, k, v, g = _packed(dtype, positive=True)
    decay = -torch.rand(H, generator=g, dtype=dtype)
    s0 = torch.rand(N, H, DK, DV + 1, generator=g)
    leaves = [x.requires_grad_() for x in (q, k, v, s0)]
    cu = torch.tensor(CU, dtype=torch.int32)
    kit.compare(lambda q, k, v, s: K.linear_attention(q, k, v, decay=decay, normalize=True,
                                                      initial_state=s, output_final_state=True,
                                                      cu_seqlens=cu, chunk_size=16, backend=backend),
                lambda q, k, v, s: _per_sequence(linear_attention_ref, (q, k, v), s,
                                                 decay=decay.double(), normalize=True),
                leaves, ["q", "k", "v", "initial_state"])


def test_gla_varlen(kit, dtype):
    q, k, v, g = _packed(dtype)
    gate = F.logsigmoid(torch.randn(1, TOTAL, H, DK, generator=g, dtype=dtype))
    s0 = torch.randn(N, H, DK, DV, generator=g)
    leaves = [x.requires_grad_() for x in (q, k, v, gate, s0)]
    cu = torch.tensor(CU)
    kit.compare(lambda q, k, v, gt, s: K.gated_linear_attention(
                    q, k, v, gt, initial_state=s, output_final_state=True, cu_seqlens=cu,
                    chunk_size=16, backend="torch"),
                lambda q, k, v, gt, s: _per_sequence(gated_linear_attention_ref, (q, k, v, gt), s),
                leaves, ["q", "k", "v", "g", "initial_state"])


def test_delta_varlen(kit, dtype):
    q, k, v, g = _packed(dtype)
    k = F.normalize(k, dim=-1)
    beta = torch.rand(1, TOTAL, H, generator=g, dtype=dtype)
    gate = -torch.rand(1, TOTAL, H, generator=g, dtype=dtype)
    s0 = torch.randn(N, H, DK, DV, generator=g)
    leaves = [x.requires_grad_() for x in (q, k, v, beta, gate, s0)]
    cu = torch.tensor(CU)
    kit.compare(lambda q, k, v, b, gt, s: K.delta_rule(
                    q, k, v, b, g=gt, initial_state=s, output_final_state=True, cu_seqlens=cu,
                    chunk_size=16, backend="torch"),
                lambda q, k, v, b, gt, s: _per_sequence(delta_rule_ref, (q, k, v, b), s,
                                                        seq_kw={"g": gt}),
                leaves, ["q", "k", "v", "beta", "g", "initial_state"])


def test_varlen_without_states():
    q, k, v, _ = _packed(torch.float64)
    o, final = K.linear_attention(q, k, v, cu_seqlens=torch.tensor(CU), backend="torch")
    assert final is None
    lo, hi = CU[3], CU[4]
    o_last, _ = linear_attention_ref(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi])
    assert torch.allclose(o[:, lo:hi], o_last, atol=1e-12)
    _, final = K.linear_attention(q, k, v, cu_seqlens=torch.tensor(CU), output_final_state=True)
    assert final.shape == (N, H, DK, DV) and torch.all(final[1] == 0)  # the empty sequence


@pytest.mark.parametrize("cu,match", [
    ([1, 50, 100], "rise from 0"), ([0, 50, 99], "rise from 0"), ([0, 60, 50, 100], "rise from 0"),
    ([0.0, 100.0], "integer"), ([[0, 100]], "1-D")])
def test_bad_cu_seqlens(cu, match):
    q = torch.randn(1, 100, 2, 4)
    with pytest.raises(ValueError, match=match):
        K.linear_attention(q, q, q, cu_seqlens=torch.tensor(cu))


def test_bad_batch_or_state_count():
    q = torch.randn(2, 10, 2, 4)
    with pytest.raises(ValueError, match="batch size 1"):
        run_varlen(K.linear_attention, (q, q, q), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="2 states for 1 sequences"):
        K.linear_attention(q[:1], q[:1], q[:1], cu_seqlens=torch.tensor([0, 10]),
                           initial_state=torch.zeros(2, 2, 4, 4))
