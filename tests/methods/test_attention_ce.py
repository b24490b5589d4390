"""Hedgehog's attention-distillation loss ("ce" transfer): computed in checkpointed query
blocks, it equals the whole-matrix KL(softmax weights || linear weights) in value and in
gradients, and its forward keeps no block's (B, H, block, T) weights for backward. The
same loss on lolcats' hybrid (window softmax + linear, one normalizer): its weights are
the ones its forward averages the values with."""
from __future__ import annotations

import pytest
import torch

from linbench import registry
from linbench.methods.attention import linearized_layers
from tests.conftest import make_tiny_llama

T = 40


def _setup(method="hedgehog", **fields):
    model = registry.methods.get(method)(**fields).linearize(make_tiny_llama(vocab_size=256))
    torch.manual_seed(1)
    layer = linearized_layers(model)[0]
    for p in layer.new_parameters():  # off the identity-like start
        p.data.add_(0.2 * torch.randn_like(p))
    layer.transfer, layer.transfer_block = "ce", 32  # 2 blocks, the last one partial
    x = 4 * torch.randn(2, T, model.config.hidden_size)  # sharp enough attention
    pos = model.model.rotary_emb(x, torch.arange(T)[None])
    return layer, layer.heads_from(x, pos)


def _reference(layer, h):
    """One (B, H, T, T) matrix, no blocks: sum_i KL(p_i || a_i) / (B H T)."""
    q, k = h.q.transpose(1, 2), h.k.transpose(1, 2)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    p = (q @ k.transpose(-1, -2) * layer.scaling).masked_fill(~causal, float("-inf")).softmax(-1)
    a = layer.mixer.weights(h, 0, T)
    kl = (p * (torch.log(p.clamp_min(1e-30)) - torch.log(a.clamp_min(1e-12)))).sum()
    return kl / (q.shape[0] * layer.heads * T)


@pytest.mark.parametrize("method", ["hedgehog", "lolcats"])
def test_blocked_checkpointed_loss_equals_the_whole_matrix(method):
    layer, h = _setup(method, **({"window": 8} if method == "lolcats" else {}))
    params = layer.new_parameters()
    got = layer._attention_ce(h)
    want = _reference(layer, h)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert want > 1e-3  # the perturbed maps are off the teacher: the gradient bites
    g_got = torch.autograd.grad(got, params)
    g_want = torch.autograd.grad(want, params)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_forward_keeps_no_block_of_weights():
    layer, h = _setup()
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer._attention_ce(h)
    block = h.q.shape[0] * layer.heads * layer.transfer_block * T  # one block of weights
    assert saved and max(saved) < block, (max(saved), block)


@pytest.mark.parametrize("affine", [False, True])
def test_hybrid_window_weights_are_what_its_forward_averages_with(affine):
    """lolcats' "ce" transfer distills HybridWindow.weights: weights @ v must be the
    mixer's output (the kernel), every row sums to 1, the window holds gamma-scaled
    softmax terms and older keys the linear ones, and gradients reach gamma and the maps."""
    layer, h = _setup("lolcats", window=8, affine=affine)
    mixer = layer.mixer
    a = mixer.weights(h, 0, T)                                    # (B, H, T, T)
    want = mixer(h, None, False)[0]                               # (B, T, H, D)
    got = torch.einsum("bhij,bjhd->bihd", a, h.v.float())
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)), rtol=1e-5, atol=1e-5)
    assert a[..., 20, 21:].abs().max() == 0                       # causal
    assert (a[..., 20, 15] > 0).all() and (a[..., 20, 5] > 0).all()  # window and linear part
    torch.testing.assert_close(mixer.weights(h, 10, 30), a[:, :, 10:30])
    grads = torch.autograd.grad(layer._attention_ce(h), [mixer.gamma_logit, *mixer.fq.parameters()])
    assert all(g.abs().sum() > 0 for g in grads)
