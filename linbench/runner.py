"""`linbench run`: for each method, linearize -> recover -> run each suite -> store records.

Knows no method or suite by name: everything arrives through the registries. Finished
records are reused, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import os
import time
import traceback
import uuid
from dataclasses import dataclass, field

from linbench import models, provenance, registry
from linbench.overrides import label
from linbench.results import Store
from linbench.suites.base import RunContext

STATE_SEQLEN = 2048  # the context length at which records report state size


@dataclass
class RunPlan:
    model: str
    methods: list[str]
    suites: list[str]
    ctx: RunContext
    results_dir: str
    revision: str | None = None
    force: bool = False
    budget: str = "cpu"               # recovery budget (linbench.budget.parse)
    data: str = "sharegpt"            # recovery corpus (linbench.corpus.Corpus source)
    checkpoints: str | None = None    # recovered-model cache; default <cache>/checkpoints
    overrides: dict = field(default_factory=dict)  # {method: {config field: value}} (--set)


@dataclass
class Job:
    method: str          # the label: the method name, plus [field=value,...] with overrides
    suite: str
    method_obj: object
    suite_obj: object
    config: dict
    key: str
    path: object


def plan_jobs(plan: RunPlan, spec: models.ModelSpec, store: Store) -> list[Job]:
    """Resolve every (method, suite) pair into a job with its config hash and record path."""
    jobs = []
    for method_name in plan.methods:
        chosen = plan.overrides.get(method_name, {})
        method = registry.methods.get(method_name)(**chosen)
        name = label(method_name, chosen)
        recovery = recovery_config(plan, method) if method.needs_recovery() else None
        for suite_name in plan.suites:
            suite = registry.suites.get(suite_name)()
            config = {
                "model": {"name": spec.name, "file_hash": spec.file_hash},
                "method": {"name": method_name, **method.config_dict()},
                "suite": {"name": suite_name, "version": suite.version, **suite.config(plan.ctx)},
                "dtype": plan.ctx.dtype,
            }
            if recovery is not None:  # a different budget or corpus is a different result
                config["recovery"] = recovery
            key = provenance.config_hash(config)
            path = store.path(spec.name, name, suite_name, key)
            jobs.append(Job(name, suite_name, method, suite, config, key, path))
    return jobs


def validate(methods: list[str], suites: list[str]) -> None:
    """Fail fast (before loading anything) on unknown methods or suites."""
    for name in methods:
        registry.methods.check(name)
    for name in suites:
        registry.suites.check(name)


def run(plan: RunPlan, echo=print) -> list[dict]:
    validate(plan.methods, plan.suites)
    spec = models.resolve(plan.model, plan.revision)
    store = Store(plan.results_dir)
    jobs = plan_jobs(plan, spec, store)
    env = provenance.environment(plan.ctx.device)
    out = []
    for method_name in dict.fromkeys(j.method for j in jobs):
        todo, mine = [], [j for j in jobs if j.method == method_name]
        for job in mine:
            done = None if plan.force else store.finished(job.path)
            if done:
                echo(f"[{method_name}/{job.suite}] reusing finished record {job.path}")
                out.append(done)
            else:
                todo.append(job)
        if not todo:
            continue
        method = todo[0].method_obj
        if method.needs_recovery():
            model, tokenizer = _recovered(todo[0], spec, plan, echo)
        else:
            model, tokenizer = models.load(spec, plan.ctx.dtype, plan.ctx.device)
            model = method.linearize(model)
        stages = _stages_of(model)
        for job in todo:
            echo(f"[{method_name}/{job.suite}] running on {spec.name} ({plan.ctx.device}, {plan.ctx.dtype})")
            record = _run_one(job, model, tokenizer, plan, spec, env, stages)
            store.write(job.path, record)
            echo(f"[{method_name}/{job.suite}] {record['status']}: wrote {job.path}")
            out.append(record)
    return out


def _run_one(job: Job, model, tokenizer, plan: RunPlan, spec, env: dict, stages) -> dict:
    t0 = time.time()
    record = {
        "schema_version": provenance.SCHEMA_VERSION,
        "run_id": uuid.uuid4().hex,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **env,
        "model": dataclasses.asdict(spec),
        "method": job.method,
        "suite": job.suite,
        "suite_version": job.suite_obj.version,
        "config": job.config,
        "config_hash": job.key,
        "context": dataclasses.asdict(plan.ctx),
        "dtype": plan.ctx.dtype,
        "seeds": {"suite": plan.ctx.seed,
                  **({"recovery": plan.ctx.seed} if "recovery" in job.config else {})},
        "recovery": stages,
        "state_bytes": {"seqlen": STATE_SEQLEN, "bytes": _state_bytes(job.method_obj, model)},
    }
    try:
        records = job.suite_obj.run(model, tokenizer, plan.ctx)
        metrics, details = {}, {}
        for r in records:
            metrics.update({k: dataclasses.asdict(m) for k, m in r.metrics.items()})
            details.update(r.details)
        status = "ok" if all(r.status == "ok" for r in records) else records[0].status
        record.update(status=status, metrics=metrics, details=details)
    except Exception as e:  # recorded, never a missing row; the CLI exits non-zero
        record.update(status="error", metrics={}, details={},
                      error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    record["seconds"] = round(time.time() - t0, 2)
    return record


_CORPORA: dict = {}


def _stages_of(model) -> list[dict]:
    rec = getattr(model.config, "linbench", None)
    return list(rec.get("recovery", [])) if isinstance(rec, dict) else []


def _corpus(plan: RunPlan, seqlen: int):
    from linbench.corpus import Corpus
    key = (plan.data, seqlen, plan.ctx.seed)
    if key not in _CORPORA:
        _CORPORA[key] = Corpus(plan.data, seqlen=seqlen, seed=plan.ctx.seed)
    return _CORPORA[key]


def recovery_config(plan: RunPlan, method) -> dict:
    """Budget, corpus and seed of a method's recovery: part of every record's hashed config."""
    from linbench import budget as budgets
    b = budgets.parse(plan.budget)
    return {"budget": b.identity(), "data": _corpus(plan, b.seqlen_for(method)).identity(),
            "seed": plan.ctx.seed}


def checkpoint_dir(job: Job, spec, plan: RunPlan):
    """<checkpoints>/<hash of model, method config, recovery config, dtype, code version>."""
    from pathlib import Path

    from linbench import recovery as recovery_mod
    key = provenance.config_hash({"model": spec.file_hash, "method": job.config["method"],
                                  "recovery": job.config["recovery"], "dtype": plan.ctx.dtype,
                                  "code": recovery_mod.code_version()})
    root = Path(plan.checkpoints) if plan.checkpoints else models.cache_root() / "checkpoints"
    return root / key


def _recovered(job: Job, spec, plan: RunPlan, echo):
    """The linearized, recovered model: from the checkpoint cache, or trained and cached."""
    import shutil

    from linbench import budget as budgets
    from linbench import recovery as recovery_mod
    from linbench.methods import io
    ckpt = checkpoint_dir(job, spec, plan)
    final = ckpt / "model"
    if (final / "config.json").exists():
        echo(f"[{job.method}] reusing recovered checkpoint {final}")
        model = recovery_mod.load(final, models.torch_dtype(plan.ctx.dtype), plan.ctx.device)
        return model, models.load_tokenizer(spec)
    method = job.method_obj
    model, tokenizer = models.load(spec, plan.ctx.dtype, plan.ctx.device)
    model = method.linearize(model)
    b = budgets.parse(plan.budget)
    corpus = _corpus(plan, b.seqlen_for(method))
    corpus.tokenizer = tokenizer
    echo(f"[{job.method}] recovering on {plan.data} (budget {b.name}) in {ckpt}")
    with recovery_mod.session(seed=plan.ctx.seed, progress=plan.ctx.progress,
                              checkpoint_dir=ckpt / "work", echo=echo):
        model = method.recover(model, corpus, b)
    tmp = ckpt / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    io.save_pretrained(model, tmp)
    os.replace(tmp, final)
    shutil.rmtree(ckpt / "work", ignore_errors=True)
    return model, tokenizer


def _state_bytes(method, model) -> int | None:
    """Recurrent state (or KV cache) per sequence at STATE_SEQLEN tokens; None if unknown."""
    try:
        return int(method.state_bytes(model, STATE_SEQLEN))
    except NotImplementedError:
        return None
