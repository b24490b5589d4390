"""The calibrated init: after it, every linearized head channel's output RMS equals the
softmax teacher's on the calibration tokens (measured independently, through hooks on the
norm's output and o_proj's input), and init="paper" leaves the identity norm alone."""
from __future__ import annotations

import pytest
import torch

from linbench import registry
from linbench.methods.attention import linearized_layers
from linbench.recovery.calibrate import calibrate
from tests.conftest import make_tiny_llama

VOCAB = 256


def linearized(name, **overrides):
    torch.manual_seed(0)
    model = make_tiny_llama(vocab_size=VOCAB, seed=0)
    return registry.methods.get(name)(**overrides).linearize(model)


def head_rms(model, ids):
    """(student, teacher) per-(layer, head, channel) RMS, the student after its norm."""
    layers = linearized_layers(model)
    got: dict = {"s": [], "t": []}
    hooks = []
    for layer in layers:
        H, D = layer.heads, layer.head_dim
        hooks.append(layer.norm.register_forward_hook(
            lambda m, i, o: got["s"].append(o.float().pow(2).mean((0, 1)).sqrt())))
        hooks.append(layer.o_proj.register_forward_pre_hook(
            lambda m, i, H=H, D=D: got["t"].append(
                i[0].float().view(*i[0].shape[:2], H, D).pow(2).mean((0, 1)).sqrt())))
        layer.transfer = "mse"
    try:
        with torch.no_grad():
            model.get_decoder()(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        for layer in layers:
            layer.transfer = None
    return torch.stack(got["s"]), torch.stack(got["t"])


@pytest.mark.parametrize("name", ["gla", "deltanet", "lightning"])
def test_calibration_matches_the_teachers_head_rms(name):
    model = linearized(name)
    ids = torch.randint(0, VOCAB, (2, 96), generator=torch.Generator().manual_seed(1))
    s0, t0 = head_rms(model, ids)
    assert not torch.allclose(s0, t0, rtol=0.05)  # the identity norm is off
    info = calibrate(model, ids, tokens=10_000, micro=1)
    assert info == {"init": "calibrated", "layers": len(linearized_layers(model)),
                    "tokens": ids.numel()}
    s1, t1 = head_rms(model, ids)
    torch.testing.assert_close(t1, t0)             # the teacher is untouched
    torch.testing.assert_close(s1, t1, rtol=1e-3, atol=1e-5)


def test_methods_with_nothing_to_calibrate_are_unchanged():
    assert not registry.methods.get("hedgehog")().calibrates()
    model = linearized("hedgehog")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, VOCAB, (1, 64), generator=torch.Generator().manual_seed(2))
    assert calibrate(model, ids, tokens=64)["layers"] == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_init_is_a_config_field_in_the_hashed_method_config():
    cal, paper = registry.methods.get("gla")(), registry.methods.get("gla")(init="paper")
    assert cal.config_dict()["init"] == "calibrated" and paper.config_dict()["init"] == "paper"


@pytest.mark.parametrize("init", ["calibrated", "paper"])
def test_recovery_calibrates_only_when_asked(init, tmp_path):
    from linbench.recovery import stages
    from linbench.recovery.corpus import Corpus
    from tests.recovery.test_recovery import ByteTokenizer, write_corpus
    corpus = Corpus(str(write_corpus(tmp_path / "c.jsonl")), tokenizer=ByteTokenizer(), seqlen=128)
    method = registry.methods.get("gla")(init=init, calibration_tokens=256)
    model = method.linearize(make_tiny_llama(vocab_size=VOCAB, seed=0))
    model = stages.recover(method, model, corpus, "smoke,transfer=128,lora=0,eval=128")
    weights = torch.stack([layer.norm.weight for layer in linearized_layers(model)])
    if init == "paper":
        assert "calibration" not in model.config.linbench
        assert (weights - 1).abs().max() < 0.05   # one AdamW step at lr 1e-2 from ones
    else:
        assert model.config.linbench["calibration"]["tokens"] == 256
        assert (weights - 1).abs().max() > 0.2    # moved to the teacher's scale


def test_an_unknown_init_is_one_clear_error():
    from linbench.errors import LinbenchError
    with pytest.raises(LinbenchError, match=r"unknown init 'calbrated' \(choose from: calibrated, paper\)"):
        registry.methods.get("gla")(init="calbrated")


def _window_weight_by_query(mixer, h):
    """The slow twin of HybridWindow.accumulate: for each query with older keys, the window
    weight g with g E / (g E + L) = M (full T x T matrices), (B, H, n)."""
    T, W = h.q.shape[1], mixer.window
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    causal, win = j <= i, (j <= i) & (j > i - W)
    s = torch.einsum("bihd,bjhd->bhij", h.q, h.k) * h.q.shape[-1] ** -0.5
    p = s.masked_fill(~causal, float("-inf")).softmax(-1)
    mass = (p * win).sum(-1)
    e = torch.exp(s - s.masked_fill(~win, float("-inf")).amax(-1, keepdim=True)) * win
    lin = torch.einsum("bihf,bjhf->bhij", mixer.fq(h.q), mixer.fk(h.k)) * (causal & ~win)
    g = mass / (1 - mass) * lin.sum(-1) / e.sum(-1)
    return g[:, :, W:]


def test_lolcats_window_weight_is_calibrated_to_the_teachers_window_mass():
    """calibrate() sets the affine form's window weight to the geometric mean over queries
    of the weight that gives the hybrid the teacher's attention mass inside the window
    (computed here with full matrices)."""
    from tests.methods.test_contract import _layer_heads, perturb
    model = perturb(linearized("lolcats", window=8, affine=True))
    attn, h = _layer_heads(model, T=40)
    mixer = attn.mixer
    with torch.no_grad():
        want = _window_weight_by_query(mixer, h).log().mean((0, 2)).exp()
        mixer.accumulate(h, block=16)  # several query blocks
        assert mixer.calibrate()
        got = mixer.gamma()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert not mixer.calibrate()  # the sums are spent


def test_calibration_sets_lolcats_window_weight_in_the_affine_form_only():
    assert not registry.methods.get("lolcats")().calibrates()  # the paper form: nothing to set
    assert registry.methods.get("lolcats")(affine=True).calibrates()
    model = linearized("lolcats", affine=True)
    before = torch.stack([layer.mixer.gamma_logit.clone() for layer in linearized_layers(model)])
    ids = torch.randint(0, VOCAB, (1, 160), generator=torch.Generator().manual_seed(2))
    assert calibrate(model, ids, tokens=160)["layers"] == len(linearized_layers(model))
    after = torch.stack([layer.mixer.gamma_logit for layer in linearized_layers(model)])
    assert not torch.allclose(before, after, atol=1e-2) and torch.isfinite(after).all()
