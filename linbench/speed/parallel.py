"""`linbench speed --nproc N`: kernel-level rows under LASP-2 sequence parallelism.

A method whose mixer has a sequence-parallel form (its `LASP2` op in
linbench.kernels.distributed, LASP-2 arXiv 2502.07563; methods.mixers.sequence_parallel)
gets, beside its one-process rows, rows measured over N processes on this machine:

    LinearMix (lightning: fixed per-head decay; hedgehog: normalizer)  -> linear_attention
    GatedMix  (gla)                                                    -> gated_linear_attention
    HybridWindow (lolcats)                                             -> window_linear_attention

Every other mixer is skipped with one line saying why (the delta rule's state is not a
sum of per-slice states; the window-softmax sums are not mapped).

Each shape is fresh processes from torch's elastic launcher (as
linbench.kernels.distributed.benchmark; gloo on CPU, NCCL on CUDA with one GPU per rank).
Every rank builds the method's mixer with the same seed (same parameters), switches it to
its LASP-2 op (`sequence_parallel`) and runs it on its contiguous slice of T random tokens
(`local_slice`): the one-process row's module, cut by sequence. The call timed is
`prepared_call`'s fwd / fwd + bwd (the one-process rows' definition), between barriers;
the first call is the warm-up and the time-cap check, then a loop of about `target_s`
seconds, every rank agreeing on each call's time (the slowest rank's). Peak memory: each rank's PeakMemory (CUDA allocator
peak, or VmHWM - VmRSS at start on CPU, as the one-process rows), the largest rank's in
`peak_mem_bytes`, all of them in `peak_mem_bytes_per_rank`. A rank that raises writes its
reason and exits; the launcher stops the others and the shape is an "oom" / "error"
record with that reason. The sweep's Guard predicts timeouts and OOMs from the smaller T
as for one-process rows, against 1/N of the available memory per rank on CPU.

Only linbench.speed.sweep imports this module, when --nproc > 1.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time

import torch

SKIP = {  # mixer class name -> why LASP-2 does not cover it
    "DeltaMix": "the delta rule (its state is not a sum of per-slice states: each slice maps "
                "the incoming state through a K x K transition matrix)",
    "GatedDeltaMix": "the gated delta rule (a K x K transition per slice, as DeltaNet)",
    "MixSum": "a sum of mixers with a window-softmax part",
    "WindowSoftmax": "sliding-window softmax",
    "SDPAMixer": "softmax attention",
}


def lasp2_op(mixer) -> tuple[str | None, str]:
    """(op, what runs) for a kernel-level mixer with a sequence-parallel form (its `LASP2`
    op of linbench.kernels.distributed), else (None, why)."""
    inner = getattr(mixer, "mixer", mixer)
    op = getattr(type(inner), "LASP2", None)
    if op is None:
        name = type(inner).__name__
        return None, SKIP.get(name, f"its mixer {name}")
    parts = [f for f, on in (("decay", getattr(inner, "log_decay", None) is not None),
                             ("normalize", getattr(inner, "normalize", False))) if on]
    return op, op + (f" ({', '.join(parts)})" if parts else "")


def coverage(name: str, heads: int, dim: int, backend: str) -> tuple[str | None, str]:
    """lasp2_op of the registered method `name`'s kernel-level mixer."""
    from linbench import registry
    method = registry.methods.get(name)()
    if not callable(getattr(method, "mixer", None)):
        return None, "a method without a kernel-level mixer"
    try:
        mixer = method.mixer(heads, dim, backend=backend)
    except NotImplementedError:
        return None, "a method without a kernel-level mixer"
    except Exception as err:  # noqa: BLE001 - e.g. a backend the method lacks
        return None, f"a mixer that cannot be built ({type(err).__name__}: {err})"
    return lasp2_op(mixer)


