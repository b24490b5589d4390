"""The one timing loop: how `linbench speed` and the kernel device check
(`python -m linbench.kernels.check`) time a call, measure its peak memory, and (speed) the
Guard that skips shapes predicted to time out or run out of memory.

Timing (suites/README.md, "Speed"): inputs are prepared by the caller outside the timed
region (`prepared_call` builds the fwd / fwd + bwd call); the first call is the warm-up
and the time-cap check; then the median with the 20% / 80% quantiles (linear
interpolation over the repetitions, not their min / max) of a loop on the monotonic
clock (CPU, with torch.cuda.synchronize around each call on a GPU) or of
`triton.testing.do_bench` (GPU, CUDA events, L2 flushed between reps).

Peak memory: CUDA `max_memory_allocated` after `reset_peak_memory_stats`; CPU the process
resident-set high-water mark (VmHWM of /proc/self/status, reset by writing "5" to
/proc/self/clear_refs, Linux >= 4.0) minus the resident set before the shape, after
malloc_trim(0) so that freed heap pages are not silently reused. tracemalloc cannot be
used: torch's CPU allocations bypass Python's allocator.
"""
from __future__ import annotations

import gc
import math
import os
import re
import time

import torch

from linbench.units import fmt_len


def quantile(xs: list[float], p: float) -> float:
    """Linear-interpolation quantile (numpy's default), 0 <= p <= 1."""
    xs = sorted(xs)
    pos = p * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def is_oom(err: BaseException) -> bool:
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    msg = str(err).lower()
    return "out of memory" in msg or "can't allocate memory" in msg


def prepared_call(fn, inputs, params, mode):
    """The zero-argument call timed in `mode`. fwd: fn(*inputs) under no_grad; fwdbwd:
    forward + torch.autograd.grad w.r.t. the inputs and `params` (trainable parameters),
    so no .grad accumulates between reps; the output gradient is built on the first
    (warm-up) call. fn returns the output tensor."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(*inputs)
        return run
    if mode != "fwdbwd":
        raise ValueError(f"unknown mode {mode!r} (fwd or fwdbwd)")
    wrt = [*inputs, *params]
    do = None

    def run_bwd():
        nonlocal do
        o = fn(*inputs)
        if do is None:
            do = torch.randn_like(o)
        torch.autograd.grad(o, wrt, do, allow_unused=True)
    return run_bwd


def _sync(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


# A first call at least this long (and at least target_s) is the measurement itself:
# what a warm-up pays once (allocator growth, first-touch page faults, lazy imports) is
# well under 1% of it, and repeating a 10-minute prefill would double the sweep.
SINGLE_CALL_S = 30.0


def measure(run, device, cap_s, target_s, min_reps, max_reps):
    """Monotonic-clock loop: (times in seconds, "ok" | "timeout") of a zero-argument call.

    The first call is the warm-up and the cap check ("timeout" if it exceeds cap_s); a
    first call of SINGLE_CALL_S or more (and at least target_s) is the one measurement;
    otherwise the loop runs about target_s seconds (min_reps..max_reps calls), stopping at
    the cap.
    """
    sync = _sync(torch.device(device))

    def once():
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        return time.perf_counter() - t0

    first = once()
    if first > cap_s:
        return [first], "timeout"
    if first >= SINGLE_CALL_S and target_s <= first:
        return [first], "ok"  # a long call is its own measurement (n = 1)
    if first < 0.05:  # short calls: a little more warm-up (caches, allocator, threads)
        for _ in range(min(10, int(min(0.2, target_s) / max(first, 1e-6)))):
            once()
    reps = max(min_reps, min(max_reps, math.ceil(target_s / max(first, 1e-9))))
    times, spent = [], 0.0
    for _ in range(reps):
        times.append(once())
        spent += times[-1]
        if spent > cap_s:  # long calls: stop the loop at the cap, keep what was measured
            break
    return times, "ok"


def time_call(run, device, cap_s: float, target_s: float = 1.0, min_reps: int = 3,
              max_reps: int = 50, do_bench: bool = True) -> tuple[list[float], int, str]:
    """([median, q20, q80] in ms, reps, status) of a prepared zero-argument call.

    GPU: one synchronized call checks the cap, then `triton.testing.do_bench` (warm-up and
    rep budgets in ms) unless a call is too slow for it (> target_s / 5) or do_bench is
    False (calls that change state, like decode steps), when the synchronized loop is used.
    CPU: the monotonic-clock loop.
    """
    device = torch.device(device)
    if device.type == "cuda" and do_bench:
        sync = _sync(device)
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        first = time.perf_counter() - t0
        if first > cap_s:
            return [first * 1e3] * 3, 1, "timeout"
        if first < target_s / 5:
            from triton.testing import do_bench
            rep_ms = min(target_s, cap_s) * 1e3
            ms = do_bench(run, warmup=min(25.0, rep_ms / 4), rep=rep_ms,
                          quantiles=[0.5, 0.2, 0.8])
            return list(ms), max(1, int(rep_ms / max(ms[0], 1e-6))), "ok"
    times, status = measure(run, device, cap_s, target_s, min_reps, max_reps)
    ms = [t * 1e3 for t in times]
    return [quantile(ms, p) for p in (0.5, 0.2, 0.8)], len(times), status


def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(m[1]) * 1024 if m else None


def _malloc_trim() -> None:
    """Hand the memory glibc keeps from freed chunks back to the OS (malloc_trim(0)): else a
    shape reuses pages a larger earlier shape left resident and its RSS growth reads ~0."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may be underestimated
        pass


