"""The contract every registered method keeps, on a tiny random Llama (GQA: 4 heads, 2 kv).

The method list comes from the registry, so a method added there (built in or through the
`linbench.methods` entry point) runs every test here without editing this file. The
per-method "form" tests check the linearized layer at its initialization against the
formulas of methods/README.md, written out quadratically here (independent of
linbench.kernels), for every method that has such a form below.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from linbench import registry
from linbench.methods import io
from linbench.methods.attention import Heads, LinearizedAttention, RecurrentCacheLayer, linearized_layers
from linbench.methods.linearize import new_parameters
from tests.conftest import make_tiny_llama

BUILTIN = ["softmax", "swa", "hedgehog", "lolcats", "liger", "gla", "deltanet", "lightning"]
ALL = registry.methods.names()
LINEAR = [m for m in ALL if registry.methods.get(m).role != "parent"]
VOCAB = 256


def tiny(seed=0, **kw):
    return make_tiny_llama(vocab_size=VOCAB, seed=seed, **kw)


def linearized(name, seed=0, **overrides):
    torch.manual_seed(seed)
    method = registry.methods.get(name)(**overrides)
    return method, method.linearize(tiny(seed))


def perturb(model, scale=0.05, seed=1):
    """Move every parameter off its initialization so tests do not pass by symmetry."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def ids(T, seed=0, B=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def test_every_builtin_is_registered():
    assert set(BUILTIN) <= set(registry.methods.names())


@pytest.mark.parametrize("name", ALL)
def test_linearize_keeps_interface(name):
    base = tiny()
    method, model = linearized(name)
    x = ids(37, B=2)
    with torch.no_grad():
        out = model(x)
    assert type(model) is type(base)
    assert out.logits.shape == base(x).logits.shape == (2, 37, VOCAB)
    assert torch.isfinite(out.logits).all()
    n_lin = len(linearized_layers(model))
    assert n_lin == (0 if method.role == "parent" else 2)
    if method.role != "parent":
        assert model.config.linbench["method"] == name
        assert model.config.linbench["window"] == method.window()


@pytest.mark.parametrize("name", LINEAR)
def test_pretrained_projections_are_reused(name):
    base = tiny()
    q_before = base.model.layers[0].self_attn.q_proj
    model = registry.methods.get(name)().linearize(base)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn, LinearizedAttention) and attn.q_proj is q_before
    pretrained = {id(p) for n, p in model.named_parameters()
                  if not any(s in n for s in (".mixer.", ".norm.", ".gate."))}
    assert not {id(p) for p in new_parameters(model)} & pretrained


def _layer_heads(model, T=90, seed=0):
    """The first linearized layer and its mixer inputs on random hidden states."""
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, T, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    pos = model.model.rotary_emb(x, torch.arange(T)[None])
    return attn, attn.heads_from(x, pos)


def _causal(T, window=None):
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    m = j <= i
    return m & (j > i - window) if window else m


def _softmax_weights(q, k, mask, scale):
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    return s.masked_fill(~mask, float("-inf")).softmax(-1)


def _apply(a, v):
    return torch.einsum("bhij,bjhd->bihd", a, v)


def _linear_normalized(fq, fk, v):
    a = torch.einsum("bihf,bjhf->bhij", fq, fk) * _causal(fq.shape[1])
    return _apply(a / a.sum(-1, keepdim=True), v)


def _hedgehog_phi(x, w):
    z = torch.einsum("bthd,hdf->bthf", x, w)
    return torch.cat([z.softmax(-1), (-z).softmax(-1)], -1)


def form_hedgehog(h: Heads, mixer, D):
    return _linear_normalized(_hedgehog_phi(h.q, mixer.fq.weight), _hedgehog_phi(h.k, mixer.fk.weight), h.v)


def form_lolcats(h: Heads, mixer, D):
    T = h.q.shape[1]
    fq, fk = _hedgehog_phi(h.q, mixer.fq.weight), _hedgehog_phi(h.k, mixer.fk.weight)
    s = torch.einsum("bihd,bjhd->bhij", h.q, h.k) / math.sqrt(D)
    win = _causal(T, 64)
    s = s.masked_fill(~win, float("-inf"))
    gamma = torch.sigmoid(mixer.gamma_logit)[None, :, None, None]
    # the reference code's affine_attention_factors weight the linear part by 1 - gamma
    linear = 1 - gamma if mixer.affine else 1.0
    a = gamma * torch.exp(s - s.amax(-1, keepdim=True))
    a = a + linear * torch.einsum("bihf,bjhf->bhij", fq, fk) * (_causal(T) & ~win)
    return _apply(a, h.v) / a.sum(-1)[..., None].transpose(1, 2)


