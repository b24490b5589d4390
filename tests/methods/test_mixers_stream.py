"""Long inputs stream through the mixers (methods/README.md, "Streaming (long context)"):
the recurrent mixers run segments with the state carried, HybridWindow maps its features
and MixSum sums segment by segment. Cut into short segments, every linearized method's
kernel-level mixer (what `linbench speed` times) gives the output and the gradients of one
call, with and without autograd, and a wanted state equals one call's."""
from __future__ import annotations

import pytest
import torch

from linbench import registry
from linbench.methods import mixers
from linbench.methods.attention import Heads

METHODS = [m for m in registry.methods.names() if registry.methods.get(m).role != "parent"]
B, T, H, D = 1, 50, 2, 8


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


@pytest.mark.parametrize("name", METHODS)
def test_segments_equal_one_call(monkeypatch, name):
    torch.manual_seed(0)
    mixer = registry.methods.get(name)().mixer(H, D, backend="torch").double()
    for p in mixer.parameters():  # off the initialization (gates, gamma, feature maps)
        p.data.add_(0.1 * torch.randn_like(p))
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    leaves = [q, k, v] + [p for p in mixer.parameters() if p.requires_grad]
    w = torch.randn(B, T, H, D, dtype=torch.float64)

    def run():
        o = mixer(q, k, v)
        return o, torch.autograd.grad((o * w).sum(), leaves, allow_unused=True)

    o_one, g_one = run()
    monkeypatch.setattr(mixers, "STREAM_TOKEN_HEADS", H * 16)  # 16-token segments: 4 of them
    o_seg, g_seg = run()
    with torch.no_grad():
        o_nograd = mixer(q, k, v)
    # the carried state is fp32 by the kernels' contract: fp32 accuracy, not fp64
    assert _rel(o_seg, o_one) < 1e-5 and _rel(o_nograd, o_one) < 1e-5, name
    for a, b in zip(g_seg, g_one):
        assert (a is None) == (b is None)
        if a is not None:
            assert _rel(a, b) < 1e-4, name


def _tensors(state):
    """The tensors of a (nested) state, in order."""
    if torch.is_tensor(state):
        return [state]
    return [t for s in (state or ()) for t in _tensors(s)]


@pytest.mark.parametrize("name", ["gla", "liger"])
def test_streamed_state_equals_one_call(monkeypatch, name):
    """A mixer asked for its state over 4 segments, without autograd: the output and final
    state of one call. gla: GatedMix carries its state; liger: MixSum runs both branches
    segment by segment (the gated state and the window's cached keys and values)."""
    torch.manual_seed(0)
    mixer = registry.methods.get(name)().mixer(H, D, backend="torch").mixer.double()
    x = [torch.randn(B, T, H, D, dtype=torch.float64) for _ in range(3)]
    h = Heads(*x, x[0], x[1], x[0].reshape(B, T, H * D))
    with torch.no_grad():
        o_one, s_one = mixer(h, None, True)
        monkeypatch.setattr(mixers, "STREAM_TOKEN_HEADS", H * 16)
        if name == "liger":  # the segments are MixSum's own, not its parts' (one call each)
            monkeypatch.setattr(mixers, "_stream", lambda run, h, s, want, params=(): run(h, s, want))
        o_seg, s_seg = mixer(h, None, True)
    assert _rel(o_seg, o_one) < 1e-5
    assert len(_tensors(s_seg)) == len(_tensors(s_one)) > 0
    for a, b in zip(_tensors(s_seg), _tensors(s_one)):
        assert a.shape == b.shape and _rel(a, b) < 1e-5


@pytest.mark.parametrize("name", ["hedgehog", "gla", "deltanet"])
def test_streamed_state_gradients_equal_one_call(monkeypatch, name):
    """Under autograd, a streamed recurrent mixer (LinearMix, GatedMix, DeltaMix) started
    from a state that needs a gradient and asked for its final state gives one call's
    output, final state and gradients: inputs, layer input x, parameters and initial state."""
    torch.manual_seed(0)
    mixer = registry.methods.get(name)().mixer(H, D, backend="torch").mixer.double()
    for p in mixer.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    x = [torch.randn(B, T, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    hidden = torch.randn(B, T, H * D, dtype=torch.float64, requires_grad=True)
    h = Heads(*x, x[0], x[1], hidden)
    _, s_shape = mixer(Heads(*(t[:, :1] for t in (*x, x[0], x[1], hidden))), None, True)
    s0 = (0.1 * torch.randn_like(s_shape)).requires_grad_()
    leaves = [*x, hidden, s0] + [p for p in mixer.parameters() if p.requires_grad]
    w_o = torch.randn(B, T, H, D, dtype=torch.float64)
    w_s = torch.randn_like(s_shape)

    def run():
        o, s = mixer(h, s0, True)
        loss = (o * w_o).sum() + (s * w_s).sum()
        return o, s, torch.autograd.grad(loss, leaves, allow_unused=True)

    o_one, s_one, g_one = run()
    monkeypatch.setattr(mixers, "STREAM_TOKEN_HEADS", H * 16)  # 4 segments
    o_seg, s_seg, g_seg = run()
    assert _rel(o_seg, o_one) < 1e-5 and _rel(s_seg, s_one) < 1e-5, name
    for i, (a, b) in enumerate(zip(g_seg, g_one)):
        assert (a is None) == (b is None), (name, i)
        if a is not None:
            assert _rel(a, b) < 1e-4, (name, i)
    assert g_one[4] is not None and g_one[4].abs().max() > 0  # the initial state's gradient bites
