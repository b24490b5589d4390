"""commonsense: lm-eval's official requests for the five tasks, the offline data's schema,
the seeded limit, and an end-to-end run on a tiny random Llama checked against a
hand-written log-likelihood loop (plus, marked integration, the embedded SmolLM2)."""
from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from linbench.suites import lmeval
from linbench.suites.base import Record, RunContext
from linbench.suites.commonsense import (TASKS, Commonsense, Doc, read_split, split_file,
                                         task_metrics, task_rows)
from tests.conftest import make_tiny_llama

# The Hub datasets lm-eval's bundled tasks load: (dataset_path, dataset_name, columns).
HUB = {
    "piqa": ("baber/piqa", None, ["goal", "sol1", "sol2", "label"]),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", ["id", "question", "choices", "answerKey"]),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge",
                      ["id", "question", "choices", "answerKey"]),
    "hellaswag": ("Rowan/hellaswag", None, ["ind", "activity_label", "ctx_a", "ctx_b", "ctx",
                                            "endings", "source_id", "split", "split_type",
                                            "label"]),
    "winogrande": ("allenai/winogrande", "winogrande_xl",
                   ["sentence", "option1", "option2", "answer"]),
}




def _hellaswag_clean(text: str) -> str:
    """HellaSwag's text cleanup as lm-eval documents it: strip, " [title]" -> ". ",
    drop the other WikiHow [tags], collapse one double space."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hand_requests(task: str, row: dict) -> list[tuple[str, str]]:
    """The official 0-shot (context, continuation) pairs, written out by hand."""
    if task == "piqa":
        return [(f"Question: {row['goal']}\nAnswer:", " " + s) for s in (row["sol1"], row["sol2"])]
    if task.startswith("arc_"):
        return [(f"Question: {row['question']}\nAnswer:", " " + t) for t in row["choices"]["text"]]
    if task == "hellaswag":
        ctx = _hellaswag_clean(f"{row['activity_label']}: {row['ctx_a']} "
                               f"{row['ctx_b'].capitalize()}")
        return [(ctx, " " + _hellaswag_clean(e)) for e in row["endings"]]
    blank = row["sentence"].index("_")  # winogrande: the options fill the context
    rest = " " + row["sentence"][blank + 1:].strip()
    return [(row["sentence"][:blank] + o, rest) for o in (row["option1"], row["option2"])]


def choice_texts(task: str, row: dict) -> list[str]:
    """What lm-eval's acc_norm divides by the length of (the choice, no leading space)."""
    return [c.lstrip(" ") for _, c in hand_requests(task, row)]


# ---------------------------------------------------------------- (a) data and requests

def test_offline_splits_have_the_hub_columns_and_valid_golds():
    sizes = {"piqa": 1838, "arc_easy": 570, "arc_challenge": 299, "hellaswag": 10042,
             "winogrande": 1267}
    for task, (_, _, columns) in HUB.items():
        table = read_split(task)
        assert table.column_names == columns and table.num_rows == sizes[task]
        rows = table.to_pylist()
        for row in rows:
            assert 0 <= TASKS[task].gold(row) < len(hand_requests(task, row))
        if task.startswith("arc_"):
            assert str(table.schema.field("choices").type) == \
                "struct<text: list<item: string>, label: list<item: string>>"
            assert {len(r["choices"]["text"]) for r in rows} <= {3, 4, 5}
        if task == "winogrande":
            assert all(r["sentence"].count("_") == 1 for r in rows)


