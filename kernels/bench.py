"""Kernel speed: torch chunked linear attention vs causal softmax SDPA over T.

    python -m linbench.kernels.bench --seqlen 2k,8k,32k,128k,1M --batch 1 --heads 8 \
        --dim 64 --mode fwd [--impls linear,sdpa] [--cap-seconds 60] [--json out.json]

Timing (suites/README.md, "Speed"): inputs are built outside the timed region; one warm-up call
(also the cap check), then a loop on the monotonic clock (time.perf_counter, with
torch.cuda.synchronize around each call on GPU) reporting the median and the 20% / 80%
quantiles. A shape whose first call, or whose extrapolated time (previous length of the
same impl scaled by T^p, p = 2 for SDPA, 1 for linear forms), exceeds the cap is a
"timeout" record; running out of memory is an "oom" record; never a missing row.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from linbench.speed.sweep import parse_seqlens  # noqa: F401 - re-exported (tests, callers)
from linbench.speed.timing import is_oom as _is_oom
from linbench.speed.timing import measure
from linbench.speed.timing import quantile as _quantile


@dataclass
class Record:
    impl: str
    T: int
    B: int
    H: int
    D: int
    dtype: str
    mode: str
    status: str  # "ok" | "timeout" | "oom" | "error"
    median_ms: float | None = None
    q20_ms: float | None = None
    q80_ms: float | None = None
    reps: int = 0
    peak_mem_bytes: int | None = None
    note: str = ""


@dataclass
class Impl:
    name: str
    exponent: int  # time ~ T ** exponent, used to predict timeouts
    build: Callable  # (B, T, H, D, dtype, device, grad) -> zero-argument call


def _linear_attention():
    """The public torch backend once it exists, else the chunked module directly."""
    try:
        from linbench.kernels import linear_attention
    except ImportError:
        from linbench.kernels.chunked import linear_attention_chunked
        return linear_attention_chunked, "linbench.kernels.chunked.linear_attention_chunked"
    return (lambda *a, **kw: linear_attention(*a, backend="torch", **kw),
            "linbench.kernels.linear_attention(backend='torch')")


def _call(fn, inputs, grad: bool):
    """Zero-argument closure: forward (no_grad) or forward + backward (autograd.grad)."""
    if not grad:
        def run():
            with torch.no_grad():
                fn(*inputs)
        return run
    do = None

    def run_bwd():
        nonlocal do
        o = fn(*inputs)
        if do is None:  # built on the warm-up call, outside every timed call
            do = torch.randn_like(o)
        torch.autograd.grad(o, inputs, do)
    return run_bwd


def _randn(shape, dtype, device, grad):
    return torch.randn(shape, dtype=dtype, device=device).requires_grad_(grad)


def build_linear(B, T, H, D, dtype, device, grad):
    fn, _ = _linear_attention()
    q, k, v = (_randn((B, T, H, D), dtype, device, grad) for _ in range(3))  # (B, T, H, D)
    return _call(lambda q, k, v: fn(q, k, v)[0], (q, k, v), grad)


def build_delta(B, T, H, D, dtype, device, grad):
    from linbench.kernels.delta import delta_rule_chunked
    q, k = (F.normalize(torch.randn(B, T, H, D, dtype=dtype, device=device), dim=-1)
            .requires_grad_(grad) for _ in range(2))
    v = _randn((B, T, H, D), dtype, device, grad)
    beta = torch.rand(B, T, H, dtype=dtype, device=device).requires_grad_(grad)
    return _call(lambda q, k, v, b: delta_rule_chunked(q, k, v, b)[0], (q, k, v, beta), grad)


def build_sdpa(B, T, H, D, dtype, device, grad):
    q, k, v = (_randn((B, H, T, D), dtype, device, grad) for _ in range(3))  # (B, H, T, D)
    return _call(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                 (q, k, v), grad)


IMPLS = {
    "linear": Impl("linear", 1, build_linear),
    "delta": Impl("delta", 1, build_delta),
    "sdpa": Impl("sdpa", 2, build_sdpa),
}


def bench(impl: Impl, seqlens, B, H, D, dtype, device, grad, cap_s, target_s, min_reps,
          max_reps, log=print):
    """One record per T (in order), predicting timeouts from the previous length."""
    mode = "fwd+bwd" if grad else "fwd"
    last = None  # (T, seconds) of the last measured or estimated call
    try:  # pay one-time costs (imports, library initialization) outside every record
        impl.build(B, min(256, min(seqlens)), H, D, dtype, device, grad)()
    except Exception:  # noqa: BLE001 - the real shapes record their own failures
        pass
    for T in seqlens:
        rec = Record(impl.name, T, B, H, D, str(dtype).replace("torch.", ""), mode, "ok")
        estimate = last[1] * (T / last[0]) ** impl.exponent if last else 0.0
        if estimate > cap_s:
            rec.status, rec.note = "timeout", f"estimated {estimate:.3g} s > cap {cap_s:g} s"
            last = (T, estimate)
            log(rec)
            yield rec
            continue
        run = None
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            run = impl.build(B, T, H, D, dtype, device, grad)  # inputs: outside the timing
            times, rec.status = measure(run, device, cap_s, target_s, min_reps, max_reps)
            ms = [t * 1e3 for t in times]
            if rec.status == "ok":
                rec.median_ms, rec.q20_ms, rec.q80_ms = (_quantile(ms, p) for p in (0.5, 0.2, 0.8))
            else:
                rec.note = f"first call {times[0]:.3g} s > cap {cap_s:g} s"
            rec.reps = len(times)
            last = (T, _quantile(times, 0.5))
            if device.type == "cuda":
                rec.peak_mem_bytes = torch.cuda.max_memory_allocated(device)
        except Exception as err:  # noqa: BLE001 - every failure becomes a record
            rec.status = "oom" if _is_oom(err) else "error"
            rec.note = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        finally:
            del run
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        log(rec)
        yield rec


def _fmt(x):
    return "-" if x is None else f"{x:.2f}"


def format_table(records) -> str:
    head = (f"{'T':>9}  {'impl':<7} {'median ms':>11} {'q20 ms':>11} {'q80 ms':>11}  "
            f"{'status':<8} note")
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(f"{r.T:>9}  {r.impl:<7} {_fmt(r.median_ms):>11} {_fmt(r.q20_ms):>11} "
                     f"{_fmt(r.q80_ms):>11}  {r.status:<8} {r.note}")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        return names[0] if names else platform.processor() or "cpu"
    except OSError:
        return platform.processor() or "cpu"


def _seqlens_arg(text):
    try:
        return parse_seqlens(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _impls_arg(text):
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in IMPLS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown impl {bad or text!r}; choose from {sorted(IMPLS)}")
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m linbench.kernels.bench",
                                description=__doc__.split("\n")[0])
    p.add_argument("--seqlen", type=_seqlens_arg, default=parse_seqlens("2k..32k"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--mode", choices=["fwd", "fwd+bwd"], default="fwd")
    p.add_argument("--impls", type=_impls_arg, default=["linear", "sdpa"])
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cap-seconds", type=float, default=60.0, help="per-call time cap")
    p.add_argument("--target-seconds", type=float, default=1.0, help="timed loop length")
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--max-reps", type=int, default=50)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 is steadier on a shared machine")
    p.add_argument("--json", metavar="PATH", help="also write the records as JSON")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    device = torch.device(a.device)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    print(f"# device {device} ({dev_name}), torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, B{a.batch} H{a.heads} D{a.dim} {a.dtype} {a.mode}",
          flush=True)
    records = []
    for name in a.impls:
        gen = bench(IMPLS[name], a.seqlen, a.batch, a.heads, a.dim, dtype, device,
                    a.mode == "fwd+bwd", a.cap_seconds, a.target_seconds, a.min_reps,
                    a.max_reps, log=lambda r: print(f"  {r.impl} T={r.T}: {r.status} "
                                                    f"{_fmt(r.median_ms)} ms", flush=True))
        records += list(gen)
    records.sort(key=lambda r: (r.T, a.impls.index(r.impl)))
    print(format_table(records))
    if a.json:
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        out = {"schema_version": 1, "command": sys.argv, "device": f"{device} ({dev_name})",
               "torch": torch.__version__, "triton": triton_version,
               "threads": torch.get_num_threads(), "linear_impl": _linear_attention()[1],
               "config": {k: v for k, v in vars(a).items() if k != "json"},
               "records": [asdict(r) for r in records]}
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
