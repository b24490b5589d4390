"""Recovery: corpus packing, budgets, attention transfer, LoRA, clipping, resume, early
stopping, and the runner's checkpoint cache -- on a tiny random Llama (seconds)."""
from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch

from linbench.recovery import budget as budgets
from linbench import registry
from linbench.recovery import stages as recovery
from linbench.recovery import train
from linbench.recovery.corpus import Corpus
from linbench.errors import LinbenchError
from linbench.methods import io
from linbench.methods.attention import linearized_layers
from linbench.methods.linearize import new_parameters
from tests.conftest import make_tiny_llama

EOS = 1
WORDS = "the cat sat on a mat while dogs ran far away from home and then came back".split()


class ByteTokenizer:
    """Bytes as tokens (vocab 256), EOS = 1; no chat template."""
    eos_token_id = EOS
    chat_template = None

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        return {"input_ids": [list(t.encode()) for t in texts]}



def write_corpus(path, n=60, seed=0):
    """Half plain documents, half ShareGPT conversations; each starts with its <index>."""
    r = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(r.choice(WORDS) for _ in range(r.randint(20, 90)))
            if i % 2:
                rec = {"text": f"<{i}> {words}"}
            else:
                rec = {"conversations": [{"from": "human", "value": f"<{i}> hi"},
                                         {"from": "gpt", "value": words}]}
            f.write(json.dumps(rec) + "\n")
    return path


@pytest.fixture
def corpus(tmp_path):
    return Corpus(str(write_corpus(tmp_path / "c.jsonl")), tokenizer=ByteTokenizer(), seqlen=128)


def doc_ids(packed: torch.Tensor) -> list[int]:
    text = bytes(packed.flatten().tolist()).decode(errors="replace")
    return [int(m) for m in re.findall(r"<(\d+)>", text)]


def linearized(name, seed=0, **overrides):
    method = registry.methods.get(name)(**overrides)
    return method, method.linearize(make_tiny_llama(vocab_size=256, seed=seed))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- corpus -------------------------------------------------------------------------------
def test_packing_lengths_eos_splits_and_determinism(corpus, tmp_path):
    train_docs, val_docs = corpus.splits()
    assert set(train_docs).isdisjoint(val_docs) and len(train_docs) + len(val_docs) == 60
    tr, va = corpus.packed("train", 6), corpus.packed("val", 1)
    assert tr.shape == (6, 128) and va.shape == (1, 128) and tr.dtype == torch.long
    # the stream is exactly: doc tokens, EOS, doc tokens, EOS, ... in the train order
    tok, docs = ByteTokenizer(), corpus.documents()
    stream = []
    for i in train_docs:
        stream += tok([corpus.render(docs[i])])["input_ids"][0] + [EOS]
    assert tr.flatten().tolist() == stream[:6 * 128]
    seen_train, seen_val = set(doc_ids(tr)), set(doc_ids(va))
    assert seen_train <= set(train_docs) and seen_val <= set(val_docs) and seen_train and seen_val
    # conversations rendered as "role: text" lines without a chat template
    assert "user: <0> hi\nassistant: " in corpus.render(docs[0])
    # deterministic in the seed; another seed is another split and order
    again = Corpus(corpus.source, tokenizer=tok, seqlen=128)
    assert torch.equal(again.packed("train", 6), tr)
    other = Corpus(corpus.source, tokenizer=tok, seqlen=128, seed=1)
    assert not torch.equal(other.packed("train", 6), tr)
    assert other.identity()["seed"] == 1 and corpus.identity()["seqlen"] == 128
    # more tokens than the train split holds: another epoch, not an error
    big = corpus.packed("train", 400)
    assert big.shape == (400, 128) and set(doc_ids(big)) <= set(train_docs)
    with pytest.raises(LinbenchError, match="fewer than one sequence"):
        Corpus(corpus.source, tokenizer=tok, seqlen=100_000).packed("val", 1)