def bundled_task(task: str, data_file: Path, cache_dir: Path):
    """lm-eval's own task from its bundled YAML, its dataset pointed at a local file."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml
    cfg = load_yaml(lmeval.bundled_tasks_dir() / TASKS[task].bundled)
    path, name, _ = HUB[task]
    assert (cfg["dataset_path"], cfg["dataset_name"]) == (path, name)
    assert cfg["validation_split"] == "validation" and cfg.get("num_fewshot") is None
    # ARC's official split is test; the others evaluate validation as we do
    assert cfg.get("test_split") == ("test" if task.startswith("arc_") else None)
    cfg.pop("tag", None)
    cfg.update(dataset_path="arrow", dataset_name=None, training_split=None, test_split=None,
               dataset_kwargs={"data_files": {"validation": str(data_file)},
                               "cache_dir": str(cache_dir)})
    return ConfigurableTask(config=cfg)


def test_requests_match_lm_eval_bundled_tasks(tmp_path, no_network):
    suite = Commonsense()
    ctx = RunContext(limit=5, seed=11, progress=False)
    with lmeval.offline(), lmeval.quiet():
        plan = suite.prepare(tmp_path, ctx)
        ours = lmeval.load_tasks(tmp_path / "tasks", list(plan))["tasks"]
        bracketed = 0
        for name, (task, rows) in plan.items():
            data_file = next((tmp_path / "data" / task).glob("*.arrow"))
            official = bundled_task(task, data_file, tmp_path / "official_cache")
            mine = ours[name]
            assert mine.config.output_type == official.config.output_type == "multiple_choice"
            assert mine.config.target_delimiter == official.config.target_delimiter == " "
            assert sorted(mine._metric_fn_list) == sorted(official._metric_fn_list)
            assert TASKS[task].metric in mine._metric_fn_list
            assert (mine.multiple_input > 0) == (official.multiple_input > 0) \
                == (task == "winogrande")
            requests = []
            for t in (official, mine):
                t.build_all_requests()
                requests.append([(i.doc_id, i.idx, i.args) for i in t.instances])
            assert requests[0] == requests[1]
            raw = read_split(task).take(rows).to_pylist()
            expected = [(d, k, pair) for d, row in enumerate(raw)
                        for k, pair in enumerate(hand_requests(task, row))]
            assert requests[1] == expected
            for doc, row in zip(official.task_docs, raw, strict=True):  # the gold scored
                gold = official.doc_to_text(doc) if official.multiple_input \
                    else official.doc_to_target(doc)
                assert gold == TASKS[task].gold(row)
            if task == "hellaswag":
                bracketed += sum("[" in r["ctx"] for r in raw)
        assert bracketed > 0  # the WikiHow cleanup was exercised


# ---------------------------------------------------------------- (b) the limit

def test_limit_selection_is_deterministic_sized_and_stratified(tmp_path):
    for task in TASKS:
        golds = [TASKS[task].gold(r) for r in read_split(task).to_pylist()]
        n = len(golds)
        for limit in (1, 9, 100):
            rows = task_rows(task, limit, 1234)
            assert rows == task_rows(task, limit, 1234)  # same on every call
            assert len(rows) == len(set(rows)) == limit and rows == sorted(rows)
            got = Counter(golds[r] for r in rows)
            for label, m in Counter(golds).items():  # floor or ceil of the fair share
                assert math.floor(m * limit / n) <= got[label] <= math.ceil(m * limit / n)
        assert task_rows(task, 9, 1) != task_rows(task, 9, 2)
        assert task_rows(task, None, 1) == task_rows(task, n, 1) == list(range(n))
    # the files lm-eval reads hold exactly the selected rows, schema untouched
    plan = Commonsense(["winogrande", "arc_challenge"]).prepare(tmp_path, RunContext(limit=4))
    for name, (task, rows) in plan.items():
        assert rows == task_rows(task, 4, 1234)
        written = lmeval.read_arrow(next((tmp_path / "data" / task).glob("*.arrow")))
        full = read_split(task)
        assert written.schema == full.schema
        assert written.to_pylist() == full.take(rows).to_pylist()
    full_plan = Commonsense(["arc_challenge"]).prepare(tmp_path / "all", RunContext(limit=None))
    cfg = (tmp_path / "all" / "tasks" / "commonsense_arc_challenge.yaml").read_text()
    assert str(split_file("arc_challenge")) in cfg and len(full_plan[
        "commonsense_arc_challenge"][1]) == 299


def test_metrics_average_and_bad_task():
    from linbench.errors import LinbenchError
    docs = [Doc("piqa", i, 0, [0.0, 0.0], bool(v), bool(v)) for i, v in enumerate([1, 0, 1, 1])]
    docs += [Doc("hellaswag", i, 0, [0.0] * 4, True, bool(v)) for i, v in enumerate([0, 1])]
    m = task_metrics(docs, ["piqa", "hellaswag"])
    assert m["piqa"].value == 0.75 and m["piqa"].n == 4
    assert m["piqa"].stderr == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    assert m["hellaswag"].value == 0.5  # acc_norm, not acc (all True)
    assert m["avg"].value == pytest.approx(0.625) and m["avg"].n == 6 and m["avg"].stderr is None
    with pytest.raises(LinbenchError, match="unknown commonsense task 'boolq'"):
        Commonsense(["boolq"])
    assert Commonsense().config(RunContext())["tasks"] == "all"
    assert Commonsense(["winogrande", "piqa"]).tasks == ["piqa", "winogrande"]


# ---------------------------------------------------------------- (c) end to end

@torch.no_grad()
def hand_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context): the tokens of context+continuation
    beyond those of the context alone (how lm-eval splits a causal model's pair)."""
    assert context == context.rstrip()
    whole = tokenizer.encode(context + continuation)
    n_ctx = len(tokenizer.encode(context))
    logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(logp[t - 1, whole[t]].item() for t in range(n_ctx, len(whole)))