class PeakMemory:
    """Context manager: `.bytes` = peak memory above the level at entry (None if unknown)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.bytes = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current resident set
                self._base = _proc_status("VmRSS")
            except OSError:
                self._base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._base is not None:
            hwm = _proc_status("VmHWM")
            self.bytes = None if hwm is None else max(0, hwm - self._base)
        return False


def available_bytes(device) -> int:
    """Memory a new shape may still use: free GPU memory, or MemAvailable (and the cgroup
    limit, when one is set) on CPU, so a CPU sweep never pushes the machine into swap."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(device)[0]
    avail = []
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.MULTILINE)
        if m:
            avail.append(int(m[1]) * 1024)
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
        if limit != "max":
            avail.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    return min(avail) if avail else (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def _extrapolate(points: list[tuple[int, float]], T: int, lo: float = 1.0) -> float | None:
    """y at T from the last two (T, y) points, y ~ T^p with p fitted and clamped to [lo, 2]."""
    pts = sorted(p for p in points if p[1] and p[1] > 0)
    if not pts:
        return None
    (t1, y1), (t2, y2) = (pts[-2] if len(pts) > 1 else pts[-1]), pts[-1]
    p = math.log(y2 / y1) / math.log(t2 / t1) if t2 > t1 else 1.0
    return y2 * (T / t2) ** min(2.0, max(lo, p))


class Guard:
    """Per (target, mode): predicts from the smaller T what would not fit or finish."""

    def __init__(self):
        self.points: list[tuple[int, float, int | None]] = []  # (T, seconds, peak bytes)
        self.stop: tuple[str, int] | None = None

    def observe(self, T: int, status: str, seconds: float | None, peak: int | None):
        if status == "ok":
            self.points.append((T, seconds, peak))
        elif status in ("timeout", "oom") and self.stop is None:
            self.stop = (status, T)

    def predict(self, T, cap_s, budget, min_bytes, cheaper=None,
                mem_lo: float = 0.0) -> tuple[str, str] | None:
        """mem_lo: the least exponent of memory in T. 0 for model-level modes (a chunked
        prefill or a decode may be flat); 1 at kernel level, where the inputs, outputs and
        gradients grow with T, so a sub-linear fit through small T, whose peaks are mostly
        fixed overhead, cannot promise that a large T fits (it did not: lightning fwdbwd,
        2.9 GB at 128K, fitted 18 GB at 1M, took 22 GB and was killed by the kernel)."""
        for g in (self, cheaper):
            if g is not None and g.stop and T >= g.stop[1]:
                return g.stop[0], f"{g.stop[0]} at T={fmt_len(g.stop[1])} already; not run"
        pts = [p for p in self.points if p[0] < T]
        est_s = _extrapolate([(t, s) for t, s, _ in pts], T)
        if est_s is not None and est_s > cap_s:
            return "timeout", f"estimated {est_s:.3g} s > cap {cap_s:g} s; not run"
        # memory may be flat in T (a chunked prefill, a recurrent decode): exponent >= mem_lo,
        # what must grow (inputs, a KV cache) is in min_bytes
        est_b = max(min_bytes, _extrapolate([(t, b) for t, _, b in pts], T, lo=mem_lo) or 0)
        if budget is not None and est_b > 0.9 * budget:
            return "oom", (f"estimated {est_b / 2**30:.3g} GiB > 90% of {budget / 2**30:.3g} "
                           f"GiB available; not run")
        return None


# Lengths of the unrecorded probe calls that seed a guard with nothing to predict from.
PROBE_LENGTHS = (4096, 8192)
PROBE_CALLS = 2        # per length; the faster is kept
PROBE_STEP = 8         # then longer probes, 8x apart, ...
PROBE_SECONDS = 5.0    # ... while one is predicted to take at most this or 1/20 of the
PROBE_SHARE = 1 / 20   # time cap, whichever is more, and at most a quarter of the memory
PROBE_MEMORY = 0.25    # available, and is at most T_first / 4


def probe(target, mode, T_first, guard, device, time_cap: float = 60.0) -> list[str]:
    """Seed `guard` when a sweep starts high (its first length to run is above 2x the
    largest probe length and no smaller length was measured or reused): untimed-loop
    calls at PROBE_LENGTHS, observed as points (time and peak), so the first real shape
    can already be predicted to time out or run out of memory (a lone `--seqlen 2M` of
    softmax would otherwise run for hours). Then, while the guard predicts the next
    length 8x up to be cheap (PROBE_SECONDS or PROBE_SHARE of the time cap, whichever is
    more; PROBE_MEMORY) and it is at most T_first / 4,
    that length is probed too: at 4K and 8K fixed costs dominate, and a fit from 8K to 2M
    multiplies them by 256 (it once predicted lightning's bf16 fwd at 2M, 9.4 GiB, to need
    42.6 GiB). Each probe calls twice and keeps the faster call (a first call pays one-time
    costs; one call each once predicted that shape to take 1,960 s, not about a minute).
    Returns what was probed, as text; a probe that fails ends the probing (the real shape
    records its own failure)."""
    if T_first <= 2 * max(PROBE_LENGTHS) or any(t < T_first for t, _, _ in guard.points):
        return []
    done, lengths = [], list(PROBE_LENGTHS)
    while lengths:
        Tp = lengths.pop(0)
        try:
            with PeakMemory(device) as mem:
                torch.manual_seed(0)
                run, _ = target.prepare(mode, Tp)
                sync = _sync(torch.device(device))
                seconds = math.inf
                for _ in range(PROBE_CALLS):
                    sync()
                    t0 = time.perf_counter()
                    run()
                    sync()
                    seconds = min(seconds, time.perf_counter() - t0)
                run = None
        except Exception:  # noqa: BLE001
            gc.collect()
            break
        gc.collect()
        guard.observe(Tp, "ok", seconds, mem.bytes)
        done.append(f"T={fmt_len(Tp)} {seconds:.3g} s")
        up = Tp * PROBE_STEP
        if not lengths and up <= T_first // 4 and guard.predict(
                up, max(PROBE_SECONDS, PROBE_SHARE * time_cap),
                PROBE_MEMORY / 0.9 * available_bytes(device), 0) is None:
            lengths.append(up)
    return done


