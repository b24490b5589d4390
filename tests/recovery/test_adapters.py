"""Recovery adapters (linbench.recovery.adapters): LoRA, PiSSA, EVA, CorDA and Bone (peft's
MiSS), each built by peft, trained a couple of steps and merged exactly, on a tiny random
Llama linearized with hedgehog (no window: the linear layers matter)."""
from __future__ import annotations

import pytest
import torch

from linbench.records.schema import method_label
from linbench import overrides, registry
from linbench.errors import LinbenchError
from linbench.methods import io
from linbench.methods.base import ADAPTERS, LinearConfig
from linbench.recovery import adapters, cache
from linbench.recovery import stages as recovery
from linbench.recovery.corpus import Corpus
from tests.conftest import make_tiny_llama
from tests.recovery.test_recovery import ByteTokenizer, write_corpus

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")



def linearized(adapter, **kw):
    method = registry.methods.get("hedgehog")(adapter=adapter, **kw)
    model = method.linearize(make_tiny_llama(vocab_size=256))
    for p in model.parameters():
        p.requires_grad_(False)
    return method, model


def rows(n, T=128, seed=0):
    return torch.randint(0, 256, (n, T), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.clone()


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_each_adapter_starts_as_the_model_trains_and_merges_exactly(adapter):
    method, model = linearized(adapter)
    train, x = rows(6), rows(2, 100, seed=1)
    before = logits(model, x)
    peft_model = adapters.build(method.config, model, adapters.calibration_rows(method.config, train))
    torch.testing.assert_close(logits(peft_model, x), before, atol=1e-5, rtol=0)  # step 0
    params = [p for p in peft_model.parameters() if p.requires_grad]
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert params and all(("lora_" in n or "miss_" in n) and any(f".{t}." in n for t in TARGETS)
                          for n in names), names
    opt = torch.optim.AdamW(params, lr=1e-2)
    for i in range(2):
        peft_model(input_ids=train[i:i + 1], labels=train[i:i + 1]).loss.backward()
        opt.step()
        opt.zero_grad()
    trained = logits(peft_model, x)
    assert (trained - before).abs().max() > 1e-2  # the adapter changed the function
    merged = peft_model.merge_and_unload()
    assert not hasattr(merged, "peft_config") and type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(merged, x), trained, atol=1e-5, rtol=0)


def test_pissa_moves_the_principal_part_out_of_the_base_weight():
    method, model = linearized("pissa")
    W = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(TARGETS)}
    peft_model = adapters.build(method.config, model)
    scale = method.config.lora_alpha / method.config.lora_r
    for name, w in W.items():
        layer = peft_model.base_model.model.get_submodule(name)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        residual = layer.base_layer.weight
        assert not torch.allclose(residual, w, atol=1e-3)  # the base really is the residual
        torch.testing.assert_close(residual + scale * B @ A, w, atol=1e-5, rtol=0)
        s = torch.linalg.svdvals(w)[: method.config.lora_r]  # and B A the top-r part of W
        torch.testing.assert_close(torch.linalg.svdvals(scale * B @ A)[: len(s)], s, atol=1e-4, rtol=1e-4)


@pytest.fixture
def corpus(tmp_path):
    return Corpus(str(write_corpus(tmp_path / "c.jsonl")), tokenizer=ByteTokenizer(), seqlen=128)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_the_lora_stage_runs_each_adapter_calibrating_on_training_rows_only(
        adapter, corpus, tmp_path, monkeypatch):
    method, model = linearized(adapter, calibration_tokens=512, lora_lr=3e-3)
    seen, inside = [], []
    model.model.embed_tokens.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].clone()) if inside else None)

    def spying(fn):
        def wrapper(*a, **k):
            inside.append(True)
            try:
                return fn(*a, **k)
            finally:
                inside.clear()
        return wrapper
    import peft
    import peft.tuners.lora.corda as corda
    monkeypatch.setattr(peft, "initialize_lora_eva_weights", spying(peft.initialize_lora_eva_weights))
    monkeypatch.setattr(corda, "preprocess_corda", spying(corda.preprocess_corda))
    model = recovery.recover(method, model, corpus, "smoke,transfer=0,lora=256")
    (stage,) = recovery.stages_of(model)
    assert stage["stage"] == "lora" and stage["adapter"] == adapter and stage["steps"] == 2
    assert not hasattr(model, "peft_config")
    train = {tuple(r.tolist()) for r in corpus.packed("train", 8)}
    val = {tuple(r.tolist()) for r in corpus.packed("val", 2)}
    read = [tuple(r.tolist()) for batch in seen for r in batch]
    if adapter in adapters.CALIBRATING:  # the first 512 tokens of the training rows
        assert read and set(read) <= train and set(read).isdisjoint(val)
        assert set(read) == {tuple(r.tolist()) for r in corpus.packed("train", 4)}
    else:
        assert read == []
    io.save_pretrained(model, tmp_path / "m")  # the merged model is a plain linearized one
    back = recovery.load(tmp_path / "m")
    ids = corpus.packed("val", 1)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_the_adapter_reaches_the_config_label_and_checkpoint_key():
    chosen = overrides.resolve(["lolcats"], ["lolcats.adapter=pissa"])["lolcats"]
    method = registry.methods.get("lolcats")(**chosen)
    assert method.config_dict()["adapter"] == "pissa"
    assert method_label("lolcats", chosen) == "lolcats[adapter=pissa]"
    keys = {cache.checkpoint_dir("/c", "h", registry.methods.get("lolcats")(adapter=a).config_dict(),
                                 {}, "float32") for a in ADAPTERS}
    assert len(keys) == len(ADAPTERS)


def test_a_bad_adapter_is_one_line(invoke, tmp_path):
    with pytest.raises(LinbenchError, match=r"unknown adapter 'dora' \(choose from: bone, corda"):
        LinearConfig(adapter="dora")
    code, _, err = invoke("run", "--methods", "lolcats", "--suite", "ppl", "--results",
                          str(tmp_path / "r"), "--set", "lolcats.adapter=dora")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "'dora'" in err and "lora, pissa" in err
