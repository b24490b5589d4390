"""`linbench run`: for each method, linearize -> recover -> run each suite -> store records.

Knows no method or suite by name: everything arrives through the registries. Finished
records are reused, so an interrupted run resumes where it stopped.

Before any work: `preflight` checks what can be checked (results and checkpoint
directories writable, model config readable and supported, recovery data present) and
`announce` prints the plan with a time estimate. Each method's records are computed under
their file locks (records.store), its recovery under the checkpoint key's lock
(recovery.cache), so a second identical run waits and then reuses. A recovery that fails
(e.g. a diverging loss) becomes error records for that method's suites, never "ok".

Distributed (torchrun, or `linbench run --nproc N`; linbench.recovery.dist): every rank
runs this same plan. Rank 0 alone takes the locks, decides what is already finished (its
answer is broadcast), and writes records and checkpoints; recovery is data-parallel
(FSDP2), suites that score through suites.base.shared_map split their batches across the
ranks. Any exception on any rank ends the run (no error records: the other ranks would
wait forever in a collective); the launcher stops the others.
"""
from __future__ import annotations

import dataclasses
import time
import traceback
from dataclasses import dataclass, field

from linbench import estimate, registry
from linbench.assets import models
from linbench.errors import LinbenchError
from linbench.records import provenance, schema
from linbench.records.schema import method_label as label
from linbench.records.store import Store, nonfinite, writable_dir
from linbench.recovery import dist
from linbench.recovery.stages import stages_of
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
    budget: str = "cpu"               # recovery budget (linbench.recovery.budget.parse)
    data: str = "sharegpt"            # recovery corpus (linbench.recovery.corpus.Corpus source)
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
    from linbench.recovery import cache
    jobs = []
    for method_name in plan.methods:
        method = configured(plan, method_name)
        name = label(method_name, plan.overrides.get(method_name, {}))
        recovery = (cache.recovery_config(method, plan.budget, plan.data, plan.ctx.seed)
                    if method.needs_recovery() else None)
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


def configured(plan: RunPlan, name: str):
    """The method `name` as this plan runs it (recovery.budget.Budget.configure: its
    defaults, the budget's fields for a recovering method, then the user's --set values)."""
    from linbench.recovery import budget as budgets
    return budgets.parse(plan.budget).configure(registry.methods.get(name),
                                                plan.overrides.get(name, {}))


def validate(methods: list[str], suites: list[str]) -> None:
    """Fail fast (before loading anything) on unknown methods or suites."""
    for name in methods:
        registry.methods.check(name)
    for name in suites:
        registry.suites.check(name)


def preflight(plan: RunPlan) -> tuple:
    """Everything checkable before work starts; (model spec, store, jobs). Raises
    LinbenchError (one line, exit 2) before anything is written to the results."""
    validate(plan.methods, plan.suites)
    writable_dir(plan.results_dir, "--results")
    methods = [configured(plan, m) for m in plan.methods]
    recovering = [m for m in methods if m.needs_recovery()]
    if recovering:
        writable_dir(plan.checkpoints or models.cache_root() / "checkpoints", "--checkpoints")
        from linbench.recovery import cache
        for m in recovering:  # the corpus exists and parses (memoized for plan_jobs)
            cache.recovery_config(m, plan.budget, plan.data, plan.ctx.seed)
    spec = models.resolve(plan.model, plan.revision)
    store = Store(plan.results_dir)
    return spec, store, plan_jobs(plan, spec, store)  # builds each recovery corpus: data present


def run(plan: RunPlan, echo=print) -> list[dict]:
    spec, store, jobs = preflight(plan)
    store.warn = echo
    estimate.announce(plan, spec, store, jobs, echo)
    env = provenance.environment(plan.ctx.device)
    if dist.world().size > 1:  # which parallelism ran: provenance
        env["distributed"] = dist.describe()
    out = []
    for method_name in dict.fromkeys(j.method for j in jobs):
        mine = [j for j in jobs if j.method == method_name]
        todo = []
        for job, done in zip(mine, _finished(plan, store, mine)):
            if done:
                echo(f"[{method_name}/{job.suite}] reusing finished record {job.path}")
                out.append(done)
            else:
                todo.append(job)
        if not todo:
            continue
        locks = _lock_all(store, todo, echo) if dist.is_writer() else []
        try:
            out += _run_method(plan, spec, store, env, todo, echo)
        finally:
            for lk in reversed(locks):
                lk.release()
    return out


def _finished(plan: RunPlan, store: Store, jobs: list) -> list:
    """Each job's finished record or None, as rank 0 sees it (the same on every rank)."""
    done = [None if plan.force else store.finished(j.path) for j in jobs] \
        if dist.is_writer() else None
    return dist.broadcast(done)


def _lock_all(store: Store, jobs: list, echo) -> list:
    """Each job's record lock, in path order (two runs never wait on each other in a cycle)."""
    from filelock import Timeout
    locks = []
    for job in sorted(jobs, key=lambda j: str(j.path)):
        lk = store.lock(job.path)
        try:
            lk.acquire(timeout=0)
        except Timeout:
            echo(f"[{job.method}/{job.suite}] waiting for another linbench process computing "
                 f"{job.path}")
            lk.acquire()
        locks.append(lk)
    return locks


