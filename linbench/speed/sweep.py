"""`linbench speed`: speed and memory of every method over sequence length (suites/README.md, "Speed").

    linbench speed --seqlen 2k..2M [--methods a,b] [--mode fwd,fwdbwd,prefill,decode]

One record per (method, level, mode, shape) in the results store, under
runs/<model or "kernel">/<method>/speed-<config hash>.json, with the provenance of
`linbench run`. A shape that runs out of memory or past the time cap is a record with
status "oom" / "timeout", never a missing row; once a (method, mode) stops at some T,
larger T get the same status without running, and a shape whose time or memory,
extrapolated from the smaller T (and bounded below by its inputs or KV cache), exceeds
the cap or the available memory is recorded without running, so a CPU never swaps.
Finished records are reused (unless force), so an interrupted sweep resumes.

    linbench speed --nproc N ...   (N > 1; kernel modes)

adds, beside the one-process kernel rows, rows of the methods whose mixer LASP-2 covers
measured over N processes (linbench.speed.parallel), with nproc in their shape and details.

Model-level rows (prefill, decode) of each method are measured in a fresh process of
their own (linbench.speed.isolate; `--same-process`: in this one).

This module imports no torch at import time (the CLI parses --seqlen with it).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

from linbench.records import schema
from linbench.units import fmt_len, fmt_ms as _ms, fmt_rate as _si
from linbench.units import parse_lengths as parse_seqlens  # noqa: F401  (the CLI's --seqlen)

SUITE = "speed"
SUITE_VERSION = "1"
MODES = ("fwd", "fwdbwd", "prefill", "decode")
_ALIASES = {"fwd+bwd": "fwdbwd", "fwd_bwd": "fwdbwd"}


def parse_modes(text: str) -> list[str]:
    modes = [_ALIASES.get(m.strip(), m.strip()) for m in text.split(",")]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"unknown mode {(bad or [text])[0]!r} (choose from: {', '.join(MODES)})")
    return list(dict.fromkeys(modes))


@dataclass
class SpeedConfig:
    seqlens: list[int]
    methods: list[str]               # registered methods and/or "fla:<op>" peers
    modes: list[str]
    batch: int = 1
    heads: int = 8
    dim: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    backend: str = "auto"
    time_cap: float = 60.0           # seconds per shape
    model: str = "smollm2-135m"
    results_dir: str = "results"
    force: bool = False
    mem_limit: int | None = None     # bytes a shape may use (default: what the OS reports)
    target_s: float = 1.0            # length of each timed loop
    max_reps: int = 50
    prefill_chunk: int = 4096        # model level: tokens per chunk of a prefill
    nproc: int = 1                   # > 1: also LASP-2 kernel rows over nproc processes
    isolate: bool = True             # model level: each method in a fresh process (speed.isolate)


def _reusable(record: dict | None, cfg: SpeedConfig) -> dict | None:
    if not record or cfg.force:
        return None
    if record.get("status") == "ok":
        return record
    if record.get("status") == "timeout" and \
            record.get("details", {}).get("time_cap_s", -1) >= cfg.time_cap:
        return record
    return None


@dataclass
class ModelSource:
    """The base model of the model-level sweep, loaded only when a shape must run."""
    info: dict        # recorded as record["model"]; its name and file_hash are hashed
    load: Callable    # () -> a fresh model on the device, in the dtype of the sweep


def default_model_source(cfg: SpeedConfig) -> ModelSource:
    from linbench.assets import models
    spec = models.resolve(cfg.model)
    return ModelSource(dataclasses.asdict(spec),
                       lambda: models.load(spec, cfg.dtype, cfg.device)[0])


class Marker:
    """`<record>.running` while a shape is measured in this process; a process killed there
    (SIGKILL: the OS out-of-memory killer, or kill -9: nothing Python can catch) leaves it
    behind, so the next sweep records that shape as "oom" instead of running it again and
    being killed again (a resumed sweep would otherwise never get past it). `--force`
    measures it again."""

    def __init__(self, record_path):
        from pathlib import Path
        self.path = Path(str(record_path) + ".running")

    def dead_run(self) -> str | None:
        """Why the shape is not run again: the note of its "oom" row, or None."""
        import json
        import os
        try:
            info = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        pid = info.get("pid")
        if info.get("host") == os.uname().nodename and isinstance(pid, int) and _alive(pid):
            return None  # still running (another sweep measures it now)
        return (f"an earlier run (pid {pid}, started {info.get('started')}) was killed "
                f"while measuring this shape, most likely by the OS for lack of memory; not "
                f"run again (--force runs it)")

    def start(self) -> None:
        import json
        import os
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                         "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                  time.gmtime())}))

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    import os
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()  # our own pid: a leftover of an earlier process with it


def _seed_from_store(guard, T_first: int, load) -> None:
    """Give `guard` the measured (ok) records of the two largest powers of two below
    T_first (from 1K) when the sweep itself has nothing below it: earlier measurements of
    this machine predict better than the probes, and `--force`, which re-measures the
    sweep's own lengths, must not let 4K/8K probes predict away a shape that was measured
    (it did: liger fwd at 1M, measured ok at 10.5 GiB, re-predicted oom at 33 GiB)."""
    if any(t < T_first for t, _, _ in guard.points):
        return
    found = []
    for t in (1 << k for k in range(10, T_first.bit_length())):
        rec = load(t) if t < T_first else None
        if rec and rec.get("status") == "ok":
            found.append((t, rec["details"]))
    for t, d in found[-2:]:
        guard.observe(t, "ok", d.get("cost_s"), d.get("peak_mem_bytes"))


def _warm_up(target, mode: str, T: int) -> None:
    """Pay one-time costs (imports, kernel compilation, allocator) before the first shape."""
    try:
        run, _ = target.prepare(mode, T)
        run()
    except Exception:  # noqa: BLE001 - the real shapes record their own failures
        pass


class _Sweep:
    def __init__(self, cfg: SpeedConfig, echo):
        import torch

        from linbench.records import provenance
        from linbench.records.store import Store
        self.cfg, self.echo, self.provenance = cfg, echo, provenance
        self.dtype = getattr(torch, cfg.dtype)
        self.env = provenance.environment(cfg.device)
        self.store = Store(cfg.results_dir)
        self.out: list[dict] = []

    def rows(self, name, level, method_cfg, modes, build, shape, model_hashed=None,
             model_record=None, role=None, measure=None):
        """Every (mode, T) of one target: reuse, predict or measure, and store each row.
        measure: run_shape's stand-in (linbench.speed.parallel.run_parallel_shape for the
        --nproc rows, which warm up in their own processes)."""
        from linbench.speed.timing import Guard, probe, run_shape
        cfg, env = self.cfg, self.env
        tag = f" nproc={shape['nproc']}" if shape.get("nproc", 1) > 1 else ""
        guards = {m: Guard() for m in modes}
        target = None
        for mode in modes:
            # a decode row no longer pays a prefill of T (speed.targets.decode_cache)
            cheaper = guards.get({"fwdbwd": "fwd"}.get(mode))
            warm = False

            def where(T):  # the record of length T: (config, key, path)
                config = {"suite": {"name": SUITE, "version": SUITE_VERSION}, "level": level,
                          "mode": mode, "seqlen": T, **shape, "dtype": cfg.dtype,
                          "device": env["device"], "backend": cfg.backend,
                          "method": method_cfg, "model": model_hashed}
                key = self.provenance.config_hash(config)
                return config, key, self.store.path(
                    model_hashed["name"] if model_hashed else "kernel", name, SUITE, key)

            for T in cfg.seqlens:
                config, key, path = where(T)
                rec = _reusable(self.store.load(path), cfg)
                if rec is not None:
                    d = rec["details"]
                    guards[mode].observe(T, rec["status"], d.get("cost_s"),
                                         d.get("peak_mem_bytes"))
                    self.echo(f"[speed] {name}{tag} {mode} T={fmt_len(T)}: reusing {rec['status']} "
                              f"record {path}")
                    self.out.append(rec)
                    continue
                target = target or build()
                if not warm and measure is None:
                    _warm_up(target, mode, min(256, *cfg.seqlens))
                    warm = True
                    _seed_from_store(guards[mode], T, lambda t: self.store.load(where(t)[2]))
                    probed = probe(target, mode, T, guards[mode], cfg.device, cfg.time_cap)
                    if probed:
                        self.echo(f"[speed] {name}{tag} {mode}: probed {', '.join(probed)} "
                                  f"(not recorded) to predict T={fmt_len(T)} and up")
                t0 = time.time()
                if measure is None:  # --nproc rows run in child processes: nothing to mark
                    marker = Marker(path)
                    killed = None if cfg.force else marker.dead_run()
                    if not killed:
                        marker.start()
                    try:
                        status, metrics, details = run_shape(
                            target, mode, T, cfg, self.dtype, env["device"], guards[mode],
                            cheaper, killed=killed)
                    except BaseException:  # Ctrl-C and the like: not a kill, no oom row
                        marker.clear()
                        raise
                else:
                    marker = None
                    status, metrics, details = measure(
                        target, mode, T, cfg, self.dtype, env["device"], guards[mode], cheaper)
                rec = schema.build(
                    env=env, model=model_record or {"name": "kernel"}, method=name,
                    suite=SUITE, suite_version=SUITE_VERSION, config=config, config_hash=key,
                    dtype=cfg.dtype, seeds={"inputs": 0},
                    context={k: getattr(cfg, k) for k in
                             ("time_cap", "target_s", "max_reps", "mem_limit")},
                    recovery=[], state_bytes={"seqlen": T, "bytes": details["state_bytes"]},
                    status=status, metrics=metrics, details=details,
                    seconds=round(time.time() - t0, 3), method_role=role)
                self.store.write(path, rec)
                if marker is not None:
                    marker.clear()
                self.out.append(rec)
                if metrics:
                    msg = f"{_ms(metrics['ms']['value'])}, " \
                          f"{_si(metrics['tokens_per_s']['value'])} tok/s"
                else:
                    msg = details.get("note", "")
                self.echo(f"[speed] {name}{tag} {mode} T={fmt_len(T)}: {status} {msg}")


def estimate_seconds(history: list[dict], shapes: list[tuple], cap_s: float,
                     default_s: float = 5.0) -> tuple[float, str]:
    """(seconds, basis) for `shapes`, each (method, level, mode, dtype, device, T), from
    earlier ok speed records: a record of the same method, level, mode, dtype and device
    at that T gives its own seconds; at another T its seconds are extrapolated as a power
    of T through the nearest two (exponent 1 to 2: linbench.speed.timing's guard); a shape
    with no such record gets the median of all records (or `default_s` without any). Each
    shape counts at most the time cap."""
    import statistics

    from linbench.speed.timing import _extrapolate
    points: dict[tuple, list[tuple[int, float]]] = {}
    for r in history:
        c = r.get("config") or {}
        key = (r.get("method"), c.get("level"), c.get("mode"), c.get("dtype"), r.get("device"))
        points.setdefault(key, []).append((c.get("seqlen"), r["seconds"]))
    median = statistics.median(r["seconds"] for r in history) if history else default_s
    total, matched = 0.0, 0
    for *key, T in shapes:
        pts = [p for p in points.get(tuple(key), []) if isinstance(p[0], int)]
        exact = [sec for t, sec in pts if t == T]
        if exact:
            est = statistics.median(exact)
        elif pts:
            below = [p for p in pts if p[0] < T]
            est = _extrapolate(below or pts, T)
        else:
            est = None
        matched += est is not None
        total += min(cap_s, est if est is not None else median)
    basis = (f"{matched} of {len(shapes)} shapes from earlier records of the same method "
             f"and mode on this device, the rest at the median of {len(history)} records"
             if history else "rough default: 3 timed loops + 1 s per shape, no earlier records")
    return total, basis


def _announce(cfg: SpeedConfig, run, kernel_modes, model_modes, peers, echo,
              n_parallel: int = 0) -> dict:
    """Print the number of shapes and a time estimate before any runs
    (`estimate_seconds`; upper bound: every shape at the time cap)."""
    n_model = len([n for n in cfg.methods if n not in peers])
    shapes = len(cfg.seqlens) * ((len(cfg.methods) + n_parallel) * len(kernel_modes)
                                 + n_model * len(model_modes))
    history = [r for r in run.store.scan()[0] if r.get("suite") == SUITE
               and r.get("device") == run.env["device"] and r.get("status") == "ok"
               and isinstance(r.get("seconds"), (int, float))]
    each = [(m, "kernel", mode, cfg.dtype, run.env["device"], T) for m in cfg.methods
            for mode in kernel_modes for T in cfg.seqlens]
    each += [(m, "model", mode, cfg.dtype, run.env["device"], T) for m in cfg.methods
             if m not in peers for mode in model_modes for T in cfg.seqlens]
    est, basis = estimate_seconds(history, each, cfg.time_cap, 3 * cfg.target_s + 1)
    est += n_parallel * len(kernel_modes) * len(cfg.seqlens) * (3 * cfg.target_s + 5)
    fmt = lambda s: f"{s:.0f} s" if s < 90 else (f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h")  # noqa: E731
    par = f" + {n_parallel} x {len(kernel_modes)} over {cfg.nproc} processes" if n_parallel else ""
    echo(f"[speed] plan: {shapes} shapes ({len(cfg.methods)} methods x {len(kernel_modes)} kernel "
         f"modes{par} + {n_model} x {len(model_modes)} model modes, x {len(cfg.seqlens)} lengths "
         f"{fmt_len(cfg.seqlens[0])}..{fmt_len(cfg.seqlens[-1])}); estimate ~{fmt(est)} ({basis}; "
         f"finished shapes are reused, so a resumed sweep takes less), at most "
         f"{fmt(shapes * cfg.time_cap)} at --time-cap {cfg.time_cap:g} s per shape")
    return {"shapes": shapes, "seconds": est}


def sweep(cfg: SpeedConfig, echo=print, model: ModelSource | None = None) -> list[dict]:
    """Run (or reuse) every shape; returns the records in sweep order."""
    from linbench import registry
    from linbench.speed.peers import FLA_PEERS
    from linbench.speed.targets import fla_target, method_kernel_target
    from linbench.records.store import writable_dir
    writable_dir(cfg.results_dir, "--results")  # before any shape runs
    run = _Sweep(cfg, echo)
    kernel_modes = [m for m in cfg.modes if m in ("fwd", "fwdbwd")]
    model_modes = [m for m in cfg.modes if m in ("prefill", "decode")]
    parallel = []  # (name, target) of the --nproc rows
    if kernel_modes and cfg.nproc > 1:
        from linbench.speed.parallel import parallel_target
        for name in cfg.methods:
            target, what = (None, "an fla peer") if name in FLA_PEERS else \
                parallel_target(name, cfg, run.dtype)
            if target is None:
                echo(f"[speed] {name}: nproc={cfg.nproc} rows skipped: LASP-2 does not cover "
                     f"{what}")
            else:
                echo(f"[speed] {name}: nproc={cfg.nproc} rows through LASP-2 {what}")
                parallel.append((name, target))
    _announce(cfg, run, kernel_modes, model_modes, FLA_PEERS, echo, len(parallel))
    shape = {"batch": cfg.batch, "heads": cfg.heads, "dim": cfg.dim}
    for name in cfg.methods if kernel_modes else []:
        if name in FLA_PEERS:
            target = fla_target(name, cfg.batch, cfg.heads, cfg.dim, run.dtype, cfg.device)
        else:
            target = method_kernel_target(name, cfg.batch, cfg.heads, cfg.dim, run.dtype,
                                          cfg.device, cfg.backend)
        if target is None:
            echo(f"[speed] {name}: the method has no kernel-level mixer; kernel modes skipped")
            continue
        role = "peer" if name in FLA_PEERS else registry.methods.get(name).role
        run.rows(name, "kernel", target.config, kernel_modes, lambda t=target: t, shape,
                 role=role)
    if parallel:
        from linbench.speed.parallel import run_parallel_shape
        for name, target in parallel:
            run.rows(name, "kernel", target.config, kernel_modes, lambda t=target: t,
                     {**shape, "nproc": cfg.nproc}, role=registry.methods.get(name).role,
                     measure=run_parallel_shape)

    if model_modes:  # each method in a fresh process unless cfg.isolate is off
        from linbench.speed.isolate import model_rows
        source = model or default_model_source(cfg)
        for name in [n for n in cfg.methods if n not in FLA_PEERS]:
            model_rows(run, name, source, model, cfg.isolate, default_model_source)
    return run.out