def form_swa(h: Heads, mixer, D):
    return _apply(_softmax_weights(h.q, h.k, _causal(h.q.shape[1], 64), D ** -0.5), h.v)


def _gla(q, k, v, g, scale):  # token recurrence S_t = diag(exp g_t) S + k v^T, o = S^T q
    B, T, H, K = q.shape
    S, out = torch.zeros(B, H, K, v.shape[-1]), []
    for t in range(T):
        S = torch.exp(g[:, t])[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    return torch.stack(out, 1)


def form_liger(h: Heads, mixer, D):
    q, k = h.q0.softmax(-1), h.k0.softmax(-1)
    gla = _gla(q, k, h.v, F.logsigmoid(h.k0) / 16, D ** -0.5)
    return 0.5 * gla + 0.5 * form_swa(h, None, D)


def form_gla(h: Heads, mixer, D):
    gate = mixer.gate
    g = F.logsigmoid(gate.up(gate.down(h.x))).view_as(h.q) / 16
    return _gla(h.q, h.k, h.v, g, D ** -0.5)


def form_deltanet(h: Heads, mixer, D):
    q, k = F.normalize(F.silu(h.q), dim=-1), F.normalize(F.silu(h.k), dim=-1)
    beta = torch.sigmoid(mixer.beta(h.x))
    B, T, H, K = q.shape
    S, out = torch.zeros(B, H, K, K), []  # o_t = S_t q_t with S (V x K)
    for t in range(T):
        kt, vt, bt = k[:, t], h.v[:, t], beta[:, t, :, None, None]
        S = S - bt * torch.einsum("bhv,bhk->bhvk", torch.einsum("bhvk,bhk->bhv", S, kt), kt) \
            + bt * torch.einsum("bhv,bhk->bhvk", vt, kt)
        out.append(torch.einsum("bhvk,bhk->bhv", S, q[:, t] * D ** -0.5))
    return torch.stack(out, 1)


def form_lightning(h: Heads, mixer, D):
    q, k = F.silu(h.q), F.silu(h.k)
    H, T = q.shape[2], q.shape[1]
    s = 2.0 ** (-8.0 * (torch.arange(H) + 1) / H)  # ALiBi slopes, lambda = exp(-s)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    decay = torch.exp(-s[:, None, None] * (i - j).clamp(min=0)) * (j <= i)
    a = torch.einsum("bihd,bjhd->bhij", q, k) * D ** -0.5 * decay
    return _apply(a, h.v)


FORMS = {"hedgehog": form_hedgehog, "lolcats": form_lolcats, "swa": form_swa, "liger": form_liger,
         "gla": form_gla, "deltanet": form_deltanet, "lightning": form_lightning}


def test_every_builtin_linearized_method_has_a_paper_form():
    assert set(BUILTIN) - {"softmax"} <= set(FORMS)


def test_roles_are_declared():
    roles = {m: registry.methods.get(m).role for m in ALL}
    assert roles["softmax"] == "parent" and roles["swa"] == "baseline"
    assert all(r in ("parent", "baseline", "linearized") for r in roles.values()), roles
    assert list(roles.values()).count("parent") == 1


# linbench's defaults that differ from the paper (methods/README.md, "Feature maps"): the
# paper forms above are tested with the paper's setting
PAPER = {"gla": {"feature_map": "identity"}, "deltanet": {"feature_map": "silu_l2"},
         "gated_deltanet": {"feature_map": "silu_l2"}, "lightning": {"feature_map": "silu"}, "lolcats": {"affine": False}}


@pytest.mark.parametrize("name", [m for m in LINEAR if m in FORMS])
def test_layer_matches_paper_form(name):
    _, model = linearized(name, **PAPER.get(name, {}))
    perturb(model)
    attn, h = _layer_heads(model, T=90)
    D = attn.head_dim
    with torch.no_grad():
        got = attn.mixer(h, None, False)[0]
        want = FORMS[name](h, attn.mixer, D)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_lolcats_affine_factors_are_the_reference_codes():
    """`affine=True`: window weight gamma, linear weight 1 - gamma (the kernels get their
    ratio); the paper form (the default) has linear weight 1."""
    assert not registry.methods.get("lolcats")().config.affine
    method, model = linearized("lolcats", affine=True)
    assert method.config.affine
    perturb(model)
    attn, h = _layer_heads(model, T=90)
    with torch.no_grad():
        got = attn.mixer(h, None, False)[0]
        want = form_lolcats(h, attn.mixer, attn.head_dim)
        attn.mixer.affine = False
        paper = attn.mixer(h, None, False)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, paper, atol=1e-4)