def _run_method(plan: RunPlan, spec, store: Store, env: dict, jobs: list, echo) -> list[dict]:
    out, todo = [], []
    for job, done in zip(jobs, _finished(plan, store, jobs)):  # finished while we waited?
        if done:
            echo(f"[{job.method}/{job.suite}] reusing finished record {job.path} "
                 f"(written by another process)")
            out.append(done)
        else:
            todo.append(job)
    if not todo:
        return out
    method = todo[0].method_obj
    try:
        if method.needs_recovery():
            model, tokenizer = _recovered(todo[0], spec, plan, echo)
        else:
            model, tokenizer = models.load(spec, plan.ctx.dtype, plan.ctx.device)
            model = method.linearize(model)
    except (LinbenchError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - a failed recovery is an error record per suite
        if dist.world().size > 1:
            raise
        message = f"{type(e).__name__}: {e}"  # printed once per record by the CLI
        for job in todo:
            record = _error_record(job, plan, spec, env, message, traceback.format_exc())
            store.write(job.path, record)
            echo(f"[{job.method}/{job.suite}] error: wrote {job.path}")
            out.append(record)
        return out
    stages = stages_of(model)
    for job in todo:
        echo(f"[{job.method}/{job.suite}] running on {spec.name} ({plan.ctx.device}, {plan.ctx.dtype})")
        record = _run_one(job, model, tokenizer, plan, spec, env, stages)
        if dist.is_writer():
            store.write(job.path, record)
        echo(f"[{job.method}/{job.suite}] {record['status']}: wrote {job.path}")
        out.append(record)
    return out


def _error_record(job: Job, plan: RunPlan, spec, env: dict, message: str, tb: str) -> dict:
    seeds = {"suite": plan.ctx.seed, **({"recovery": plan.ctx.seed} if "recovery" in job.config else {})}
    return schema.build(
        env=env, model=dataclasses.asdict(spec), method=job.method, suite=job.suite,
        suite_version=job.suite_obj.version, config=job.config, config_hash=job.key,
        dtype=plan.ctx.dtype, seeds=seeds, context=dataclasses.asdict(plan.ctx), recovery=[],
        state_bytes={"seqlen": STATE_SEQLEN, "bytes": None}, status="error", metrics={},
        details={}, seconds=0.0, method_role=getattr(job.method_obj, "role", "linearized"),
        suite_meta=job.suite_obj.meta() if hasattr(job.suite_obj, "meta") else {},
        error=message, traceback=tb, **_budget(job, plan))


def _budget(job: Job, plan: RunPlan) -> dict:
    """The --budget a recovered method's record was made with, as given (`cpu`, or
    `cpu,lora=147456`): what the report names; the budget's tokens are in its config."""
    return {"budget": plan.budget} if "recovery" in job.config else {}


def _run_one(job: Job, model, tokenizer, plan: RunPlan, spec, env: dict, stages) -> dict:
    t0 = time.time()
    seeds = {"suite": plan.ctx.seed, **({"recovery": plan.ctx.seed} if "recovery" in job.config else {})}
    try:
        records = job.suite_obj.run(model, tokenizer, plan.ctx)
        metrics, details = {}, {}
        for r in records:
            metrics.update({k: dataclasses.asdict(m) for k, m in r.metrics.items()})
            details.update(r.details)
        status = "ok" if all(r.status == "ok" for r in records) else records[0].status
        extra = {}
        bad = nonfinite(metrics)
        if bad:  # a NaN perplexity is a failed measurement, never a result
            status = "error"
            extra = {"error": f"non-finite metric {', '.join(bad)} (the model's outputs are "
                              f"NaN/Inf)"}
    except Exception as e:  # recorded, never a missing row; the CLI exits non-zero
        if dist.world().size > 1:
            raise
        status, metrics, details = "error", {}, {}
        extra = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    return schema.build(
        env=env, model=dataclasses.asdict(spec), method=job.method, suite=job.suite,
        suite_version=job.suite_obj.version, config=job.config, config_hash=job.key,
        dtype=plan.ctx.dtype, seeds=seeds, context=dataclasses.asdict(plan.ctx),
        recovery=stages,
        state_bytes={"seqlen": STATE_SEQLEN, "bytes": _state_bytes(job.method_obj, model)},
        status=status, metrics=metrics, details=details, seconds=round(time.time() - t0, 2),
        method_role=getattr(job.method_obj, "role", "linearized"),
        suite_meta=job.suite_obj.meta() if hasattr(job.suite_obj, "meta") else {}, **extra,
        **_budget(job, plan))


def checkpoint_dir(job: Job, spec, plan: RunPlan):
    from linbench.recovery import cache
    return cache.checkpoint_dir(plan.checkpoints, spec.file_hash, job.config["method"],
                                job.config["recovery"], plan.ctx.dtype)


def _recovered(job: Job, spec, plan: RunPlan, echo):
    from linbench.recovery import cache
    share = cache.transfer_dir(plan.checkpoints, spec.file_hash, job.config["method"],
                               job.config["recovery"], plan.ctx.dtype)
    return cache.recovered(job.method_obj, job.method, spec, checkpoint_dir(job, spec, plan),
                           budget=plan.budget, data=plan.data, seed=plan.ctx.seed,
                           dtype=plan.ctx.dtype, device=plan.ctx.device,
                           progress=plan.ctx.progress, echo=echo, share=share)


def _state_bytes(method, model) -> int | None:
    """Recurrent state (or KV cache) per sequence at STATE_SEQLEN tokens; None if unknown."""
    try:
        return int(method.state_bytes(model, STATE_SEQLEN))
    except NotImplementedError:
        return None
