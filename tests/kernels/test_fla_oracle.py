"""External oracle: fla's naive token-recurrent functions (CPU torch, written by others).

Our references (linbench.kernels.<op>.reference) and chunked torch forms are checked against
fla 0.6's slow twins: output, final state and every gradient, in fp32 (fla's naive
functions compute in fp32 whatever the input dtype). Conventions mapped here:
  - fla.ops.linear_attn.naive_recurrent_linear_attn: (B, T, H, D), normalize divides by
    (scale q . cumsum k + 1e-10) -> ours with normalize=True, eps=1e-10.
  - fla.ops.simple_gla.naive_recurrent_simple_gla: scalar log-gate g (B, T, H) -> our fixed
    per-head `decay` (H,) broadcast over (B, T).
  - fla.ops.gla.naive_recurrent_gla: per-channel log-gate gk (B, T, H, K), scale fixed to
    K ** -0.5 (our default).
  - fla.ops.delta_rule.naive.delta_rule_recurrence: layout (B, H, T, D), beta (B, H, T),
    scale fixed to K ** -0.5.
  - fla.ops.gated_delta_rule.naive_recurrent_gated_delta_rule: (B, T, H, D), g (B, T, H).
Our chunked modules are imported inside the tests (they are ours: a missing one is an
error, not a skip); only fla itself may be absent.
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from linbench.kernels.common import OPS

pytest.importorskip("fla")
from fla.ops.delta_rule.naive import delta_rule_recurrence  # noqa: E402
from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule  # noqa: E402
from fla.ops.gla.naive import naive_recurrent_gla  # noqa: E402
from fla.ops.linear_attn.naive import naive_recurrent_linear_attn  # noqa: E402
from fla.ops.simple_gla.naive import naive_recurrent_simple_gla  # noqa: E402

B, T, H, K, V = 2, 100, 3, 16, 8  # T = 100: one whole and one partial chunk of 64
TOL = 1e-4


def ours(kind: str, op: str):
    """Our implementation `op` in form `kind` ("reference" or "chunked")."""
    module = importlib.import_module(f"linbench.kernels.{OPS[op]}.{kind}")
    return getattr(module, op + {"reference": "_ref", "chunked": "_chunked"}[kind])


def leaves(seed: int, init: bool, **extra):
    """Random fp32 leaf tensors requiring grad: q, k, v (+ s0) + whatever `extra` builds."""
    gen = torch.Generator().manual_seed(seed)
    out = {"q": torch.randn(B, T, H, K, generator=gen), "k": torch.randn(B, T, H, K, generator=gen),
           "v": torch.randn(B, T, H, V, generator=gen)}
    if init:
        out["s0"] = torch.randn(B, H, K, V, generator=gen) * 0.5
    for name, shape in extra.items():
        out[name] = torch.randn(*shape, generator=gen)
    for t in out.values():
        t.requires_grad_(True)
    return out


def outputs_and_grads(o, S, x, seed=7):
    """(o, S, {leaf: grad}) for a random linear functional of o (and S when given)."""
    gen = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=gen)).sum()
    if S is not None:
        loss = loss + (S * torch.randn(S.shape, generator=gen)).sum()
    grads = torch.autograd.grad(loss, list(x.values()), retain_graph=True)  # shared inputs
    return o.detach(), None if S is None else S.detach(), dict(zip(x, grads))


def assert_matches(mine, theirs, what):
    names = ["output", "final state"]
    for name, a, b in zip(names, mine[:2], theirs[:2]):
        if b is None:
            continue
        assert a is not None, f"{what}: no {name}"
        assert a.shape == b.shape, f"{what} {name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        err = (a - b).abs().max().item()
        assert err <= TOL * max(1.0, b.abs().max().item()), f"{what} {name}: max err {err:.2e}"
    for name, gb in theirs[2].items():
        ga = mine[2][name]
        err = (ga - gb).abs().max().item()
        bound = TOL * max(1.0, gb.abs().max().item())
        assert err <= bound, f"{what} grad {name}: max err {err:.2e}"


KINDS = ["reference", "chunked"]
INIT = [pytest.param(False, id="zero-state"), pytest.param(True, id="init-state")]


@pytest.mark.parametrize("init", INIT)
@pytest.mark.parametrize("kind", KINDS)
def test_linear_attention_vs_fla_linear_attn(kind, init):
    x = leaves(0, init)
    s0 = x.get("s0")
    theirs = outputs_and_grads(*naive_recurrent_linear_attn(
        x["q"], x["k"], x["v"], scale=0.3, initial_state=s0, output_final_state=True), x)
    mine = outputs_and_grads(*ours(kind, "linear_attention")(
        x["q"], x["k"], x["v"], scale=0.3, initial_state=s0, output_final_state=True), x)
    assert_matches(mine, theirs, f"linear_attention[{kind}]")


@pytest.mark.parametrize("kind", KINDS)
def test_normalized_linear_attention_vs_fla_linear_attn(kind):
    x = leaves(1, False)
    fq, fk = F.elu(x["q"]) + 1, F.elu(x["k"]) + 1  # positive feature maps: den > 0
    o_theirs, _ = naive_recurrent_linear_attn(fq, fk, x["v"], normalize=True)
    theirs = outputs_and_grads(o_theirs, None, x)
    o_mine, _ = ours(kind, "linear_attention")(fq, fk, x["v"], normalize=True, eps=1e-10)
    assert_matches(outputs_and_grads(o_mine, None, x), theirs, f"normalized[{kind}]")


@pytest.mark.parametrize("init", INIT)
@pytest.mark.parametrize("kind", KINDS)
def test_decayed_linear_attention_vs_fla_simple_gla(kind, init):
    x = leaves(2, init, d=(H,))
    decay = F.logsigmoid(x["d"] + 3.0)  # (H,) log-decay per head, exp ~0.95
    g = decay.expand(B, T, H)  # fla: one scalar log-gate per token and head
    theirs = outputs_and_grads(*naive_recurrent_simple_gla(
        x["q"], x["k"], x["v"], g, initial_state=x.get("s0"), output_final_state=True), x)
    mine = outputs_and_grads(*ours(kind, "linear_attention")(
        x["q"], x["k"], x["v"], decay=decay, initial_state=x.get("s0"),
        output_final_state=True), x)
    assert_matches(mine, theirs, f"decay[{kind}]")


@pytest.mark.parametrize("init", INIT)
@pytest.mark.parametrize("kind", KINDS)
def test_gated_linear_attention_vs_fla_gla(kind, init):
    x = leaves(3, init, gk=(B, T, H, K))
    gk = F.logsigmoid(x["gk"] + 2.0)  # (B, T, H, K) per-channel log-gates
    theirs = outputs_and_grads(*naive_recurrent_gla(
        x["q"], x["k"], x["v"], gk, initial_state=x.get("s0"), output_final_state=True), x)
    mine = outputs_and_grads(*ours(kind, "gated_linear_attention")(
        x["q"], x["k"], x["v"], gk, initial_state=x.get("s0"), output_final_state=True), x)
    assert_matches(mine, theirs, f"gla[{kind}]")


def _delta_inputs(seed, init, gated):
    x = leaves(seed, init, b=(B, T, H), **({"g": (B, T, H)} if gated else {}))
    q, k = F.normalize(x["q"], dim=-1), F.normalize(x["k"], dim=-1)  # DeltaNet's L2 norm
    beta = torch.sigmoid(x["b"])  # (B, T, H)
    g = F.logsigmoid(x["g"] + 2.0) if gated else None
    return x, q, k, beta, g


@pytest.mark.parametrize("init", INIT)
@pytest.mark.parametrize("kind", KINDS)
def test_delta_rule_vs_fla_delta_rule(kind, init):
    x, q, k, beta, _ = _delta_inputs(4, init, gated=False)
    bhtd = [t.transpose(1, 2) for t in (q, k, x["v"])]  # fla's (B, H, T, D) layout
    o, S = delta_rule_recurrence(*bhtd, beta.transpose(1, 2), initial_state=x.get("s0"),
                                 output_final_state=True)
    theirs = outputs_and_grads(o.transpose(1, 2), S, x)
    kw = {"chunk_size": 16} if kind == "chunked" else {}
    mine = outputs_and_grads(*ours(kind, "delta_rule")(
        q, k, x["v"], beta, initial_state=x.get("s0"), output_final_state=True, **kw), x)
    assert_matches(mine, theirs, f"delta[{kind}]")


@pytest.mark.parametrize("init", INIT)
@pytest.mark.parametrize("kind", KINDS)
def test_gated_delta_rule_vs_fla_gated_delta_rule(kind, init):
    x, q, k, beta, g = _delta_inputs(5, init, gated=True)
    theirs = outputs_and_grads(*naive_recurrent_gated_delta_rule(
        q, k, x["v"], beta, g, scale=0.2, initial_state=x.get("s0"), output_final_state=True), x)
    kw = {"chunk_size": 16} if kind == "chunked" else {}
    mine = outputs_and_grads(*ours(kind, "delta_rule")(
        q, k, x["v"], beta, g=g, scale=0.2, initial_state=x.get("s0"),
        output_final_state=True, **kw), x)
    assert_matches(mine, theirs, f"gated delta[{kind}]")