def test_corpus_sources(tmp_path, smol_tokenizer):
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\nline two\n\n\nsecond doc\n\nthird")
    assert Corpus(str(txt)).documents() == ["first doc\nline two", "second doc", "third"]
    truncated = tmp_path / "t.json"
    truncated.write_text('[{"text": "a"}, {"text": "b"},\n {"text": "c')
    assert Corpus(str(truncated)).documents() == [{"text": "a"}, {"text": "b"}]
    ident = Corpus(str(txt)).identity()
    txt.write_text("changed\n\nfile")
    assert Corpus(str(txt)).identity()["sha256"] != ident["sha256"]
    with pytest.raises(LinbenchError, match="does not exist"):
        Corpus(str(tmp_path / "missing.jsonl"))
    # conversations go through the chat template when the tokenizer has one
    c = Corpus(str(write_corpus(tmp_path / "c.jsonl")), tokenizer=smol_tokenizer, seqlen=64)
    assert c.render(c.documents()[0]).startswith("<|im_start|>")
    assert c.packed("train", 2).max() < len(smol_tokenizer)


def test_corpus_from_a_local_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"text": f"<{i}> " + "word " * 40} for i in range(20)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    c = Corpus(str(tmp_path / "saved"), tokenizer=ByteTokenizer(), seqlen=64)
    assert len(c.documents()) == 20 and c.packed("train", 3).shape == (3, 64)
    assert len(c.identity()["sha256"]) == 64


def test_embedded_sharegpt_parses_element_by_element():
    c = Corpus("sharegpt")
    docs = c.documents()
    assert len(docs) == 17_671  # the truncated file's complete conversations
    assert docs[0]["conversations"][0]["from"] == "human"


# -- budgets ------------------------------------------------------------------------------
def test_budget_parsing():
    assert budgets.parse("smoke").seqlen == 128
    b = budgets.parse("2M")
    assert b.transfer_tokens == b.lora_tokens == 2_000_000
    assert b.val_tokens == budgets.PRESETS["cpu"].val_tokens
    b = budgets.parse("transfer=1M,lora=50k,batch=4,seqlen=256")
    assert (b.transfer_tokens, b.lora_tokens, b.batch_size, b.seqlen) == (1_000_000, 50_000, 4, 256)
    assert b.steps("transfer", 256) == 976 and b.steps("lora", 256) == 48
    b = budgets.parse("paper,lora=0.02B")
    assert b.lora_tokens == 20_000_000 and b.transfer_tokens == 20_000_000 and b.micro() == 1
    assert budgets.parse("cpu,lora=0").steps("lora", 1024) == 0
    assert budgets.parse("cpu").identity() == budgets.parse("cpu,save=3").identity()
    assert budgets.parse("cpu").identity() != budgets.parse("cpu,val=2048").identity()


def test_the_cpu_presets_set_one_lora_lr_and_paper_keeps_each_methods_own():
    assert budgets.parse("cpu").lora_lr == budgets.parse("quick").lora_lr == 1e-3
    assert budgets.parse("paper").lora_lr is None and budgets.parse("smoke").lora_lr is None
    assert budgets.parse("cpu,lora_lr=2e-4").lora_lr == 2e-4
    assert budgets.parse("cpu,lora_lr=0").lora_lr is None  # 0: each method's own
    # the lr enters the hashes through the method configs it sets, not the budget's
    assert budgets.parse("cpu").identity() == budgets.parse("cpu,lora_lr=0").identity()
    # one place builds a method at a budget: a recovering method gets the lr, --set wins,
    # a method without recovery is left as it is
    from linbench import registry
    lolcats, swa = registry.methods.get("lolcats"), registry.methods.get("swa")
    assert budgets.parse("cpu").configure(lolcats).config.lora_lr == 1e-3
    assert budgets.parse("cpu").configure(lolcats, {"lora_lr": 5e-5}).config.lora_lr == 5e-5
    assert budgets.parse("paper").configure(lolcats).config == lolcats().config
    assert budgets.parse("cpu").configure(swa).config == swa().config


