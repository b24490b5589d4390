"""mmlu_cloze: requests identical to lm-eval's bundled mmlu_continuation tasks, and an
end-to-end run on a tiny random Llama checked against a hand-written loop (acc, acc_norm)."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from linbench.suites import lmeval
from linbench.suites.base import RunContext
from linbench.suites.mmlu5 import read_split, select_rows
from linbench.suites.mmlu_cloze import MMLUCloze
from tests.suites.test_mmlu5 import bundled_task
from tests.conftest import make_tiny_llama

SUBJECTS = ["anatomy", "high_school_computer_science", "us_foreign_policy"]


def hand_prompt(subject: str, row: int) -> tuple[str, list[str]]:
    r = read_split(subject, "test").to_pylist()[row]
    head = f"The following are questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return head + f"Question: {r['question'].strip()}\nAnswer:", [" " + c for c in r["choices"]]


def test_requests_match_lm_eval_bundled_mmlu_continuation(tmp_path, no_network):
    suite = MMLUCloze(subjects=SUBJECTS)
    with lmeval.offline(), lmeval.quiet():
        plan = suite.prepare(tmp_path, RunContext(limit=None, progress=False))
        ours = lmeval.load_tasks(tmp_path / "tasks", list(plan))["tasks"]
        for subject in SUBJECTS:
            official = bundled_task(subject, tmp_path / "official_cache", "continuation", None)
            mine = ours[suite.task_name(subject)]
            requests = []
            for task in (official, mine):
                task.build_all_requests(limit=5)
                requests.append([inst.args for inst in task.instances])
            assert len(requests[0]) == 20 and requests[0] == requests[1]
            for i in range(5):
                context, choices = hand_prompt(subject, i)
                assert [a for a in requests[1][4 * i: 4 * i + 4]] == [(context, c) for c in choices]
            assert official.config.num_fewshot in (None, 0)


def _loglik(model, tok, context: str, continuation: str) -> float:
    ctx_ids = tok(context, add_special_tokens=False)["input_ids"]
    ids = tok(context + continuation, add_special_tokens=False)["input_ids"]
    assert ids[:len(ctx_ids)] == ctx_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(len(ctx_ids), len(ids)))


def test_run_end_to_end_matches_a_hand_loop(smol_tokenizer, no_network, tmp_path):
    model = make_tiny_llama()
    suite = MMLUCloze(subjects=SUBJECTS)
    ctx = RunContext(limit=2, batch_size=4, seed=3, progress=False, work_dir=str(tmp_path))
    [record] = suite.run(model, smol_tokenizer, ctx)
    assert record.suite == "mmlu_cloze" and record.status == "ok"
    assert record.details["num_fewshot"] == 0 and suite.config(ctx)["num_fewshot"] == 0
    acc, acc_norm = [], []
    for subject in SUBJECTS:
        rows = select_rows(read_split(subject, "test").column("answer").to_pylist(), 2, 3, subject)
        for row in rows:
            context, choices = hand_prompt(subject, row)
            gold = read_split(subject, "test").to_pylist()[row]["answer"]
            lls = [_loglik(model, smol_tokenizer, context, c) for c in choices]
            acc.append(float(np.argmax(lls) == gold))
            norm = [ll / len(c.lstrip(" ")) for ll, c in zip(lls, choices)]  # lm-eval: length of the
            # choice text without the target delimiter
            acc_norm.append(float(np.argmax(norm) == gold))
    assert record.metrics["acc"].n == 6 and record.metrics["acc_norm"].n == 6
    assert record.metrics["acc"].value == pytest.approx(np.mean(acc))
    assert record.metrics["acc_norm"].value == pytest.approx(np.mean(acc_norm))
    # per-item outcomes (paired tests), in (subject, row) order, their means the metrics
    items = record.details["items"]
    assert set(items) == set(record.metrics)
    ids = [f"{s}/{r}" for s in SUBJECTS
           for r in select_rows(read_split(s, "test").column("answer").to_pylist(), 2, 3, s)]
    assert items["acc"]["ids"] == items["acc_norm"]["ids"] == ids
    assert items["acc"]["values"] == [int(x) for x in acc]
    assert items["acc_norm"]["values"] == [int(x) for x in acc_norm]
    for name, m in record.metrics.items():
        assert len(items[name]["values"]) == m.n
        assert np.mean(items[name]["values"]) == pytest.approx(m.value, abs=1e-12)
