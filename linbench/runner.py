"""`linbench run`: for each method, linearize -> recover -> run each suite -> store records.

Knows no method or suite by name: everything arrives through the registries. Finished
records are reused, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import time
import traceback
import uuid
from dataclasses import dataclass

from linbench import models, provenance, registry
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


@dataclass
class Job:
    method: str
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
        method = registry.methods.get(method_name)()
        for suite_name in plan.suites:
            suite = registry.suites.get(suite_name)()
            config = {
                "model": {"name": spec.name, "file_hash": spec.file_hash},
                "method": {"name": method_name, **method.config_dict()},
                "suite": {"name": suite_name, "version": suite.version, **suite.config(plan.ctx)},
                "dtype": plan.ctx.dtype,
            }
            key = provenance.config_hash(config)
            path = store.path(spec.name, method_name, suite_name, key)
            jobs.append(Job(method_name, suite_name, method, suite, config, key, path))
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
    for method_name in plan.methods:
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
        model, tokenizer = models.load(spec, plan.ctx.dtype, plan.ctx.device)
        method = todo[0].method_obj
        model = method.linearize(model)
        stages = []
        if method.needs_recovery():
            raise NotImplementedError(f"recovery for {method_name} is not implemented yet")
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
        "seeds": {"suite": plan.ctx.seed},
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


def _state_bytes(method, model) -> int | None:
    """Recurrent state (or KV cache) per sequence at STATE_SEQLEN tokens; None if unknown."""
    try:
        return int(method.state_bytes(model, STATE_SEQLEN))
    except NotImplementedError:
        return None
