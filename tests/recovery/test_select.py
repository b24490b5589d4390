"""Measured hybrid layer selection (keep_softmax_layers="auto:N" / "auto_kl:N"): parsing,
the choice on a model with a deliberately broken layer, the reverted layers being the
parent's softmax attention, and the recovery path that records and reloads the choice."""
from __future__ import annotations

import pytest
import torch

from linbench.records.schema import method_label
from linbench import registry
from linbench.errors import LinbenchError
from linbench.methods import io
from linbench.methods.attention import LinearizedAttention
from linbench.methods.base import LinearConfig, auto_softmax
from linbench.recovery import cache, select
from linbench.recovery import stages as recovery
from linbench.recovery.corpus import Corpus
from tests.conftest import make_tiny_llama
from tests.recovery.test_recovery import ByteTokenizer, write_corpus

LAYERS = 4



def tiny(seed=0, layers=LAYERS):
    return make_tiny_llama(vocab_size=256, seed=seed, num_hidden_layers=layers)


def hedgehog(spec="auto:1", layers=LAYERS):
    """hedgehog: no window, so every linearized layer really changes the model."""
    method = registry.methods.get("hedgehog")(keep_softmax_layers=spec)
    return method, method.linearize(tiny(layers=layers))


def val_rows(n=2, T=96):
    return torch.randint(0, 256, (n, T), generator=torch.Generator().manual_seed(3))


def kinds(model):
    return ["linear" if isinstance(l.self_attn, LinearizedAttention) else "softmax"
            for l in model.model.layers]


@pytest.mark.parametrize("criterion", ["transfer_mse", "kl"])
def test_auto_picks_the_layer_whose_linearization_is_broken(criterion):
    _, model = hedgehog()
    val = val_rows()
    scores = select.MEASURES[criterion](model, val)
    assert sorted(scores) == list(range(LAYERS)) and all(s > 0 for s in scores.values())
    broken = min(scores, key=scores.get)  # the least harmful layer, made the most harmful
    model.model.layers[broken].self_attn.mixer.register_forward_hook(
        lambda mod, args, out: (out[0] * 30, *out[1:]))
    info = select.select(model, criterion, 1, val)
    assert info["kept_softmax"] == [broken] and info["criterion"] == criterion
    assert info["scores"][str(broken)] == max(info["scores"].values())
    assert kinds(model) == ["softmax" if i == broken else "linear" for i in range(LAYERS)]
    assert model.config.linbench["layer_selection"] == info
    assert model.config.linbench["softmax_layers"] == [broken]


def test_auto_zero_keeps_none_but_records_the_scores():
    _, model = hedgehog("auto:0")
    info = select.select(model, "transfer_mse", 0, val_rows())
    assert info["kept_softmax"] == [] and len(info["scores"]) == LAYERS and info["spec"] == "auto:0"
    assert kinds(model) == ["linear"] * LAYERS


def test_reverted_layers_are_the_parents_softmax_attention():
    parent = tiny()
    _, model = hedgehog()
    ids = val_rows(1)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, parent(ids).logits, atol=1e-4)
    select.select(model, "kl", 1, ids)
    (j,) = model.config.linbench["layer_selection"]["kept_softmax"]
    assert type(model.model.layers[j].self_attn) is type(parent.model.layers[j].self_attn)
    h = torch.randn(1, 40, 64, generator=torch.Generator().manual_seed(1))
    pe = parent.model.rotary_emb(h, torch.arange(40)[None])
    with torch.no_grad():
        mine = model.model.layers[j].self_attn(h, pe, None)[0]
        theirs = parent.model.layers[j].self_attn(h, pe, None)[0]
    torch.testing.assert_close(mine, theirs, atol=0, rtol=0)
    select.select(model, "kl", LAYERS - 1, ids)  # every layer reverted: the parent itself
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, parent(ids).logits, atol=1e-6, rtol=0)


@pytest.fixture
def corpus(tmp_path):
    return Corpus(str(write_corpus(tmp_path / "c.jsonl")), tokenizer=ByteTokenizer(), seqlen=128)


@pytest.mark.parametrize("budget, where", [("smoke,transfer=256,lora=256", "transfer"),
                                           ("smoke,transfer=0,lora=256", "lora")])
def test_recovery_selects_after_transfer_records_and_reloads(budget, where, corpus, tmp_path):
    method, model = hedgehog("auto_kl:1")
    model = recovery.recover(method, model, corpus, budget)
    stages = recovery.stages_of(model)
    (info,) = [s["layer_selection"] for s in stages if "layer_selection" in s]
    assert [s["stage"] for s in stages if "layer_selection" in s] == [where]
    (j,) = info["kept_softmax"]
    assert info["spec"] == "auto_kl:1" and info["ppl_after"] > 1
    assert kinds(model) == ["softmax" if i == j else "linear" for i in range(LAYERS)]
    assert model.config.linbench["layer_selection"] == info
    assert select.pending(method, model) is None  # a resumed recovery does not select again
    io.save_pretrained(model, tmp_path / "m")
    back = recovery.load(tmp_path / "m")
    assert kinds(back) == kinds(model) and back.config.linbench["layer_selection"] == info
    ids = corpus.packed("val", 1)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_auto_spec_parses_and_reaches_the_checkpoint_key():
    assert auto_softmax(LinearConfig(keep_softmax_layers="auto:2")) == ("transfer_mse", 2)
    assert auto_softmax(LinearConfig(keep_softmax_layers=(0, "auto_kl:1"))) == ("kl", 1)
    assert auto_softmax(LinearConfig(keep_softmax_layers=(0, 3))) is None
    from linbench import overrides
    chosen = overrides.resolve(["lolcats"], ["lolcats.keep_softmax_layers=auto:1"])["lolcats"]
    assert method_label("lolcats", chosen) == "lolcats[keep_softmax_layers=auto:1]"
    keys = {cache.checkpoint_dir("/c", "h", registry.methods.get("lolcats")(
        keep_softmax_layers=s).config_dict(), {}, "float32") for s in ("auto:1", "auto_kl:1", "auto:2", ())}
    assert len(keys) == 4
    _, model = hedgehog("auto:1")  # linearize keeps no layer for an auto entry
    assert kinds(model) == ["linear"] * LAYERS


@pytest.mark.parametrize("spec", ["auto:x", "auto:-1", "auto:", "auto_kl:1.5", "best:1",
                                  ("auto:1", "auto_kl:1")])
def test_a_bad_auto_spec_is_one_line(spec):
    with pytest.raises(LinbenchError) as e:
        LinearConfig(keep_softmax_layers=spec)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    assert "auto:N" in str(e.value) and "bad entry" in str(e.value)


@pytest.mark.parametrize("spec", ["auto:3", (0, "auto:2")])
def test_more_auto_layers_than_linearized_ones_is_one_line(spec):
    method = registry.methods.get("hedgehog")(keep_softmax_layers=spec)
    with pytest.raises(LinbenchError, match="only . linearized layers") as e:
        method.linearize(tiny(layers=2))
    assert "\n" not in str(e.value)


def test_cli_rejects_a_bad_auto_spec(invoke, tmp_path):
    code, _, err = invoke("run", "--methods", "lolcats", "--suite", "ppl", "--results",
                          str(tmp_path / "r"), "--set", "lolcats.keep_softmax_layers=auto:x")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "'auto:x'" in err
