"""The lm-eval suites under torch.distributed (suites/prefix.py): every rank builds every
request, runs only its share of the model calls, and returns the one-process answers,
float for float. Also recall's prompts split across ranks (suites.base.shared_map).

One spawn of 2 gloo processes (torch.multiprocessing, init_method file://) on a tiny
Llama: loglikelihood of MMLU-shaped 5-shot requests (two subjects' shared prefixes, four
one-token choices each) and cloze requests, with prefix reuse on, off (HFLM's batches),
and on with max_length 300 (the MMLU requests left-truncated: HFLM's path inside reuse);
then a tiny recall run with an oracle in place of generation. The one-process answers are
computed here, single-threaded as the ranks are.
"""
from __future__ import annotations

import json
import re
import traceback
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.utils import Collator

from linbench.suites.prefix import PrefixReuseLM, hflm_batches

WORLD = 2
QUESTIONS = [("anatomy", r) for r in range(5)] + [("us_foreign_policy", r) for r in range(3)]
CLOZE = "The following are questions (with answers) about anatomy.\n\nQuestion: What is the largest bone?\nAnswer:"
CONFIGS = {"reuse": {"prefix_reuse": True}, "plain": {"prefix_reuse": False},
           "truncated": {"prefix_reuse": True, "max_length": 300}}


def requests():
    from tests.suites.test_mmlu5 import hand_prompt
    out = [(hand_prompt(s, row), " " + letter) for s, row in QUESTIONS for letter in "ABCD"]
    out += [(CLOZE, " the femur, in the thigh"), (CLOZE, " the skull"), (CLOZE, " the femur")]
    return [Instance("loglikelihood", {}, args, i) for i, args in enumerate(out)]


def scores(tokenizer) -> dict:
    """{config: (answers, model forward calls)} on this process (distributed or not)."""
    from tests.suites.test_prefix_reuse import model_for
    model = model_for("softmax")
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    out = {}
    for name, kw in CONFIGS.items():
        calls.clear()
        lm = PrefixReuseLM(pretrained=model, tokenizer=tokenizer, batch_size=3, progress=False, **kw)
        out[name] = (lm.loglikelihood(requests()), len(calls))
        assert lm.fallback_reason is None
    return out


def oracle(model, tok, ids, max_new):
    """Reads the answer from the prompt (tests/suites/test_recall.py's oracle, squad aside)."""
    t = tok.decode(ids)
    for pat in (r"pass key is (\d{5})", r"magic number of \w+ is (\d{5})"):
        if m := re.search(pat, t):
            return " " + m.group(1) + "."
    if t.endswith("\nAnswer:"):
        return " no idea"
    key = t.rsplit("\n", 1)[1].removesuffix(":")
    return " " + re.search(rf"\n{key}: (\d+)\n", t).group(1)


def recall(tokenizer) -> tuple[dict, int]:
    """A tiny recall record (oracle outputs) and how many prompts this process decoded."""
    from linbench.suites import recall as suite
    from linbench.suites.base import RunContext
    from tests.conftest import make_tiny_llama
    seen = []
    saved = suite.greedy_text
    suite.greedy_text = lambda *a: (seen.append(1), oracle(*a))[1]
    try:
        (rec,) = suite.Recall(lengths=(128, 256), depths=(0.0, 1.0), pairs=(4,), kv_queries=3).run(
            make_tiny_llama(max_position_embeddings=512), tokenizer,
            RunContext(limit=1, seed=3, progress=False))
    finally:
        suite.greedy_text = saved
    rec.details.pop("seconds")
    return json.loads(json.dumps(rec.to_json())), len(seen)