def parallel_target(name: str, cfg, dtype):
    """(Target, what runs) of method `name` under LASP-2 over cfg.nproc ranks, or (None, why
    it is not covered). The target's config and state bytes are the one-process target's;
    min_bytes is one rank's inputs."""
    import dataclasses

    from linbench.speed.targets import method_kernel_target
    op, what = coverage(name, cfg.heads, cfg.dim, cfg.backend)
    if op is None:
        return None, what
    t = method_kernel_target(name, cfg.batch, cfg.heads, cfg.dim, dtype, cfg.device, cfg.backend)
    elem = torch.empty((), dtype=dtype).element_size()
    N, B, H, Dh = cfg.nproc, cfg.batch, cfg.heads, cfg.dim
    return dataclasses.replace(
        t, info={"lasp2_op": op}, prepare=None,
        min_bytes=lambda mode, T: (4 if mode == "fwd" else 8) * B * -(-T // N) * H * Dh * elem), what


# --------------------------------------------------------------------------- the ranks

def _agreed(x: float, dev) -> float:
    """The largest x over the ranks (every rank gets the same number)."""
    import torch.distributed as dist
    t = torch.tensor([x], dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _rank(spec: dict) -> dict:
    """One rank of a launched group: measure spec's shape; returns this rank's result."""
    import datetime

    import torch.distributed as dist

    from linbench import registry
    from linbench.kernels.distributed import local_slice
    from linbench.methods.mixers import sequence_parallel
    from linbench.speed.timing import PeakMemory, prepared_call, quantile
    rank = int(os.environ.get("RANK", "0"))
    try:
        torch.set_num_threads(spec["threads"])
        cuda = spec["device"].startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dev = torch.device(f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=spec["timeout_s"]))
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        B, H, Dh, T = spec["batch"], spec["heads"], spec["dim"], spec["seqlen"]
        dtype = getattr(torch, spec["dtype"])
        torch.manual_seed(0)  # the same parameters on every rank
        mixer = registry.methods.get(spec["method"])().mixer(H, Dh, backend=spec["backend"])
        mixer = mixer.to(device=dev, dtype=dtype)
        sequence_parallel(mixer)  # its LASP-2 op over the default process group
        params = [p for p in mixer.parameters() if p.requires_grad]
        sl = local_slice(T)
        n = sl.stop - sl.start
        torch.manual_seed(1 + rank)
        grad = spec["mode"] == "fwdbwd"
        fn = mixer  # (q, k, v) slices -> this rank's output slice
        # one-time costs (the group's first collectives, kernel set-up) outside the peak
        warm = [torch.randn(B, min(n, 64), H, Dh, dtype=dtype, device=dev).requires_grad_(grad)
                for _ in range(3)]
        prepared_call(fn, warm, params if grad else [], spec["mode"])()
        warm = None
        with PeakMemory(dev) as mem:
            x = [torch.randn(B, n, H, Dh, dtype=dtype, device=dev).requires_grad_(grad)
                 for _ in range(3)]  # this rank's slice of q, k, v
            run = prepared_call(fn, x, params if grad else [], spec["mode"])

            def once():
                dist.barrier()
                sync()
                t0 = time.perf_counter()
                run()
                sync()
                dist.barrier()
                return _agreed(time.perf_counter() - t0, dev)

            first = once()
            times, status = [first], "timeout"
            if first <= spec["time_cap"]:
                status, times = "ok", []
                if first < 0.05:  # short calls: a little more warm-up, as measure()
                    for _ in range(min(10, int(min(0.2, spec["target_s"]) / max(first, 1e-6)))):
                        once()
                reps = max(3, min(spec["max_reps"], math.ceil(spec["target_s"] / max(first, 1e-9))))
                spent = 0.0
                for _ in range(reps):
                    times.append(once())
                    spent += times[-1]
                    if spent > spec["time_cap"]:
                        break
            run = x = None
        ms = [t * 1e3 for t in times]
        dist.destroy_process_group()
        return {"rank": rank, "status": status, "reps": len(times), "peak": mem.bytes,
                "ms": [quantile(ms, p) for p in (0.5, 0.2, 0.8)], "slice": n,
                "threads": torch.get_num_threads()}
    except BaseException as err:  # noqa: BLE001 - the reason goes to the parent, then exit
        note = _rank_note(rank, err)
        try:
            with open(os.path.join(spec["notes"], f"rank{rank}.json"), "w") as f:
                json.dump(note, f)
        finally:
            os._exit(3)  # the launcher stops the other ranks (they may wait in a collective)


def _rank_note(rank: int, err: BaseException) -> dict:
    """What a failing rank tells the parent. SignalException: the launcher stopping this
    rank (another rank failed first, or the run was interrupted): a consequence, recorded
    as "stopped", never as the cause."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from linbench.speed.timing import is_oom
    line = (str(err).splitlines() or [""])[0][:200]
    status = ("stopped" if isinstance(err, SignalException)
              else "oom" if is_oom(err) else "error")
    return {"rank": rank, "status": status, "note": f"rank {rank}: {type(err).__name__}: {line}"}


def _launch(nproc: int, spec: dict) -> list[dict]:
    """Run _rank(spec) on nproc fresh processes (torch's elastic launcher, the settings of
    linbench.kernels.distributed.benchmark); the ranks' results in rank order."""
    import logging

    from torch.distributed.launcher.api import elastic_launch

    from linbench.kernels.distributed import local_launch_config
    cfg = local_launch_config(nproc)
    log = logging.getLogger("torch.distributed.elastic")
    level = log.level
    log.setLevel(logging.CRITICAL)  # a failed rank is reported in its record, not as a traceback
    try:
        res = elastic_launch(cfg, _rank)(spec)
    finally:
        log.setLevel(level)
    return [res[r] for r in sorted(res)]


def _failure(err: BaseException, notes_dir: str) -> tuple[str, str]:
    """(status, note) of a launch that failed: the ranks' own reasons when they wrote one,
    else the exit codes the launcher saw (SIGKILL: the OOM killer, most likely). Ranks the
    launcher stopped because another one failed (SignalException) are named, not blamed."""
    notes = []
    for f in sorted(os.listdir(notes_dir)):
        try:
            with open(os.path.join(notes_dir, f)) as fh:
                notes.append(json.load(fh))
        except (OSError, ValueError):
            pass
    causes = [n for n in notes if n.get("status") != "stopped"]
    stopped = "; ".join(n.get("note", "") for n in notes if n.get("status") == "stopped")
    after = f"; stopped by the launcher: {stopped}" if stopped else ""
    if causes:
        status = "oom" if any(n.get("status") == "oom" for n in causes) else "error"
        return status, "; ".join(n.get("note", "") for n in causes)
    failures = getattr(err, "failures", None) or {}
    if failures:
        parts, killed = [], False
        for r, f in sorted(failures.items()):
            code = getattr(f, "exitcode", None)
            sig = f.signal_name() if code is not None and code < 0 else None
            killed |= sig == "SIGKILL"
            parts.append(f"rank {r} exit code {code}" + (f" ({sig})" if sig else ""))
        why = ", ".join(parts) + (": killed, most likely by the OOM killer" if killed else "")
        return ("oom" if killed else "error"), why + after
    line = (str(err).splitlines() or [""])[0][:200]
    status = "oom" if "out of memory" in line.lower() else "error"
    return status, f"{type(err).__name__}: {line}" + after


# --------------------------------------------------------------------------- the parent

def run_parallel_shape(target, mode, T, cfg, dtype, device_name, guard, cheaper=None,
                       launch=_launch):
    """Measure one (method, mode, T) shape over cfg.nproc processes -> (status, metrics,
    details), like linbench.speed.timing.run_shape; never raises."""
    from linbench.speed.timing import available_bytes, shape_details, skipped
    N = cfg.nproc
    cuda = cfg.device.startswith("cuda")
    details = shape_details("kernel", mode, T, cfg.batch, cfg.heads, cfg.dim, cfg, device_name,
                            target.state_bytes(T), cuda, nproc=N, sequence_parallel="LASP-2",
                            lasp2_op=target.info["lasp2_op"], peak_mem_bytes_per_rank=None)
    details["peak_mem_source"] = "largest rank's " + details["peak_mem_source"]
    avail = cfg.mem_limit or available_bytes(cfg.device)
    budget = avail if cuda else avail // N  # per rank
    skip = skipped(guard, T, cfg, budget, target.min_bytes(mode, T), cheaper, details)
    if skip:
        return skip
    with tempfile.TemporaryDirectory(prefix="linbench-lasp2-") as notes:
        spec = {"method": target.name, "op": target.info["lasp2_op"], "mode": mode,
                "seqlen": T, "batch": cfg.batch, "heads": cfg.heads, "dim": cfg.dim,
                "dtype": cfg.dtype, "device": cfg.device, "backend": cfg.backend,
                "threads": torch.get_num_threads(), "time_cap": cfg.time_cap,
                "target_s": cfg.target_s, "max_reps": cfg.max_reps, "notes": notes,
                "timeout_s": max(300.0, 4 * cfg.time_cap)}
        t0 = time.perf_counter()
        try:
            ranks = launch(N, spec)
        except Exception as err:  # noqa: BLE001 - every failure becomes a record
            from torch.distributed.elastic.multiprocessing.api import SignalException
            if isinstance(err, SignalException):  # this process was signalled (SIGTERM)
                raise KeyboardInterrupt(str(err)) from err  # an interruption, not a result
            status, details["note"] = _failure(err, notes)
            guard.observe(T, status, None, None)
            return status, {}, details
    details["setup_s"] = round(time.perf_counter() - t0, 3)  # the whole launch, for the record
    r0 = ranks[0]
    peaks = [r.get("peak") for r in ranks]
    peak = max(peaks) if all(p is not None for p in peaks) else None
    ms, reps, status = r0["ms"], r0["reps"], r0["status"]
    details.update(peak_mem_bytes=peak, peak_mem_bytes_per_rank=peaks,
                   slice_tokens=[r.get("slice") for r in ranks], cost_s=round(ms[0] / 1e3, 6),
                   threads=r0.get("threads", details["threads"]))
    guard.observe(T, status, ms[0] / 1e3, peak)
    if status != "ok":
        details["note"] = f"first call {ms[0] / 1e3:.3g} s > cap {cfg.time_cap:g} s"
        return status, {}, details
    details.update(ms_q20=ms[1], ms_q80=ms[2])
    tokens = cfg.batch * T
    metrics = {"ms": {"value": ms[0], "stderr": None, "n": reps},
               "tokens_per_s": {"value": tokens / (ms[0] / 1e3), "stderr": None, "n": reps}}
    return status, metrics, details