@pytest.mark.parametrize("text", ["", "fast", "transfer=x", "foo=1", "1,,2", "2Q", "smoke,batch=0",
                                  "cpu,lora_lr=x", "cpu,lora_lr=-1"])
def test_bad_budget_is_one_line(text):
    with pytest.raises(LinbenchError) as e:
        budgets.parse(text)
    assert "\n" not in str(e.value) and repr(text) in str(e.value)


def test_cli_rejects_a_bad_budget_in_one_line(tmp_path, capsys):
    from linbench.cli import main
    with pytest.raises(SystemExit) as e:
        main(["run", "--methods", "lolcats", "--suite", "mmlu5", "--budget", "fast",
              "--results", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "'fast'" in err
    assert not (tmp_path / "r").exists()


# -- stages -------------------------------------------------------------------------------
def transfer_loss(model, method, ids):
    layers = linearized_layers(model)
    with torch.no_grad(), recovery._transfer_mode(layers, method.config.transfer):
        model.model(input_ids=ids)
        return torch.stack([layer.transfer_loss for layer in layers]).mean().item()


@pytest.mark.parametrize("name", ["lolcats", "hedgehog"])
def test_attention_transfer_lowers_its_loss_and_trains_only_new_parameters(name, corpus):
    method, model = linearized(name)
    val = corpus.packed("val", 2)
    before, state0 = transfer_loss(model, method, val), snapshot(model)
    new = {id(p) for p in new_parameters(model)}
    names_new = {n for n, p in model.named_parameters() if id(p) in new}
    model = recovery.recover(method, model, corpus, "smoke,transfer=1536,lora=0,eval=512")
    (stage,) = recovery.stages_of(model)
    assert stage["stage"] == "transfer" and stage["steps"] == 12 and stage["tokens"] == 1536
    assert set(stage) == {"stage", "tokens", "steps", "seconds", "final_loss", "curve", "val_curve",
                          "ppl_before", "ppl_after", "stopped", "kept_initial"}
    assert len(stage["curve"]) == 12 and [t for t, _ in stage["val_curve"]] == [0, 512, 1024, 1536]
    assert stage["ppl_before"] > 1 and stage["ppl_after"] > 1 and stage["stopped"] == "budget"
    assert stage["kept_initial"] is False
    after = transfer_loss(model, method, val)
    assert after < 0.97 * before, (before, after)
    for k, v in model.state_dict().items():
        changed = not torch.equal(v, state0[k])
        assert changed == (k in names_new), k
    assert all(layer.transfer is None for layer in linearized_layers(model))


def test_lora_lowers_cross_entropy_merges_and_round_trips(corpus, tmp_path):
    method, model = linearized("lolcats", lora_lr=3e-3, init="paper")  # no calibrated gamma
    state0 = snapshot(model)
    model = recovery.recover(method, model, corpus, "smoke,transfer=0,lora=1024")
    (stage,) = recovery.stages_of(model)
    assert stage["stage"] == "lora" and stage["ppl_after"] < 0.95 * stage["ppl_before"]
    assert not hasattr(model, "peft_config")
    assert not [n for n, _ in model.named_modules() if "lora" in n.lower()]
    assert type(linearized_layers(model)[0].q_proj) is torch.nn.Linear
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, state0[k])}
    targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    assert changed and all(k.split(".")[-2] in targets for k in changed)  # feature maps frozen
    io.save_pretrained(model, tmp_path / "m")
    back = recovery.load(tmp_path / "m")
    ids = corpus.packed("val", 1)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    assert recovery.stages_of(back) == json.loads(json.dumps(recovery.stages_of(model)))


