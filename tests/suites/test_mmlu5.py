"""mmlu5: lm-eval's official prompt byte for byte, the stratified limit, the aggregation,
and an end-to-end run on a tiny random Llama checked against a hand-written loop."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from linbench.suites import lmeval
from linbench.suites.base import Metric, Record, RunContext
from linbench.suites.mmlu5 import (CATEGORIES, MMLU5, Question, aggregate, description,
                                   read_split, select_rows, split_file, subject_categories)
from tests.conftest import make_tiny_llama

# one plain subject, two with underscores
SUBJECTS = ["anatomy", "high_school_computer_science", "us_foreign_policy"]


def hand_prompt(subject: str, row: int) -> str:
    """The official 5-shot MMLU prompt, written out by hand from the raw rows."""
    def fmt(r):
        c = r["choices"]
        return f"{r['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"
    shots = read_split(subject, "dev").to_pylist()[:5]
    target = read_split(subject, "test").to_pylist()[row]
    return (description(subject)
            + "".join(fmt(s) + " " + "ABCD"[s["answer"]] + "\n\n" for s in shots) + fmt(target))




# ---------------------------------------------------------------- (a) the prompt

def bundled_task(subject: str, cache_dir: Path, variant: str = "default", shots: int | None = 5):
    """lm-eval's own `mmlu_<subject>` task of the bundled `variant` folder ("default": the
    multiple-choice task, "continuation": the cloze one), its dataset pointed at the local
    files, with `shots` as `--num_fewshot` would set them (None: the task's own)."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml
    cfg = load_yaml(lmeval.bundled_tasks_dir() / "mmlu" / variant / f"mmlu_{subject}.yaml")
    assert cfg["dataset_path"] == "cais/mmlu" and cfg["dataset_name"] == subject
    cfg.pop("tag")
    cfg.update(dataset_path="arrow", dataset_name=None, dataset_kwargs={
        "data_files": {s: str(split_file(subject, s)) for s in ("dev", "test")},
        "cache_dir": str(cache_dir)})
    task = ConfigurableTask(config=cfg)
    if shots is not None:
        task.set_config(key="num_fewshot", value=shots)  # what `--num_fewshot 5` does
    return task


def test_prompts_match_lm_eval_bundled_mmlu_byte_for_byte(tmp_path, no_network):
    suite = MMLU5(subjects=SUBJECTS)
    ctx = RunContext(limit=None, progress=False)
    with lmeval.offline(), lmeval.quiet():
        plan = suite.prepare(tmp_path, ctx)
        ours = lmeval.load_tasks(tmp_path / "tasks", list(plan))["tasks"]
        for subject in SUBJECTS:
            official = bundled_task(subject, tmp_path / "official_cache")
            mine = ours[suite.task_name(subject)]
            requests = []
            for task in (official, mine):
                task.build_all_requests(limit=4)
                requests.append([inst.args for inst in task.instances])
            # (context, continuation) for 4 questions x 4 choices, identical strings
            assert len(requests[0]) == 16 and requests[0] == requests[1]
            for i in range(4):
                context, continuation = requests[1][4 * i]
                assert context == hand_prompt(subject, i)
                assert [requests[1][4 * i + k][1] for k in range(4)] == [" A", " B", " C", " D"]
            assert context.startswith("The following are multiple choice questions (with "
                                      f"answers) about {subject.replace('_', ' ')}.\n\n")
            assert context.count("\nAnswer:") == 6


# ---------------------------------------------------------------- (b) the limit

def test_stratified_limit_is_deterministic_sized_and_balanced():
    for subject in SUBJECTS + ["abstract_algebra"]:
        answers = read_split(subject, "test").column("answer").to_pylist()
        n = len(answers)
        for limit in (1, 7, 40):
            rows = select_rows(answers, limit, 1234, subject)
            assert rows == select_rows(answers, limit, 1234, subject)  # same every call
            assert len(rows) == len(set(rows)) == limit and rows == sorted(rows)
            got = Counter(answers[r] for r in rows)
            for label, m in Counter(answers).items():  # floor or ceil of the fair share
                assert math.floor(m * limit / n) <= got[label] <= math.ceil(m * limit / n)
        assert select_rows(answers, 7, 1, subject) != select_rows(answers, 7, 2, subject)
        assert select_rows(answers, None, 1, subject) == list(range(n))
        assert select_rows(answers, n + 5, 1, subject) == list(range(n))


def test_stratified_limit_gives_every_row_the_same_chance():
    answers = read_split("anatomy", "test").column("answer").to_pylist()  # 135 rows
    seeds, limit = 3000, 10
    hits = np.zeros(len(answers))
    for seed in range(seeds):
        hits[select_rows(answers, limit, seed, "anatomy")] += 1
    p = limit / len(answers)
    assert np.abs(hits / seeds - p).max() < 5 * math.sqrt(p * (1 - p) / seeds)


def test_limited_split_written_for_lm_eval_holds_the_selected_rows(tmp_path):
    suite = MMLU5(subjects=["anatomy"])
    plan = suite.prepare(tmp_path, RunContext(limit=5, seed=7))
    subject, rows = plan["mmlu5_anatomy"]
    full = read_split("anatomy", "test")
    written = next((tmp_path / "data" / "anatomy").glob("*.arrow"))
    import pyarrow as pa
    with pa.memory_map(str(written)) as f:
        table = pa.ipc.open_stream(f).read_all()
    assert table.schema == full.schema and table.to_pylist() == full.take(rows).to_pylist()


# ---------------------------------------------------------------- (c) categories, aggregation

def test_category_table_covers_the_57_subjects_of_the_data():
    table = subject_categories()
    data_dir = split_file("anatomy", "test").parents[2]
    assert sorted(table) == sorted(p.name for p in data_dir.iterdir() if p.is_dir())
    assert len(table) == 57
    assert Counter(table.values()) == {"stem": 19, "humanities": 13,
                                       "social_sciences": 12, "other": 13}
    assert table["high_school_computer_science"] == "stem"
    assert table["us_foreign_policy"] == "social_sciences"
    assert table["philosophy"] == "humanities" and table["nutrition"] == "other"


def test_micro_average_and_stderr_on_synthetic_results():
    from lm_eval.api.metrics import aggregate_subtask_metrics, mean_stderr
    cats = {"a": "stem", "b": "stem", "c": "humanities"}
    outcomes = {"a": [1, 1, 1, 0], "b": [0, 0], "c": [1, 0, 0, 0, 0, 1]}
    qs = [Question(s, i, 0, [0.0] * 4, 0, bool(v)) for s, vs in outcomes.items()
          for i, v in enumerate(vs)]
    m = aggregate(qs, cats)
    assert set(m) == {"acc", "acc_stem", "acc_humanities"}
    assert m["acc"].n == 12 and m["acc"].value == pytest.approx(5 / 12)
    assert m["acc"].stderr == pytest.approx(math.sqrt(5 / 12 * 7 / 12 / 11))
    assert m["acc_stem"].value == pytest.approx(3 / 6) and m["acc_stem"].n == 6
    assert m["acc_humanities"].value == pytest.approx(2 / 6)
    # lm-eval's own group aggregation (weight_by_size) and its per-sample stderr agree
    accs = [np.mean(v) for v in outcomes.values()]
    sizes = [len(v) for v in outcomes.values()]
    assert m["acc"].value == pytest.approx(aggregate_subtask_metrics(accs, sizes, True))
    pooled = [float(v) for vs in outcomes.values() for v in vs]
    assert m["acc"].stderr == pytest.approx(mean_stderr(pooled))
    assert lmeval.binomial_metric([1.0]) == Metric(1.0, None, 1)


# ---------------------------------------------------------------- (d) end to end

@torch.no_grad()
def hand_loglikelihoods(model, tokenizer, prompt: str) -> list[float]:
    out = []
    ctx_ids = tokenizer.encode(prompt)
    for letter in "ABCD":
        ids = tokenizer.encode(prompt + " " + letter)
        assert ids[:len(ctx_ids)] == ctx_ids
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        out.append(sum(logp[t - 1, ids[t]].item() for t in range(len(ctx_ids), len(ids))))
    return out


def test_run_end_to_end_matches_a_hand_loop(smol_tokenizer, no_network, tmp_path, capfd):
    model = make_tiny_llama()
    suite = MMLU5(subjects=SUBJECTS)
    seen: list[Question] = []
    evaluate = suite.evaluate
    suite.evaluate = lambda *a, **k: seen.extend(evaluate(*a, **k)) or seen
    ctx = RunContext(limit=2, batch_size=4, seed=5, progress=False, work_dir=str(tmp_path))
    [record] = suite.run(model, smol_tokenizer, ctx)

    assert "it/s]" not in capfd.readouterr().err  # progress=False: no bar at all
    assert isinstance(record, Record) and record.suite == "mmlu5" and record.status == "ok"
    assert set(record.metrics) == {"acc", "acc_stem", "acc_social_sciences"}
    assert record.metrics["acc"].n == 6 and record.metrics["acc_stem"].n == 4
    d = record.details
    assert d["num_fewshot"] == 5 and d["selection_seed"] == 5 and d["lm_eval_version"] == "0.4.13"
    assert {s: v["n"] for s, v in d["subjects"].items()} == dict.fromkeys(SUBJECTS, 2)
    assert suite.config(ctx)["subjects"] == SUBJECTS

    assert len(seen) == 6
    hits = []
    for q in seen:
        rows = select_rows(read_split(q.subject, "test").column("answer").to_pylist(), 2, 5,
                           q.subject)
        assert q.index in rows
        assert q.gold == read_split(q.subject, "test").to_pylist()[q.index]["answer"]
        lls = hand_loglikelihoods(model, smol_tokenizer, hand_prompt(q.subject, q.index))
        np.testing.assert_allclose(q.loglikelihoods, lls, rtol=0, atol=1e-4)
        assert q.pred == int(np.argmax(lls)) and q.correct == (q.pred == q.gold)
        hits.append(float(q.pred == q.gold))
    assert record.metrics["acc"].value == pytest.approx(np.mean(hits))

    # per-item outcomes (paired tests): one 0/1 per question, ids "<subject>/<row>",
    # and every metric equals the mean of its items
    items = d["items"]
    assert set(items) == set(record.metrics)
    assert items["acc"]["ids"] == [f"{q.subject}/{q.index}" for q in seen]
    assert items["acc"]["values"] == [int(h) for h in hits]
    assert items["acc_stem"]["ids"] == [f"{q.subject}/{q.index}" for q in seen
                                        if q.subject != "us_foreign_policy"]
    for name, m in record.metrics.items():
        assert len(set(items[name]["ids"])) == len(items[name]["values"]) == m.n
        assert all(v in (0, 1) for v in items[name]["values"])
        assert np.mean(items[name]["values"]) == pytest.approx(m.value, abs=1e-12)


def test_unknown_subject_is_a_clear_error():
    from linbench.errors import LinbenchError
    with pytest.raises(LinbenchError, match="unknown mmlu subject 'astrology'"):
        MMLU5(subjects=["astrology"])
    assert MMLU5().config(RunContext())["subjects"] == "all"
    assert set(subject_categories().values()) == set(CATEGORIES)


def test_items_counts_the_questions_a_run_scores():
    assert MMLU5().items(RunContext(limit=None)) == 14042          # the full test split
    assert MMLU5().items(RunContext(limit=2)) == 114               # 2 per subject
    assert MMLU5(subjects=SUBJECTS).items(RunContext(limit=None)) == sum(
        read_split(s, "test").num_rows for s in SUBJECTS)