def test_lolcats_gamma_one_without_linear_part_is_sliding_window_softmax():
    _, model = linearized("lolcats")
    attn, h = _layer_heads(model, T=64)  # T <= window: the linear part is empty
    with torch.no_grad():
        attn.mixer.gamma_logit.fill_(40.0)  # gamma -> 1
        got = attn.mixer(h, None, False)[0]
    torch.testing.assert_close(got, form_swa(h, None, attn.head_dim), rtol=1e-5, atol=1e-6)


def test_lolcats_without_window_is_linear_attention_on_its_hedgehog_features():
    method, model = linearized("lolcats", window=0)
    assert method.window() == 0 and model.config.linbench["window"] == 0
    perturb(model)
    attn, h = _layer_heads(model, T=90)
    assert not hasattr(attn.mixer, "gamma_logit")
    with torch.no_grad():
        got = attn.mixer(h, None, False)[0]
    torch.testing.assert_close(got, form_hedgehog(h, attn.mixer, attn.head_dim), rtol=1e-4, atol=1e-5)


def test_swa_is_exact_softmax_within_its_window():
    base = perturb(tiny())
    _, model = linearized("swa")
    model.load_state_dict(base.state_dict())
    x = ids(64)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, base(x).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(model(ids(100)).logits[:, -1], base(ids(100)).logits[:, -1], atol=1e-4)


@pytest.mark.parametrize("name", ["gla", "deltanet", "gated_deltanet", "lightning"])
def test_default_feature_map_is_a_learnable_hedgehog_map(name):
    from linbench.methods.features import HedgehogFeatureMap
    attn = linearized(name)[1].model.layers[0].self_attn
    maps = [attn.mixer.fq, attn.mixer.fk] if hasattr(attn.mixer, "fq") else list(attn.mixer.children())
    hedgehog = [m for m in maps if isinstance(m, HedgehogFeatureMap)]
    assert hedgehog and all(p in set(attn.new_parameters()) for m in hedgehog for p in m.parameters())


def test_initializations_follow_the_papers():
    _, model = linearized("lolcats")
    mixer = model.model.layers[0].self_attn.mixer
    assert torch.allclose(torch.sigmoid(mixer.gamma_logit), torch.full((4,), 0.1), atol=1e-3)
    w = mixer.fq.weight  # (H, D, D/2) identity-like
    assert w.shape == (4, 16, 8) and torch.equal(w[0], torch.eye(16, 8))
    for name in ("gla", "deltanet", "lightning"):
        attn = linearized(name)[1].model.layers[0].self_attn
        assert torch.equal(attn.norm.weight, torch.ones(4, 16))
    assert not list(linearized("liger")[1].model.layers[0].self_attn.new_parameters())


@pytest.mark.parametrize("name", LINEAR)
def test_parallel_forward_equals_token_by_token(name):
    _, model = linearized(name)
    perturb(model)
    x = ids(100)
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :70], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for t in range(70, 100):
            steps.append(model(x[:, t:t + 1], cache=cache, use_cache=True).logits)
    assert isinstance(cache.layers[0], RecurrentCacheLayer) and cache.get_seq_length() == 100
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", LINEAR)
def test_generate_uses_the_recurrent_state(name):
    _, model = linearized(name)
    perturb(model)
    x = ids(80)
    with torch.no_grad():
        gen = model.generate(x, max_new_tokens=6, do_sample=False)
        seq = x
        for _ in range(6):  # greedy without any cache: the parallel form
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(gen, seq)


@pytest.mark.parametrize("name", LINEAR)
def test_save_load_round_trip_is_exact(name, tmp_path):
    _, model = linearized(name)
    perturb(model)
    io.save_pretrained(model, tmp_path)
    again = io.from_pretrained(tmp_path)
    x = ids(70)
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)
    assert again.config.linbench == model.config.linbench


@pytest.mark.parametrize("name", LINEAR)
def test_state_bytes_constant_and_equal_to_the_cache(name):
    method, model = linearized(name)
    sizes = [method.state_bytes(model, T) for T in (64, 256, 4096, 1 << 20)]
    assert len(set(sizes)) == 1, sizes
    with torch.no_grad():
        cache = model(ids(100), use_cache=True).past_key_values
    held = 0
    for layer in cache.layers:
        stack = [layer.state]
        while stack:
            s = stack.pop()
            if torch.is_tensor(s):
                held += s.numel() * s.element_size()
            elif isinstance(s, tuple):
                stack.extend(s)
    assert held == method.state_bytes(model, 100)


def test_softmax_state_grows_with_length():
    method, model = linearized("softmax")
    assert method.state_bytes(model, 2048) == 2 * method.state_bytes(model, 1024)