def test_gradient_clipping_is_applied(corpus):
    method, model = linearized("lolcats", max_grad_norm=1e-3, init="paper")
    seen = []

    def on_step(info: train.StepInfo):
        clipped = torch.stack([p.grad.norm() for p in info.params if p.grad is not None]).norm()
        seen.append((info.stage, info.grad_norm, float(clipped)))
    recovery.recover(method, model, corpus, "smoke,transfer=256,lora=256", on_step=on_step)
    assert {s for s, _, _ in seen} == {"transfer", "lora"}
    for _, before, after in seen:
        assert before > 1e-3 and after <= 1e-3 * (1 + 1e-4)


@pytest.mark.parametrize("name, dtype", [
    *[(n, torch.float32) for n in ("hedgehog", "lolcats", "liger", "gla", "deltanet", "lightning")],
    ("gla", torch.bfloat16)], ids=lambda x: str(x).replace("torch.", ""))
def test_every_recovering_method_runs_its_stages(name, dtype, corpus):
    # gla's and lightning's default learnable Hedgehog maps (methods/README.md, "Feature
    # maps after recovery") do not lower this random tiny model's held-out transfer loss in
    # the smoke budget's 4 steps at lr 1e-2; the stage machinery is tested on the papers' maps
    paper_map = {"gla": {"feature_map": "identity"}, "lightning": {"feature_map": "silu"}}
    method = registry.methods.get(name)(**paper_map.get(name, {}))
    model = method.linearize(make_tiny_llama(vocab_size=256).to(dtype))
    assert method.needs_recovery()
    model = recovery.recover(method, model, corpus, "smoke")
    expect = (["transfer"] if method.config.transfer else []) + ["lora"]
    stages = recovery.stages_of(model)
    assert [s["stage"] for s in stages] == expect
    for s in stages:  # each stage improved on its start and kept its best evaluation
        vals = [v for _, v in s["val_curve"]]
        assert min(vals) < vals[0] and not s["kept_initial"], (s["stage"], vals)
        if s["stage"] == "lora":  # ppl_after is the kept (best) weights' held-out ppl
            assert s["ppl_after"] == pytest.approx(math.exp(min(vals)), rel=1e-6)
            assert s["ppl_before"] == pytest.approx(math.exp(vals[0]), rel=1e-6)
    assert next(model.parameters()).dtype == dtype and not hasattr(model, "peft_config")


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_to_identical_weights(corpus, tmp_path):
    spec = "smoke,transfer=1024,lora=768,eval=256,save=2"
    method, model = linearized("lolcats", lora_lr=1e-3)
    full = recovery.recover(method, model, corpus, spec, checkpoint_dir=tmp_path / "a")

    def stop_at(stage, step):
        def hook(info):
            if info.stage == stage and info.step == step:
                raise Interrupt
        return hook
    ckpt = tmp_path / "b"
    for hook in (stop_at("transfer", 5), stop_at("lora", 3)):
        method, model = linearized("lolcats", lora_lr=1e-3)
        with pytest.raises(Interrupt):
            recovery.recover(method, model, corpus, spec, checkpoint_dir=ckpt, on_step=hook)
    assert (ckpt / "transfer" / "config.json").exists() and (ckpt / "lora.state.pt").exists()
    method, model = linearized("lolcats", lora_lr=1e-3)
    resumed = recovery.recover(method, model, corpus, spec, checkpoint_dir=ckpt)
    ref = full.state_dict()
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, ref[k]), k
    strip = lambda stages: [{k: v for k, v in s.items() if k != "seconds"} for s in stages]  # noqa: E731
    assert strip(recovery.stages_of(resumed)) == strip(recovery.stages_of(full))
    method, model = linearized("lolcats", lora_lr=1e-3)
    with pytest.raises(ValueError, match="different recovery"):
        recovery.recover(method, model, corpus, spec + ",lora=1024", checkpoint_dir=ckpt)


