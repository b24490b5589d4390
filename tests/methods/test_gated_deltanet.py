"""gated_deltanet: the decay starts near 1, the mixer equals the paper's recurrence written
out token by token (outputs and every gradient, through the chunked torch form and the
Triton kernel), with the decay at 1 it is DeltaNet's mixer, the output gate is optional,
and the calibrated init reaches it. The shared contract (parallel == token-by-token
decoding, generate, save/load, state bytes, transfer, the speed-sweep mixer) runs in
test_contract.py, which picks the method up from the registry."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from linbench import registry
from linbench.methods.attention import Heads, OutputGate, linearized_layers
from linbench.methods.features import SiLUL2
from linbench.methods.mixers import DeltaMix, GatedDeltaMix
from tests.conftest import make_tiny_llama

VOCAB = 256
H, D, HIDDEN = 4, 16, 64


def linearized(**overrides):
    """The paper's form (q, k through SiLU + L2 norm; linbench's default map is learnable)."""
    torch.manual_seed(0)
    overrides = {"feature_map": "silu_l2", **overrides}
    return registry.methods.get("gated_deltanet")(**overrides).linearize(
        make_tiny_llama(vocab_size=VOCAB, seed=0))


def perturb(module, scale=0.1, seed=1):
    """Move every parameter off its initialization (W_a = 0 makes the decay constant)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def heads(T, dtype, seed=0):
    """Leaf mixer inputs (B=2, T, H, D) and layer input x (2, T, HIDDEN)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, T, H, D, generator=g, dtype=dtype) for _ in range(3))
    x = torch.randn(2, T, HIDDEN, generator=g, dtype=dtype)
    leaves = [t.requires_grad_() for t in (q, k, v, x)]
    return leaves, Heads(q, k, v, q, k, x)


def paper_form(mixer, h: Heads, scale):
    """arXiv 2412.06464 eq. (10) with Mamba2's decay, token by token, S of shape (V, K):
    S_t = a_t S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T,  o_t = S_t (scale q_t),
    a_t = exp(-exp(A_log) softplus(W_a x_t + dt_bias)),  b_t = sigmoid(W_b x_t + c),
    q, k through SiLU then L2 norm."""
    q, k = F.normalize(F.silu(h.q), dim=-1), F.normalize(F.silu(h.k), dim=-1)
    a = torch.exp(-torch.exp(mixer.A_log) * F.softplus(h.x @ mixer.decay.weight.T + mixer.dt_bias))
    b = torch.sigmoid(h.x @ mixer.beta.weight.T + mixer.beta.bias)  # (B, T, H)
    B, T = q.shape[:2]
    S = q.new_zeros(B, H, D, D)
    eye = torch.eye(D, dtype=q.dtype)
    out = []
    for t in range(T):
        kt, vt = k[:, t], h.v[:, t]  # (B, H, D)
        at, bt = a[:, t, :, None, None], b[:, t, :, None, None]
        S = at * S @ (eye - bt * kt[..., :, None] * kt[..., None, :]) \
            + bt * vt[..., :, None] * kt[..., None, :]
        out.append(torch.einsum("bhvk,bhk->bhv", S, scale * q[:, t]))
    return torch.stack(out, 1)


def test_decay_starts_near_one_and_constant_per_head():
    model = linearized()
    for layer in linearized_layers(model):
        mixer = layer.mixer
        assert isinstance(mixer, GatedDeltaMix)
        x = torch.randn(2, 50, model.config.hidden_size)
        with torch.no_grad():
            a = torch.exp(mixer.log_decay(x))  # (B, T, H)
        dt = 1e-3 * 100 ** torch.linspace(0, 1, H)  # dt_min .. dt_max, log-spaced
        torch.testing.assert_close(a, torch.exp(-dt).expand_as(a), rtol=1e-6, atol=1e-6)
        assert a.min() >= math.exp(-0.1) - 1e-6 and a.max() <= math.exp(-1e-3) + 1e-6
    # the knobs move it: a = exp(-a_init * dt)
    mixer = linearized(a_init=2.0, dt_min=0.01, dt_max=0.01).model.layers[0].self_attn.mixer
    with torch.no_grad():
        a = torch.exp(mixer.log_decay(torch.randn(1, 5, 64)))
    torch.testing.assert_close(a, torch.full_like(a, math.exp(-0.02)))


@pytest.mark.parametrize("backend, dtype, tol, stream", [
    ("torch", torch.float64, 1e-9, False), ("torch", torch.float64, 1e-6, True),
    ("triton", torch.float32, 2e-4, False)], ids=["torch", "torch-streamed", "triton"])
def test_mixer_equals_the_paper_recurrence_with_gradients(backend, dtype, tol, stream,
                                                          monkeypatch):
    if stream:  # segments of 10 tokens (B 2 x H 4 token-heads each), the state carried
        # between them in fp32 (the kernels' state contract), hence the fp32 tolerance
        from linbench.methods import mixers
        monkeypatch.setattr(mixers, "STREAM_TOKEN_HEADS", 2 * H * 10)
    mixer = perturb(GatedDeltaMix(SiLUL2(), SiLUL2(), HIDDEN, H, backend=backend)).to(dtype)
    with torch.no_grad():
        mixer.A_log.fill_(math.log(10.0))  # decays well below 1, varying over tokens
    leaves, h = heads(45, dtype)  # T = 45: not a multiple of any chunk
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_mixer = GatedDeltaMix(SiLUL2(), SiLUL2(), HIDDEN, H).double()
    ref_mixer.load_state_dict(mixer.state_dict())
    a = torch.exp(ref_mixer.log_decay(ref_leaves[3]))
    assert a.min() < 0.5 and a.std(1).min() > 1e-3, "the decay must vary for this test to bite"
    o = mixer(h, None, False)[0]
    o_ref = paper_form(ref_mixer, Heads(*ref_leaves[:3], *ref_leaves[:2], ref_leaves[3]), D ** -0.5)
    w = torch.randn(o_ref.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = torch.autograd.grad((o.double() * w).sum(), leaves + list(mixer.parameters()))
    want = torch.autograd.grad((o_ref * w).sum(), ref_leaves + list(ref_mixer.parameters()))
    names = ["o", "dq", "dk", "dv", "dx"] + ["d" + n for n, _ in mixer.named_parameters()]
    for name, x, y in zip(names, [o, *got], [o_ref, *want]):
        err = (x.double() - y).abs().max() / y.abs().max().clamp_min(1e-3)
        assert err <= tol, f"{backend}: {name} rel err {err:.2e} > {tol}"


def test_decay_one_is_deltanet():
    gated = perturb(GatedDeltaMix(SiLUL2(), SiLUL2(), HIDDEN, H)).double()
    with torch.no_grad():
        gated.A_log.fill_(-60.0)  # exp(A_log) ~ 1e-26: a_t = 1 to fp64 precision
    plain = DeltaMix(SiLUL2(), SiLUL2(), HIDDEN, H).double()
    plain.beta.load_state_dict(gated.beta.state_dict())
    _, h = heads(40, torch.float64)
    with torch.no_grad():
        # DeltaMix computes beta in fp32, hence the tolerance
        torch.testing.assert_close(gated(h, None, False)[0], plain(h, None, False)[0],
                                   rtol=1e-5, atol=1e-6)


def test_output_gate_is_an_option_and_one_at_start():
    attn = linearized().model.layers[0].self_attn
    assert isinstance(attn.gate, OutputGate)
    x = torch.randn(1, 7, 64)
    o = torch.randn(1, 7, 4, 16)
    torch.testing.assert_close(attn.gate(o, x), o)
    assert linearized(gate=False).model.layers[0].self_attn.gate is None


def test_calibrated_init_matches_the_teachers_head_rms():
    from linbench.recovery.calibrate import calibrate
    from tests.recovery.test_calibrate import head_rms
    model = linearized()
    ids = torch.randint(0, VOCAB, (2, 96), generator=torch.Generator().manual_seed(1))
    s0, t0 = head_rms(model, ids)
    assert not torch.allclose(s0, t0, rtol=0.05)
    assert calibrate(model, ids, tokens=10_000)["layers"] == 2
    s1, t1 = head_rms(model, ids)
    torch.testing.assert_close(s1, t1, rtol=1e-3, atol=1e-5)