def test_run_end_to_end_matches_a_hand_loop(smol_tokenizer, no_network, tmp_path, capfd):
    model = make_tiny_llama()
    suite = Commonsense()
    seen: list[Doc] = []
    evaluate = suite.evaluate
    suite.evaluate = lambda *a, **k: seen.extend(evaluate(*a, **k)) or seen
    ctx = RunContext(limit=3, batch_size=4, seed=5, progress=False, work_dir=str(tmp_path))
    [record] = suite.run(model, smol_tokenizer, ctx)

    assert "it/s]" not in capfd.readouterr().err  # progress=False: no bar at all
    assert isinstance(record, Record) and record.suite == "commonsense" and record.status == "ok"
    assert set(record.metrics) == set(TASKS) | {"avg"}
    for task in TASKS:
        m = record.metrics[task]
        assert m.n == 3 and 0.0 <= m.value <= 1.0
    assert record.metrics["avg"].n == 15
    assert record.metrics["avg"].value == pytest.approx(np.mean([record.metrics[t].value
                                                                 for t in TASKS]))
    d = record.details
    assert d["lm_eval_version"] == "0.4.13" and d["num_fewshot"] == 0 and d["split"] == "validation"
    assert d["limit_per_task"] == 3 and d["selection_seed"] == 5
    assert {t: (v["metric"], v["value"], v["n"]) for t, v in d["commonsense"].items()} == {
        t: (TASKS[t].metric, record.metrics[t].value, 3) for t in TASKS}

    assert len(seen) == 15
    selected = {t: task_rows(t, 3, 5) for t in TASKS}
    # per-item outcomes (paired tests): each task's reported metric (acc or acc_norm) per
    # doc, ids "<task>/<row>"; the metrics are their means, "avg" the mean of those means
    items = d["items"]
    assert set(items) == set(TASKS)
    for task in TASKS:
        mine = [doc for doc in seen if doc.task == task]
        assert items[task]["ids"] == [f"{task}/{r}" for r in selected[task]]
        assert items[task]["values"] == [int(getattr(doc, TASKS[task].metric)) for doc in mine]
        assert np.mean(items[task]["values"]) == pytest.approx(record.metrics[task].value,
                                                               abs=1e-12)
    assert np.mean([np.mean(items[t]["values"]) for t in TASKS]) == pytest.approx(
        record.metrics["avg"].value, abs=1e-12)
    for doc in seen:
        assert doc.index in selected[doc.task]
        row = read_split(doc.task).slice(doc.index, 1).to_pylist()[0]
        assert doc.gold == TASKS[doc.task].gold(row)
        lls = [hand_loglikelihood(model, smol_tokenizer, c, x)
               for c, x in hand_requests(doc.task, row)]
        np.testing.assert_allclose(doc.loglikelihoods, lls, rtol=0, atol=1e-4)
        assert doc.acc == (int(np.argmax(lls)) == doc.gold)
        if doc.task == "winogrande":
            assert doc.acc_norm is None
        else:
            per_char = np.array(lls) / [len(c) for c in choice_texts(doc.task, row)]
            assert doc.acc_norm == (int(np.argmax(per_char)) == doc.gold)


def test_progress_bar_only_when_asked(smol_tokenizer, capfd):
    ctx = RunContext(limit=2, batch_size=4, progress=True)
    [record] = Commonsense(["piqa"]).run(make_tiny_llama(), smol_tokenizer, ctx)
    assert record.metrics["piqa"].n == 2 and record.metrics["avg"].n == 2
    assert "Running loglikelihood requests" in capfd.readouterr().err


# ---------------------------------------------------------------- (d) the embedded model

@pytest.mark.integration
def test_embedded_smollm2_is_clearly_above_chance_on_arc_easy():
    """SmolLM2-135M on 100 ARC-Easy validation questions (4 choices, chance 25%)."""
    from linbench.assets import models
    model, tok = models.load(models.resolve("smollm2-135m"), "float32", "cpu")
    ctx = RunContext(limit=100, batch_size=16, progress=False)
    [record] = Commonsense(["arc_easy"]).run(model, tok, ctx)
    m = record.metrics["arc_easy"]
    assert m.n == 100
    assert m.value >= 0.40, m  # measured 0.54; chance 0.25, binomial stderr 0.043 at n=100


def test_items_counts_the_documents_a_run_scores():
    from linbench.suites.base import RunContext
    from linbench.suites.commonsense import TASKS, Commonsense, read_split
    assert Commonsense().items(RunContext(limit=20)) == 20 * len(TASKS)
    assert Commonsense().items(RunContext(limit=None)) == sum(read_split(t).num_rows for t in TASKS)