def test_a_bad_stage_checkpoint_or_state_file_is_redone_not_trusted(corpus, tmp_path):
    """Resuming after damage to the finished transfer stage (garbage in its weights) and to
    the LoRA training state ends with the weights of a run that never stopped."""
    spec = "smoke,transfer=512,lora=512,eval=256,save=2"
    method, model = linearized("lolcats", lora_lr=1e-3)
    full = recovery.recover(method, model, corpus, spec, checkpoint_dir=tmp_path / "a")
    ckpt = tmp_path / "b"

    def stop(info):
        if info.stage == "lora" and info.step == 3:
            raise Interrupt
    method, model = linearized("lolcats", lora_lr=1e-3)
    with pytest.raises(Interrupt):
        recovery.recover(method, model, corpus, spec, checkpoint_dir=ckpt, on_step=stop)
    weights = ckpt / "transfer" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(weights.stat().st_size // 2)
        f.write(b"\xff" * 64)
    (ckpt / "lora.state.pt").write_bytes(b"torn")
    logs = []
    method, model = linearized("lolcats", lora_lr=1e-3)
    resumed = recovery.recover(method, model, corpus, spec, checkpoint_dir=ckpt, echo=logs.append)
    (line,) = [s for s in logs if "is bad" in s]
    assert f"stage checkpoint {ckpt / 'transfer'} is bad (model.safetensors does not match" in line
    assert "rerunning stage transfer" in line
    assert (ckpt / "lora.state.pt.corrupt").read_bytes() == b"torn"
    assert len(list(ckpt.glob("transfer.corrupt-*"))) == 1
    ref = full.state_dict()
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_early_stopping_on_rising_validation_loss_keeps_the_best_weights(corpus, monkeypatch):
    method, model = linearized("lolcats", init="paper")  # step 0 = the constructed weights
    params0 = {n: p.detach().clone() for n, p in model.named_parameters()
               if id(p) in {id(q) for q in new_parameters(model)}}
    rising = iter(range(100))
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: 1.0 + 0.1 * next(rising))
    logs = []
    model = recovery.recover(method, model, corpus, "smoke,transfer=2048,lora=0,eval=128,patience=2",
                             echo=logs.append)
    (stage,) = recovery.stages_of(model)
    assert stage["stopped"] == "early_stop" and stage["steps"] == 2 and len(stage["val_curve"]) == 3
    # the thrown-away stage says so, in the stage dict and in one output line
    assert stage["kept_initial"] is True
    (warning,) = [s for s in logs if "kept its initial weights" in s]
    assert "transfer" in warning and "2 steps" in warning
    for n, p in model.named_parameters():
        if n in params0:
            assert torch.equal(p, params0[n]), n  # the step-0 weights were the best


# -- runner -------------------------------------------------------------------------------
class CountSuite:
    name, version = "test-count", "1"

    def config(self, ctx):
        return {}

    def run(self, model, tokenizer, ctx):
        from linbench.suites.base import Metric, Record
        n = float(sum(p.numel() for p in model.parameters()))
        return [Record("test-count", {"n": Metric(n, None, 1)})]