def shape_details(level, mode, T, batch, heads, dim, cfg, device_name, state_bytes,
                  cuda: bool, **extra) -> dict:
    """The details every speed record of one shape starts with (run_shape and
    linbench.speed.parallel fill in the measurements)."""
    return {"level": level, "mode": mode, "seqlen": T, "batch": batch, "heads": heads,
            "dim": dim, "dtype": cfg.dtype, "backend": cfg.backend, "device": device_name,
            "ms_q20": None, "ms_q80": None, "peak_mem_bytes": None, "tflops": None,
            "gbps": None, "pct_peak": None, "pct_peak_bw": None, "state_bytes": state_bytes,
            "time_cap_s": cfg.time_cap, "threads": torch.get_num_threads(), "cost_s": None,
            "setup_s": None,
            "peak_mem_source": ("torch.cuda.max_memory_allocated" if cuda
                                else "process VmHWM - VmRSS at start (/proc/self/status)"),
            **extra, "ran": True, "note": ""}


def skipped(guard, T, cfg, budget, min_bytes, cheaper, details, level="kernel") -> tuple | None:
    """(status, {}, details) without running when `guard` predicts a timeout or running out
    of `budget` bytes; None when the shape should run."""
    details["mem_budget_bytes"] = budget
    predicted = guard.predict(T, cfg.time_cap, budget, min_bytes, cheaper,
                              mem_lo=1.0 if level == "kernel" else 0.0)
    if not predicted:
        return None
    status, details["note"] = predicted
    details["ran"] = False
    guard.observe(T, status, None, None)
    return status, {}, details


