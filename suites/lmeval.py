"""Plumbing shared by the suites that run through lm-eval (mmlu5, commonsense).

A run goes: write task YAMLs (a template copied from package data + one small YAML per
task naming local data files) into a scratch dir -> `TaskManager(include_path=dir,
include_defaults=False)` -> `evaluator.evaluate(HFLM(pretrained=<model object>), ...)`
-> per-sample results, which the suite aggregates itself.

Deliberately not used: `simple_evaluate` (it reseeds the global random/numpy/torch
generators and shells out to git), lm-eval's response cache (`use_cache`: it keys on
the request text only, not on the model, so two models would share answers) and its
request cache (`cache_requests`).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import math
import os
import tempfile
import zlib
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from linbench.errors import LinbenchError
from linbench.suites.base import Metric

OFFLINE_ENV = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


def lm_eval_version() -> str:
    return importlib.metadata.version("lm_eval")


def bundled_tasks_dir() -> Path:
    """lm-eval's own task folder (lm_eval/tasks), located without importing lm_eval."""
    import importlib.util
    spec = importlib.util.find_spec("lm_eval")
    return Path(spec.submodule_search_locations[0]) / "tasks"


def template_text(name: str) -> str:
    """A task template shipped as package data in linbench/suites/tasks/."""
    return resources.files("linbench.suites.tasks").joinpath(name).read_text()


def write_task_dir(directory: Path, template_name: str, template: str,
                   tasks: list[dict[str, Any]]) -> Path:
    """Write `template` as `template_name` and one `<task>.yaml` per config dict.

    Each task dict should carry `include: template_name` to inherit the template. The
    template name must not end in .yaml so that lm-eval does not index it as a task.
    """
    return write_tasks(directory, {template_name: template}, tasks)


def write_tasks(directory: Path, templates: dict[str, str],
                tasks: list[dict[str, Any]]) -> Path:
    """write_task_dir with several templates: {file name: text}, each task dict
    naming the one it inherits with `include:`."""
    import yaml
    for name in templates:
        assert not name.endswith(".yaml"), name
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.yaml"):  # a stale task from an earlier run must not load
        old.unlink()
    for name, text in templates.items():
        (directory / name).write_text(text)
    for cfg in tasks:
        text = yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=10_000)
        (directory / f"{cfg['task']}.yaml").write_text(text)
    return directory


def read_arrow(path: Path):
    """A datasets `save_to_disk` shard (an Arrow IPC stream) as a pyarrow Table."""
    import pyarrow as pa
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()