def _worker(rank: int, world: int, tmp: str) -> None:
    import torch.distributed as tdist
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    from linbench.assets.models import load_tokenizer
    tokenizer = load_tokenizer("smollm2-135m")
    out = {"scores": scores(tokenizer), "recall": recall(tokenizer)}
    # ranks holding different requests: an error on every rank, before any model call
    from linbench.errors import LinbenchError
    from tests.suites.test_prefix_reuse import model_for
    lm = PrefixReuseLM(pretrained=model_for("softmax"), tokenizer=tokenizer, batch_size=3, progress=False)
    try:
        lm._loglikelihood_tokens([(None, [1, 2, 3], [4 + rank])])
        out["mismatch"] = None
    except LinbenchError as exc:
        out["mismatch"] = str(exc)
    torch.save(out, Path(tmp) / f"rank{rank}.pt")
    tdist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory, smol_tokenizer):
    """([per-rank outputs], the one-process outputs), the latter computed here while the
    ranks run."""
    import torch.multiprocessing as mp
    tmp = tmp_path_factory.mktemp("lmeval-dist")
    ranks = mp.spawn(_worker, args=(WORLD, str(tmp)), nprocs=WORLD, join=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = {"scores": scores(smol_tokenizer), "recall": recall(smol_tokenizer)}
    finally:
        torch.set_num_threads(threads)
    try:
        while not ranks.join():
            pass
    except Exception:  # noqa: BLE001
        pytest.fail(traceback.format_exc())
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], one


@pytest.mark.parametrize("config", list(CONFIGS))
def test_answers_equal_one_process_and_calls_are_shared(spawned, config):
    ranks, one = spawned
    want, calls = one["scores"][config]
    assert len({round(ll, 3) for ll, _ in want}) > 10          # the scores are not all alike
    for out in ranks:
        got, _ = out["scores"][config]
        assert got == want                                     # the same floats, every rank
        assert all(type(ll) is float and type(g) is bool for ll, g in got)
    share = [out["scores"][config][1] for out in ranks]
    # each rank ran part of the model calls; together, the one process's (reuse: plus the
    # one-time check's 3 on the other rank, and a prefix run again when a group's batches
    # straddle the two ranks)
    assert all(0 < c < calls for c in share), (share, calls)
    extra = 0 if config == "plain" else 3 + 1
    assert calls <= sum(share) <= calls + extra, (share, calls)


def test_recall_prompts_split_across_ranks(spawned):
    ranks, one = spawned
    record, decoded = one["recall"]
    assert record["metrics"]["passkey"]["value"] == 1.0 and record["metrics"]["kv"]["n"] == 3
    assert all(out["recall"][0] == record for out in ranks)
    share = [out["recall"][1] for out in ranks]
    assert sum(share) == decoded and all(0 < c < decoded for c in share)


def test_ranks_with_different_requests_stop(spawned):
    ranks, _ = spawned
    assert all("ranks built different lm-eval requests" in (out["mismatch"] or "") for out in ranks)


def test_hflm_batches_are_lm_evals():
    """hflm_batches forms the batches lm-eval's Collator forms (the ones HFLM runs), with
    and without grouping by context, ties and multi-token continuations included."""
    base = list(range(10, 30))
    reqs = [(None, base[:n], [c]) for n in (5, 9, 12, 9, 5, 12) for c in (1, 2)]
    reqs += [(None, base[:8], [base[8], 3]), (None, base[:9], [3]), (None, base[:7], [4, 5, 6]),
             (None, base[:5], [1]), (None, [7] * 11, [1])]
    for grouped in (True, False):
        # HFLM's Collator, on the requests with their index in place of the request string
        col = Collator([(r, *req[1:]) for r, req in enumerate(reqs)],
                       sort_fn=lambda x: (-len(x[1] + x[2]), tuple(x[1] + x[2])),
                       group_fn=lambda x: x[1] + x[2][:-1],
                       group_by="contexts" if grouped else None)
        want = [[x[0] for x in batch] for batch in col.get_batched(n=3)]
        got = hflm_batches(reqs, 3, grouped)
        assert len(got) == len(want)
        key = (lambda r: tuple(reqs[r][1] + reqs[r][2][:-1])) if grouped else (lambda r: r)
        for (rs, cost), reps in zip(got, want):
            assert set(reps) <= set(rs) and {key(r) for r in rs} == {key(r) for r in reps}
            assert cost == len(reps) * max(len(reqs[r][1] + reqs[r][2]) for r in reps)
        assert sorted(r for rs, _ in got for r in rs) == list(range(len(reqs)))