def test_runner_recovers_once_then_reuses_the_checkpoint(tmp_path, monkeypatch, smol_tokenizer):
    from linbench import run as runner
    from linbench.suites.base import RunContext
    monkeypatch.setenv("LINBENCH_CACHE", str(tmp_path / "cache"))
    registry.suites.register("test-count", CountSuite)
    try:
        model_dir = tmp_path / "tiny"
        make_tiny_llama().save_pretrained(model_dir)
        smol_tokenizer.save_pretrained(model_dir)
        data = str(write_corpus(tmp_path / "c.jsonl", n=200))
        ctx = RunContext(device="cpu", dtype="float32", progress=False, seed=3)
        plan = runner.RunPlan(str(model_dir), ["lolcats", "softmax"], ["test-count"], ctx,
                              str(tmp_path / "results"), budget="smoke", data=data,
                              checkpoints=str(tmp_path / "ckpt"))
        calls = []
        real = recovery.recover
        monkeypatch.setattr(recovery, "recover", lambda *a, **k: calls.append(1) or real(*a, **k))
        logs = []
        first = runner.run(plan, echo=logs.append)
        lol, soft = first
        assert calls == [1] and any("recovering on" in s for s in logs)
        assert [s["stage"] for s in lol["recovery"]] == ["transfer", "lora"]
        assert lol["config"]["recovery"]["budget"] == budgets.parse("smoke").identity()
        assert lol["config"]["recovery"]["data"]["seqlen"] == 128 and lol["seeds"]["recovery"] == 3
        assert soft["recovery"] == [] and "recovery" not in soft["config"]
        logs.clear()
        plan.force = True
        again = runner.run(plan, echo=logs.append)
        assert calls == [1] and any("reusing recovered checkpoint" in s for s in logs)
        assert again[0]["recovery"] == lol["recovery"] and again[0]["metrics"] == lol["metrics"]
        other = runner.RunPlan(**{**plan.__dict__, "budget": "smoke,lora=256"})
        spec = runner.models.resolve(str(model_dir))
        keys = {j.key for j in runner.plan_jobs(other, spec, runner.Store(other.results_dir))}
        assert lol["config_hash"] not in keys and soft["config_hash"] in keys
    finally:
        registry.suites.unregister("test-count")


# -- the optional distillation stage ------------------------------------------------------
def test_distill_stage_pulls_the_student_to_the_teacher_between_transfer_and_lora(corpus):
    """distill="new": the stage runs between transfer and LoRA and lowers its held-out KL."""
    method, model = linearized("lolcats", distill="new", distill_lr=1e-2, init="paper")
    model = recovery.recover(method, model, corpus, "smoke,transfer=256,distill=512,lora=256")
    assert [s["stage"] for s in recovery.stages_of(model)] == ["transfer", "distill", "lora"]
    stage = recovery.stages_of(model)[1]
    assert stage["steps"] == 4 and stage["val_curve"][-1][1] < stage["val_curve"][0][1]
    assert stage["ppl_after"] is not None


def test_distill_teacher_is_the_softmax_parent():
    from tests.recovery.test_calibrate import linearized as calibrate_linearized
    base = make_tiny_llama(vocab_size=256, seed=0)
    model = calibrate_linearized("lolcats")  # the same tiny Llama (vocab 256, seed 0)
    ids = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        with recovery._transfer_mode(linearized_layers(model), "teacher"):
            teacher = model(ids).logits
        torch.testing.assert_close(teacher, base(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(ids).logits, teacher, atol=1e-3)  # the student differs


@pytest.mark.parametrize("which", ["new", "all"])
def test_distill_trains_the_parameters_it_names(corpus, which):
    method, model = linearized("lolcats", distill=which, init="paper")
    state0 = snapshot(model)
    model = recovery.recover(method, model, corpus, "smoke,transfer=0,distill=256,lora=0")
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, state0[k])}
    assert changed
    if which == "new":
        assert all(".mixer." in k for k in changed)
    else:
        assert any("q_proj" in k for k in changed) and any("mlp" in k for k in changed)


def test_distill_is_checked_and_its_budget_defaults_to_lora_tokens():
    with pytest.raises(LinbenchError, match=r"unknown distill 'kl' \(choose from: all, new, none\)"):
        registry.methods.get("gla")(distill="kl")
    b = budgets.parse("cpu")
    assert b.stage_tokens("distill") == b.lora_tokens and "distill_tokens" not in b.identity()
    assert budgets.parse("cpu,distill=4096").stage_tokens("distill") == 4096
    assert not registry.methods.get("gla")(transfer=None, lora_r=0).needs_recovery()
    assert registry.methods.get("gla")(transfer=None, lora_r=0, distill="new").needs_recovery()
