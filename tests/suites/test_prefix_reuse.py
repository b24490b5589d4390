"""Prefix reuse (suites/prefix.py) scores every request exactly as lm-eval's plain HFLM:
same log-likelihoods (within 1e-4) and is_greedy, on every registered method, on real
5-shot MMLU requests (a subject's prefix shared by several questions, 4 choices each),
cloze requests with multi-token continuations, greedy continuations, left truncation,
and models whose cache cannot be copied or continued (HFLM's path, with the reason)."""
from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from linbench import registry
from linbench.suites import prefix
from linbench.suites.prefix import Item, PrefixReuseLM, plan_groups
from tests.conftest import make_tiny_llama
from tests.suites.test_mmlu5 import hand_prompt

TOL = 1e-4
QUESTIONS = [("anatomy", 0), ("anatomy", 1), ("anatomy", 2), ("us_foreign_policy", 0)]


def requests():
    """lm-eval Instances: 4 five-shot MMLU questions x " A".." D" (three share a subject's
    prefix), and one cloze question with two multi-token answers."""
    out = [(hand_prompt(s, row), " " + letter) for s, row in QUESTIONS for letter in "ABCD"]
    cloze = "The following are questions (with answers) about anatomy.\n\nQuestion: What is the largest bone?\nAnswer:"
    out += [(cloze, " the femur, in the thigh"), (cloze, " the skull")]
    return [Instance("loglikelihood", {}, args, i) for i, args in enumerate(out)]


def model_for(name: str):
    """The tiny Llama linearized by `name` without recovery, moved off its initialization
    (with embeddings scaled up so the next-token distributions are far from uniform)."""
    torch.manual_seed(0)
    model = registry.methods.get(name)().linearize(make_tiny_llama())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.get_input_embeddings().weight.mul_(10)
    return model.eval()


def pair(model, tokenizer, **kw):
    plain = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3, **kw)
    fast = PrefixReuseLM(pretrained=model, tokenizer=tokenizer, batch_size=3, progress=False, **kw)
    return plain, fast


def assert_same(got, want):
    assert len(got) == len(want)
    for (ll, greedy), (ll0, greedy0) in zip(got, want):
        assert abs(ll - ll0) <= TOL, (ll, ll0)
        assert greedy == greedy0


def greedy_tokens(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


@pytest.mark.parametrize("name", registry.methods.names())
def test_same_scores_as_hflm_on_every_method(name, smol_tokenizer):
    model = model_for(name)
    plain, fast = pair(model, smol_tokenizer)
    reqs = requests()
    want = plain.loglikelihood(reqs, disable_tqdm=True)
    got = fast.loglikelihood(reqs)
    assert_same(got, want)
    assert fast.fallback_reason is None
    # it did reuse: the anatomy prefix and the cloze context were each computed once
    assert fast.stats["shared_groups"] >= 2
    assert fast.stats["tokens_run"] < 0.7 * fast.stats["tokens_plain"]
    assert len({round(ll, 3) for ll, _ in want}) > 8      # the scores are not all alike

    # token-level requests sharing a prefix, one continuation the model's greedy choice
    ids = smol_tokenizer(hand_prompt("anatomy", 0))["input_ids"][:120]
    cont = greedy_tokens(model, ids, 2)
    tok_reqs = [(None, ids, cont), (None, ids, [cont[0], (cont[1] + 1) % 1000]),
                (None, ids[:100], ids[100:103]), (None, ids[:110], [cont[0]])]
    want = plain._loglikelihood_tokens(tok_reqs, disable_tqdm=True)
    assert want[0][1] and not want[1][1]
    assert_same(fast._loglikelihood_tokens(tok_reqs, disable_tqdm=True), want)


def test_left_truncated_requests_take_hflm_path(smol_tokenizer):
    """max_length 300: the ~700-token MMLU requests are truncated on the left (HFLM's
    path), the short cloze ones still share their context."""
    plain, fast = pair(model_for("softmax"), smol_tokenizer, max_length=300)
    reqs = requests()
    assert_same(fast.loglikelihood(reqs), plain.loglikelihood(reqs, disable_tqdm=True))
    assert fast.stats["inputs"] == 2 and fast.stats["shared_groups"] == 1


def test_switch_off_is_hflm(smol_tokenizer, monkeypatch):
    model = model_for("lolcats")
    _, fast = pair(model, smol_tokenizer)
    fast.prefix_reuse = False
    monkeypatch.setattr(prefix, "plan_groups", None)       # never reached
    reqs = requests()[-2:]
    assert_same(fast.loglikelihood(reqs), HFLM(pretrained=model, tokenizer=smol_tokenizer,
                                               batch_size=3).loglikelihood(reqs, disable_tqdm=True))


@pytest.mark.parametrize("broken, reason", [
    (lambda cache, batch: (_ for _ in ()).throw(TypeError("no copy")), "cannot be copied"),
    (lambda cache, batch: __import__("transformers").DynamicCache(), "differ from a plain forward"),
])
def test_uncopyable_or_wrong_cache_falls_back(broken, reason, smol_tokenizer, monkeypatch):
    """A cache that cannot be copied, or one that continues wrongly (here: an empty one,
    the prefix lost), is caught by the one-time check: HFLM's path, reason recorded."""
    plain, fast = pair(model_for("softmax"), smol_tokenizer)
    monkeypatch.setattr(prefix, "clone_cache", broken)
    reqs = requests()[8:]
    assert_same(fast.loglikelihood(reqs), plain.loglikelihood(reqs, disable_tqdm=True))
    assert reason in fast.fallback_reason


def test_plan_groups_shares_the_longest_worthwhile_prefixes():
    a = tuple(range(100))
    items = [Item(a + (1, 2), 1), Item(a + (1, 3), 1), Item(a[:40] + (7,) * 30, 1),
             Item(a[:40] + (7,) * 29 + (8,), 1), Item((5,) * 50, 1), Item(a + (1,), 1)]
    groups = {tuple(sorted(m)): p for m, p in plan_groups(items, min_prefix=16)}
    # 0, 1, 5 share 100 tokens (item 5's last token is scored, so at most 100); 2, 3 share
    # 69; splitting beats one group of five sharing 40 (2*100 + 69 > 4*40); 4 runs alone
    assert groups == {(0, 1, 5): 100, (2, 3): 69, (4,): 0}
    # nothing worth sharing: every input runs whole, each exactly once
    alone = plan_groups(items, min_prefix=200)
    assert sorted(m for m, _ in alone) == [[k] for k in range(6)] and {p for _, p in alone} == {0}