def run_shape(target, mode, T, cfg, dtype, device_name, guard, cheaper=None, killed=None):
    """Measure one (target, mode, T) shape -> (status, metrics, details); never raises.

    Skipped without running when `guard` predicts a timeout or OOM (see linbench.speed.sweep),
    or when `killed` says why an earlier process died measuring this very shape (an "oom"
    row with that note: see linbench.speed.sweep.Marker).
    """
    device = torch.device(cfg.device)
    info = target.info
    details = shape_details(target.level, mode, T, info.get("batch", cfg.batch),
                            info.get("heads", cfg.heads), info.get("dim", cfg.dim), cfg,
                            device_name, target.state_bytes(T), device.type == "cuda",
                            **({"layers": info["layers"]} if "layers" in info else {}))
    budget = cfg.mem_limit or available_bytes(device)
    if killed:
        details.update(ran=False, note=killed, mem_budget_bytes=budget)
        guard.observe(T, "oom", None, None)
        return "oom", {}, details
    skip = skipped(guard, T, cfg, budget, target.min_bytes(mode, T), cheaper, details,
                   target.level)
    if skip:
        return skip
    run = None
    try:
        with PeakMemory(device) as mem:
            torch.manual_seed(0)
            t0 = time.perf_counter()
            run, tokens = target.prepare(mode, T)  # inputs (and the decode prefill): untimed
            setup_s = time.perf_counter() - t0
            ms, reps, status = time_call(run, device, cfg.time_cap, cfg.target_s,
                                         max_reps=cfg.max_reps if mode != "decode" else
                                         min(cfg.max_reps, 32), do_bench=mode != "decode")
    except Exception as err:  # noqa: BLE001 - every failure becomes a record
        status = "oom" if is_oom(err) else "error"
        first_line = (str(err).splitlines() or [""])[0][:200]
        details["note"] = f"{type(err).__name__}: {first_line}"
        guard.observe(T, status, None, None)
        return status, {}, details
    finally:
        run = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    setup = getattr(target, "setup", None)
    if callable(setup) and setup(mode, T):
        details["setup"] = setup(mode, T)  # how the inputs were built (model level)
    cost_s = ms[0] / 1e3  # decode: one step (its set-up no longer grows like a prefill of T)
    details.update(peak_mem_bytes=mem.bytes, cost_s=round(cost_s, 6), setup_s=round(setup_s, 6))
    guard.observe(T, status, cost_s, mem.bytes)
    if status != "ok":
        details["note"] = f"first call {ms[0] / 1e3:.3g} s > cap {cfg.time_cap:g} s"
        return status, {}, details
    details.update(ms_q20=ms[1], ms_q80=ms[2])
    metrics = {"ms": {"value": ms[0], "stderr": None, "n": reps},
               "tokens_per_s": {"value": tokens / (ms[0] / 1e3), "stderr": None, "n": reps}}
    if device.type == "cuda" and target.level == "kernel":
        from linbench.speed.roofline import FLOP_KINDS, kernel_flops, kernel_io_bytes, roofline
        B, H, D = details["batch"], details["heads"], details["dim"]
        flops = (target.flops(B, T, mode) if target.flops else
                 kernel_flops(target.flops_kind, B, T, H, D, mode)
                 if target.flops_kind in FLOP_KINDS else None)
        if flops is not None:
            io = kernel_io_bytes(B, T, H, D, torch.empty((), dtype=dtype).element_size(), mode)
            details.update(roofline(flops, io, ms[0] / 1e3, device_name, dtype))
    return status, metrics, details
