"""Stage 1 shared by recoveries that differ only after it (linbench.recovery.share): the
key ignores exactly the later stages' fields, and a recovery that adopts a published
stage 1 ends bit for bit where training it itself would have."""
from __future__ import annotations

import pytest
import torch

from linbench import registry
from linbench.methods import io
from linbench.recovery import cache, share
from linbench.recovery import stages as recovery
from linbench.recovery.corpus import Corpus
from tests.recovery.test_recovery import ByteTokenizer, write_corpus
from tests.recovery.test_select import LAYERS, kinds, tiny

BUDGET = "smoke,transfer=256,lora=256"


@pytest.fixture
def corpus(tmp_path):
    return Corpus(str(write_corpus(tmp_path / "c.jsonl")), tokenizer=ByteTokenizer(), seqlen=128)


def _key(tmp_path, budget="smoke", seed=0, **fields):
    method = registry.methods.get("hedgehog")(**fields)
    rec = {"budget": recovery.budgets.parse(budget).identity(), "data": {"source": "x"},
           "seed": seed}
    return cache.transfer_dir(tmp_path, "h" * 16, {"name": "hedgehog", **method.config_dict()},
                              rec, "float32").name


def test_the_key_ignores_only_what_stage_1_does_not_read(tmp_path):
    base = _key(tmp_path)
    for later in ({"adapter": "pissa"}, {"lora_r": 4}, {"lora_lr": 3e-4}, {"distill": "new"},
                  {"keep_softmax_layers": "auto:2"}):
        assert _key(tmp_path, **later) == base, later
    assert _key(tmp_path, budget="smoke,lora=1024") == base
    for first in ({"transfer_lr": 3e-3}, {"keep_softmax_layers": (1,)}, {"feature_map": "hedgehog_joint"}):
        assert _key(tmp_path, **first) != base, first
    assert _key(tmp_path, budget="smoke,transfer=1024") != base
    assert _key(tmp_path, seed=1) != base
    assert set(share.AFTER_TRANSFER) <= set(registry.methods.get("hedgehog")().config_dict())


def _recover(method, corpus, work=None, share_dir=None, lines=None):
    model = method.linearize(tiny())
    return recovery.recover(method, model, corpus, BUDGET, checkpoint_dir=work, share=share_dir,
                            echo=(lines.append if lines is not None else None))


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("fields", [{"lora_r": 4, "lora_lr": 3e-4}, {"keep_softmax_layers": "auto:1"}],
                         ids=["adapter", "auto"])
def test_an_adopted_stage_1_ends_where_training_it_would(fields, corpus, tmp_path):
    hub = tmp_path / "transfer" / "k"
    hedgehog = registry.methods.get("hedgehog")
    first = _recover(hedgehog(), corpus, tmp_path / "a", hub)  # trains stage 1, publishes it
    assert hub.is_dir() and not (hub / "config.json").read_text().count("layer_selection")
    method = hedgehog(**fields)
    lines: list[str] = []
    adopted = _recover(method, corpus, tmp_path / "b", hub, lines)
    alone = _recover(hedgehog(**fields), corpus)  # no checkpoint, no sharing
    assert any("stage transfer taken from" in line for line in lines), lines
    assert not any("stage transfer, " in line for line in lines), lines  # no transfer steps
    assert _same_weights(adopted, alone) and kinds(adopted) == kinds(alone)
    got, want = recovery.stages_of(adopted), recovery.stages_of(alone)
    assert got[0]["shared"] and got[0]["curve"] == want[0]["curve"] == recovery.stages_of(first)[0]["curve"]
    assert got[1]["curve"] == want[1]["curve"]
    timeless = lambda d: {k: v for k, v in (d or {}).items() if k != "seconds"}  # noqa: E731
    assert timeless(got[0].get("layer_selection")) == timeless(want[0].get("layer_selection"))
    if "keep_softmax_layers" in fields:
        assert kinds(adopted).count("softmax") == 1 and LAYERS == 4
    # the adopted stage checkpoint is ours: our config, so a resume rebuilds our model
    saved = io.base_config(tmp_path / "b" / "transfer").linbench
    want_cfg = method.config_dict() if "lora_r" in fields else adopted.config.linbench["config"]
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in saved["config"].items()} == \
        {k: tuple(v) if isinstance(v, list) else v for k, v in want_cfg.items()}


def test_a_bad_published_stage_1_is_set_aside_and_trained(corpus, tmp_path):
    hub = tmp_path / "transfer" / "k"
    hedgehog = registry.methods.get("hedgehog")
    _recover(hedgehog(), corpus, tmp_path / "a", hub)
    victim = next(hub.glob("*.safetensors"))
    victim.write_bytes(victim.read_bytes()[:-8])
    lines: list[str] = []
    model = _recover(hedgehog(lora_r=4), corpus, tmp_path / "b", hub, lines)
    assert any("shared stage 1" in line and "is bad" in line for line in lines), lines
    assert any("stage transfer, " in line for line in lines)  # trained it itself
    assert not recovery.stages_of(model)[0].get("shared")
    assert hub.is_dir()  # republished by the recovery that trained it


def _free(share_dir) -> bool:
    from filelock import FileLock, Timeout
    lk = FileLock(str(share_dir.with_name(share_dir.name + ".lock")))
    try:
        lk.acquire(timeout=0)
    except Timeout:
        return False
    lk.release()
    return True


def test_the_claim_is_held_while_stage_1_trains_and_released_once_published(corpus, tmp_path):
    hub = tmp_path / "transfer" / "k"
    held: dict[str, bool] = {}

    def on_step(info):  # the claim's state in each stage, as another process would see it
        held.setdefault(info.stage, not _free(hub))

    method = registry.methods.get("hedgehog")()
    recovery.recover(method, method.linearize(tiny()), corpus, BUDGET, checkpoint_dir=tmp_path / "a",
                     share=hub, on_step=on_step)
    assert held == {"transfer": True, "lora": False}, held
    assert _free(hub)  # and nothing is left held after the recovery


def test_a_recovery_waits_for_the_stage_1_another_one_trains_and_adopts_it(corpus, tmp_path):
    import threading
    hub = tmp_path / "transfer" / "k"
    hedgehog = registry.methods.get("hedgehog")
    first = _recover(hedgehog(), corpus, tmp_path / "a", hub)
    trained = hub.rename(tmp_path / "published-later")  # as if the first were still training it
    claim = share.Claim()
    claim.take(hub, print)
    lines: list[str] = []
    out: dict = {}
    later = threading.Thread(target=lambda: out.setdefault(
        "model", _recover(hedgehog(lora_r=4), corpus, tmp_path / "b", hub, lines)))
    later.start()
    for _ in range(600):
        if any("waiting for another recovery" in line for line in lines):
            break
        later.join(0.05)
    assert any("waiting for another recovery" in line for line in lines), lines
    assert not any("stage transfer, " in line for line in lines)  # it did not start training
    trained.rename(hub)  # the first one publishes and releases its claim
    claim.release()
    later.join(120)
    assert not later.is_alive()
    assert any("stage transfer taken from" in line for line in lines), lines
    assert not any("stage transfer, " in line for line in lines), lines
    got = recovery.stages_of(out["model"])
    assert got[0]["shared"] and got[0]["curve"] == recovery.stages_of(first)[0]["curve"]