@pytest.mark.parametrize("name", [m for m in LINEAR if registry.methods.get(m)().config.transfer])
def test_transfer_steps_lower_the_transfer_loss(name):
    method, model = linearized(name)
    perturb(model, 0.02)
    layers = linearized_layers(model)
    for layer in layers:
        layer.transfer = method.config.transfer
    params = new_parameters(model)
    assert params
    opt = torch.optim.AdamW(params, lr=method.config.transfer_lr)
    x = ids(96, B=2)
    losses = []
    for _ in range(12):
        model(x)
        loss = sum(layer.transfer_loss for layer in layers) / len(layers)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_transfer_mode_passes_the_teacher_downstream():
    base = perturb(tiny())
    _, model = linearized("deltanet")
    model.load_state_dict(base.state_dict(), strict=False)
    for layer in linearized_layers(model):
        layer.transfer = "mse"
    x = ids(50)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, base(x).logits, rtol=1e-4, atol=1e-4)


def test_liger_h_keeps_softmax_layers_and_decodes():
    method, model = linearized("liger", softmax_every=2)
    assert model.config.linbench["softmax_layers"] == [1]
    assert not isinstance(model.model.layers[1].self_attn, LinearizedAttention)
    perturb(model)
    x = ids(80)
    with torch.no_grad():
        gen = model.generate(x, max_new_tokens=4, do_sample=False)
        seq = x
        for _ in range(4):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(gen, seq)
    kv = 2 * 2 * 16 * 4  # one softmax layer: k and v, 2 kv heads, head_dim 16, fp32
    assert method.state_bytes(model, 2000) - method.state_bytes(model, 1000) == 1000 * kv


def test_unsupported_architecture_is_one_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel
    from linbench.errors import LinbenchError
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32))
    with pytest.raises(LinbenchError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        registry.methods.get("lolcats")().linearize(model)


@pytest.mark.parametrize("name", LINEAR)
def test_mixer_module_for_speed_sweeps(name):
    mixer = registry.methods.get(name)().mixer(heads=4, head_dim=16, backend="torch")
    q, k, v = (torch.randn(1, 80, 4, 16) for _ in range(3))
    o = mixer(q, k, v)
    assert o.shape == (1, 80, 4, 16) and torch.isfinite(o).all()


@pytest.mark.parametrize("name", LINEAR)
def test_mixer_module_state_bytes_match_one_layer_of_the_model(name):
    method, model = linearized(name)
    for T in (32, 5000):
        per_layer = method.mixer(heads=4, head_dim=16).state_bytes(1, T)
        assert 2 * per_layer == method.state_bytes(model, T)  # tiny model: 2 layers, fp32


def test_softmax_mixer_state_bytes_is_one_layer_of_kv():
    method, model = linearized("softmax")
    per_layer = method.mixer(heads=4, head_dim=16).state_bytes(1, 1000)
    # the model's cache holds 2 kv heads (GQA), the mixer's bare q, k, v hold 4
    assert 2 * per_layer == 2 * method.state_bytes(model, 1000)


def test_hedgehog_distillation_weights_are_the_normalized_linear_attention():
    _, model = linearized("hedgehog")
    perturb(model)
    attn, h = _layer_heads(model, T=40)
    fq, fk = _hedgehog_phi(h.q, attn.mixer.fq.weight), _hedgehog_phi(h.k, attn.mixer.fk.weight)
    a = torch.einsum("bihf,bjhf->bhij", fq, fk) * _causal(40)
    with torch.no_grad():
        torch.testing.assert_close(attn.mixer.weights(h, 10, 30), (a / a.sum(-1, keepdim=True))[:, :, 10:30])


@pytest.mark.parametrize("weight, kinds", [(1.0, ["GatedMix"]), (0.0, ["WindowSoftmax"]),
                                           (0.5, ["GatedMix", "WindowSoftmax"])])
def test_liger_builds_no_branch_of_weight_zero(weight, kinds):
    """liger[linear_weight=1.0] (no SWA) has no window branch: no window time, no window
    state, the same output as both branches with the window's weight 0."""
    from linbench.methods.mixers import MixSum
    mix = registry.methods.get("liger")(linear_weight=weight).mixer(2, 8, backend="torch").mixer
    assert [type(m).__name__ for m in mix.parts] == kinds
    assert (mix.window > 0) == ("WindowSoftmax" in kinds)
    if weight == 1.0:
        both = MixSum([(1.0, mix.parts[0]), (0.0, registry.methods.get("liger")().mixer(
            2, 8, backend="torch").mixer.parts[1])])
        torch.manual_seed(0)
        x = [torch.randn(1, 20, 2, 8) for _ in range(3)]
        h = Heads(*x, x[0], x[1], x[0].reshape(1, 20, 16))
        torch.testing.assert_close(mix(h, None, False)[0], both(h, None, False)[0])
        assert mix.state_bytes(2, 8, 1024, 4) < both.state_bytes(2, 8, 1024, 4)
