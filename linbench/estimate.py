"""The plan `linbench run` prints before it starts: recovery steps per method, items per
suite, and an estimate of the total time on this machine from the rates that earlier
records of the same model and device measured (or a stated rough default for recovery).
"""
from __future__ import annotations

import statistics
from pathlib import Path

from linbench.records import provenance
from linbench.records.store import Store
from linbench.units import fmt_duration as _fmt_s

HOUR = 3600.0
# Recovery training tokens/s used when no earlier record measured them: SmolLM2-135M in
# fp32 on an idle 2-core CPU (linbench.recovery.budget, the `cpu` preset's comment).
DEFAULT_CPU_TOKENS_PER_S = {"transfer": 490.0, "distill": 200.0, "lora": 300.0}


def _items(job, ctx, history: list[dict]) -> tuple[int | None, str]:
    """Items a suite will score: its own count (suite.items(ctx)) or, failing that, the n
    of an earlier record of the same suite configuration."""
    count = getattr(job.suite_obj, "items", None)
    if callable(count):
        try:
            n = count(ctx)
            if n is not None:
                return int(n), "counted"
        except Exception:  # noqa: BLE001 - a count is a courtesy, never a failure
            pass
    same = [_n_of(r) for r in history if r.get("config", {}).get("suite") == job.config["suite"]]
    same = [n for n in same if n]
    return (max(same), "from an earlier record") if same else (None, "unknown")


def _n_of(record: dict) -> int | None:
    ns = [m.get("n") for m in record.get("metrics", {}).values()
          if isinstance(m, dict) and isinstance(m.get("n"), int)]
    return max(ns) if ns else None


def announce(plan, spec, store: Store, jobs: list, echo) -> dict:
    """Print what will run (recovery steps per method, items per suite) and an estimate of
    the time on this machine from the rates measured by earlier records of the same model
    and device (or a stated rough default); returns the numbers (for tests)."""
    from linbench.recovery import budget as budgets
    from linbench.recovery import cache
    history, _ = store.scan()
    device = provenance.device_name(plan.ctx.device)
    history = [r for r in history if r.get("device") == device and r.get("status") == "ok"
               and r.get("model", {}).get("file_hash") == spec.file_hash]
    cpu = not plan.ctx.device.startswith("cuda")
    todo = [j for j in jobs if plan.force or not _is_finished(j.path)]
    b = budgets.parse(plan.budget)
    total, unknown, defaults, lines = 0.0, [], set(), []
    stage_rate = {}  # seconds per training token, by stage, from earlier records' stage dicts
    for name in ("transfer", "distill", "lora"):
        rows = [(s["seconds"], s["tokens"]) for r in history for s in r.get("recovery") or []
                if s.get("stage") == name and s.get("tokens") and s.get("seconds") is not None]
        if rows:
            stage_rate[name] = sum(a for a, _ in rows) / sum(t for _, t in rows)
    for method_name in dict.fromkeys(j.method for j in todo):
        job = next(j for j in todo if j.method == method_name)
        m = job.method_obj
        if not m.needs_recovery():
            lines.append(f"  {method_name}: no recovery")
            continue
        ckpt = cache.checkpoint_dir(plan.checkpoints, spec.file_hash, job.config["method"],
                                    job.config["recovery"], plan.ctx.dtype)
        if (ckpt / "model").exists():
            lines.append(f"  {method_name}: recovered checkpoint cached ({ckpt}), no training")
            continue
        seqlen, parts, secs = b.seqlen_for(m), [], 0.0
        shared = cache.transfer_dir(plan.checkpoints, spec.file_hash, job.config["method"],
                                    job.config["recovery"], plan.ctx.dtype).exists()
        for name in ("transfer", "distill", "lora"):
            steps = b.steps(name, seqlen)
            if not steps or (name in ("transfer", "distill") and not getattr(m.config, name, None)):
                continue
            if name == "transfer" and shared:
                parts.append("transfer shared (trained by an earlier recovery)")
                continue
            parts.append(f"{name} {steps} steps")
            tokens = steps * b.batch_size * seqlen
            if name in stage_rate:
                secs += stage_rate[name] * tokens
            elif cpu:
                secs += tokens / DEFAULT_CPU_TOKENS_PER_S[name]
                defaults.add(name)
            else:
                unknown.append(f"{method_name} {name}")
        total += secs
        lines.append(f"  {method_name}: recovery {' + '.join(parts)} of {b.batch_size} x {seqlen} "
                     f"tokens (budget {b.name})" + (f", ~{_fmt_s(secs)}" if secs else ""))
    for suite_name in dict.fromkeys(j.suite for j in todo):
        mine = [j for j in todo if j.suite == suite_name]
        n, how = _items(mine[0], plan.ctx, history)
        rates = [r["seconds"] / _n_of(r) for r in history
                 if r.get("suite") == suite_name and _n_of(r) and r.get("seconds")]
        rate = statistics.median(rates) if rates else None
        scope = (f"--limit {plan.ctx.limit} per subject/task" if plan.ctx.limit
                 else "no --limit: every item")
        line = (f"  {suite_name}: {n} items ({how}; {scope})" if n is not None
                else f"  {suite_name}: number of items not known before it runs ({scope})")
        est = n * rate if n is not None and rate is not None else None
        if est is not None:
            total += est * len(mine)
            line += (f", ~{_fmt_s(est)} per method at {rate:.2g} s/item "
                     f"({len(rates)} earlier record(s)) x {len(mine)} method(s)")
        else:
            unknown += [f"{j.method}/{suite_name}" for j in mine]
        lines.append(line)
        if cpu and not plan.ctx.limit and (est is None or est > HOUR):
            lines.append(f"  WARNING: {suite_name} without --limit "
                         + (f"takes ~{_fmt_s(est)} per method" if est is not None else
                            f"may take hours ({n} items, no rate measured on this machine yet)"
                            if n is not None else
                            "may take hours (its size is not known in advance)")
                         + " on CPU; pass --limit N (N examples per subject/task) to bound it")
    echo(f"linbench: plan: {len(dict.fromkeys(j.method for j in jobs))} method(s) x "
         f"{len(plan.suites)} suite(s) on {spec.name} ({plan.ctx.device}): {len(todo)} "
         f"record(s) to compute, {len(jobs) - len(todo)} finished (reused)")
    for line in lines:
        echo(line)
    from linbench.assets import data as embedded
    missing = [f"{r['name']} ({r['holds']})" for r in embedded.status() if not r["ok"]]
    if missing and todo:  # which suite reads which wheel is the suite's business
        echo(f"  WARNING: embedded data not installed: {'; '.join(missing)}; a suite that "
             f"reads it fails after the recovery (run `linbench fetch` first)")
    basis = (f"rates from {len(history)} earlier record(s) of this model on this machine"
             if history else "no earlier records of this model on this machine")
    if defaults:
        basis += (f"; recovery {'/'.join(sorted(defaults))} at a rough default rate "
                  f"(SmolLM2-135M on an idle 2-core CPU)")
    if todo:
        if unknown:
            echo(f"  estimate: at least {_fmt_s(total)} ({basis}; not estimated: "
                 f"{', '.join(unknown)})")
        else:
            echo(f"  estimate: ~{_fmt_s(total)} ({basis})")
    return {"seconds": total, "unknown": unknown, "history": len(history)}


def _is_finished(path) -> bool:
    from linbench.records.store import parse
    try:
        rec, _ = parse(Path(path).read_text())
    except OSError:
        return False
    return bool(rec) and rec.get("status") == "ok"