def write_arrow(table, path: Path) -> Path:
    """Write a Table as an Arrow IPC stream (schema and its HF metadata untouched), the
    format lm-eval's `dataset_path: arrow` loads."""
    import pyarrow as pa
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    return path


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """No Hub access for the duration: environment and the already-imported flags.

    datasets and huggingface_hub read HF_*_OFFLINE once at import time, so setting the
    environment alone is not enough once they are imported; both are restored after.
    """
    import datasets.config
    import huggingface_hub.constants as hub_constants
    saved_env = {k: os.environ.get(k) for k in OFFLINE_ENV}
    saved = [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
             (hub_constants, "HF_HUB_OFFLINE")]
    saved = [(mod, attr, getattr(mod, attr)) for mod, attr in saved if hasattr(mod, attr)]
    try:
        for k in OFFLINE_ENV:
            os.environ[k] = "1"
        for mod, attr, _ in saved:
            setattr(mod, attr, True)
        yield
    finally:
        for mod, attr, value in saved:
            setattr(mod, attr, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the minor bars: datasets' "Generating split" and lm-eval's "Building
    contexts" (one per task, 57 for MMLU). The one bar kept is HFLM's request bar,
    governed by make_lm(progress=...).

    The "Building contexts" bar (lm_eval.api.task) has no switch, so that module's
    `tqdm` name is swapped for a disabled one for the duration of the run.
    """
    import datasets
    import lm_eval.api.task as task_module
    was_enabled = datasets.is_progress_bar_enabled()
    original = task_module.tqdm
    datasets.disable_progress_bars()
    task_module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        task_module.tqdm = original
        if was_enabled:
            datasets.enable_progress_bars()


def make_lm(model, tokenizer, batch_size: int, progress: bool = True, prefix_reuse: bool = True):
    """An lm-eval HFLM around an already-built model object and tokenizer object.

    progress: show HFLM's "Running loglikelihood requests" bar (one bar for the run).
    prefix_reuse: compute each prompt prefix shared by several requests once and continue
    every request from a copy of its cache (suites/prefix.py); False: HFLM's own path.
    Under torch.distributed (N > 1 ranks) either path runs only this rank's share of the
    model calls and gathers the rest: every rank gets the one-process answers.

    HFLM calls `model.eval()` and `model.tie_weights()`, and gives the tokenizer a pad
    token if it has none (SmolLM2's has one).
    """
    from linbench.suites.prefix import PrefixReuseLM
    return PrefixReuseLM(pretrained=model, tokenizer=tokenizer, batch_size=int(batch_size),
                         prefix_reuse=prefix_reuse, progress=progress)


def load_tasks(include_path: Path, names: list[str]) -> dict:
    """Index only `include_path` (not lm-eval's ~10k bundled YAMLs) and build the tasks."""
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=str(include_path), include_defaults=False)
    return manager.load(list(names))


def evaluate_samples(lm, task_dict: dict) -> dict[str, list[dict]]:
    """Run lm-eval and return its logged samples, {task name: [sample, ...]}.

    Each sample holds `doc_id`, `doc`, `target`, `filtered_resps` ([(loglik, is_greedy)]
    per choice for multiple_choice tasks) and the per-sample metric values (e.g. `acc`).
    """
    from lm_eval import evaluator
    out = evaluator.evaluate(lm=lm, task_dict=task_dict, log_samples=True,
                             bootstrap_iters=0, cache_requests=False)
    return out["samples"]


def binomial_metric(values: list[float]) -> Metric:
    """Mean of 0/1 outcomes with stderr sqrt(p(1-p)/(n-1)) (= lm-eval's mean_stderr)."""
    n = len(values)
    if n == 0:
        return Metric(float("nan"), None, 0)
    p = sum(values) / n
    stderr = math.sqrt(p * (1.0 - p) / (n - 1)) if n > 1 else None
    return Metric(p, stderr, n)

@contextlib.contextmanager
def scratch(ctx, name: str) -> Iterator[Path]:
    """A suite's working directory: <ctx.work_dir>/<name>, or a temporary one."""
    if ctx.work_dir:
        root = Path(ctx.work_dir) / name
        root.mkdir(parents=True, exist_ok=True)
        yield root
    else:
        with tempfile.TemporaryDirectory(prefix=f"linbench-{name}-") as tmp:
            yield Path(tmp)


def score(model, tokenizer, ctx, name: str, prepare: Callable) -> tuple[dict, dict]:
    """Write a suite's tasks (`prepare(root, ctx) -> {task: (label, rows)}`), score them
    with lm-eval offline, and return (plan, {task: samples in doc order}), one sample per
    planned row."""
    with scratch(ctx, name) as root, offline(), quiet():
        plan = prepare(root, ctx)
        lm = make_lm(model, tokenizer, ctx.batch_size, progress=ctx.progress,
                     prefix_reuse=getattr(ctx, "prefix_reuse", True))
        samples = evaluate_samples(lm, load_tasks(root / "tasks", list(plan)))
    ordered = {}
    for task, (label, rows) in plan.items():
        ordered[task] = sorted(samples[task], key=lambda s: s["doc_id"])
        if len(ordered[task]) != len(rows):
            raise LinbenchError(f"lm-eval scored {len(ordered[task])} of {len(rows)} {label} docs")
    return plan, ordered


def select_rows(answers: Sequence[int], limit: int | None, seed: int, key: str) -> list[int]:
    """`limit` row indices, stratified by answer, deterministic in (seed, key); sorted.

    Stratified systematic sampling: rows are grouped by answer letter (a seeded shuffle
    within each group), then every (n/limit)-th row is taken from a seeded offset. Each
    letter gets floor or ceil of its proportional share, and every row has the same
    chance limit/n of being chosen. limit None (or >= n) keeps all rows.
    """
    n = len(answers)
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise LinbenchError(f"limit must be a positive number of questions, got {limit}")
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    order: list[int] = []
    for label in sorted(set(answers)):
        rows = [i for i, a in enumerate(answers) if a == label]
        order += [rows[j] for j in rng.permutation(len(rows))]
    step = n / limit
    start = rng.uniform(0.0, step)
    return sorted(order[min(int(start + k * step), n - 1)] for k in range(limit))
