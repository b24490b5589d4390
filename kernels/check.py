"""GPU check of the Triton kernels: correctness against the references, then timings.

    python -m linbench.kernels.check [--json PATH] [--kernels a,b] [--autotune] [--dry-run]

1. Correctness: every kernel that linbench.kernels.triton.available() reports, against its
   reference in linbench.kernels.reference (run in float64 on the same input values), in fp32
   and bf16: output, final state and every gradient; max |a - b| / max |b| per tensor.
2. Timing: fwd and fwd+bwd at B1 H16 D128 bf16, T = 2K..64K, beside torch SDPA (causal,
   flash backend) and, when `import fla` works, fla's chunk ops; triton.testing.do_bench
   median with 20/80% quantiles, peak memory; out-of-memory is a row with status "oom".
--dry-run runs the same code at tiny shapes on CPU in the Triton interpreter (fp16 in place
of bf16, which the interpreter breaks; a perf_counter loop in place of do_bench). Exit code 1
when a correctness check fails.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

KERNELS = ["linear_attention", "gated_linear_attention", "delta_rule",
           "sliding_window_attention", "window_linear_attention"]
TOL = {"float32": 1e-3, "bfloat16": 3e-2, "float16": 1e-2}
SETTINGS = {"window": 64}  # window of the window kernels (LoLCATs' 64); the dry run uses 8


def make_inputs(name, B, T, H, D, dtype, device, seed=0):
    """(positional args, keyword args) of kernel `name`; activations in `dtype`, gates,
    beta, gamma, decay and states in fp32."""
    import torch
    import torch.nn.functional as F
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dt)

    q, k, v = rnd(B, T, H, D), rnd(B, T, H, D), rnd(B, T, H, D)
    f32 = torch.float32
    if name == "linear_attention":
        decay = -torch.exp(torch.linspace(-6, 0, H)).to(device)  # (H,) log-decays -e^-6..-1
        return (q, k, v), dict(decay=decay, initial_state=rnd(B, H, D, D, dt=f32),
                               output_final_state=True)
    if name == "linear_attention[normalize]":
        q, k = F.elu(q.float()).add(1).to(dtype), F.elu(k.float()).add(1).to(dtype)
        return (q, k, v), dict(normalize=True)
    if name == "gated_linear_attention":
        g = F.logsigmoid(rnd(B, T, H, D, dt=f32)) / 4
        return (q, k, v, g), dict(initial_state=rnd(B, H, D, D, dt=f32), output_final_state=True)
    if name == "delta_rule":  # DeltaNet L2-normalizes q, k before the call
        q, k = F.normalize(q.float(), dim=-1).to(dtype), F.normalize(k.float(), dim=-1).to(dtype)
        beta = torch.sigmoid(rnd(B, T, H, dt=f32))
        return (q, k, v, beta), dict(initial_state=rnd(B, H, D, D, dt=f32), output_final_state=True)
    if name == "sliding_window_attention":
        return (q, k, v), dict(window=SETTINGS["window"])
    if name == "window_linear_attention":
        fq = torch.softmax(rnd(B, T, H, D, dt=f32), -1).to(dtype)
        fk = torch.softmax(rnd(B, T, H, D, dt=f32), -1).to(dtype)
        gamma = torch.sigmoid(rnd(H, dt=f32))
        return (q, k, v, fq, fk), dict(window=SETTINGS["window"], gamma=gamma)
    raise ValueError(f"unknown kernel {name!r}; choose from {KERNELS}")


def _outputs(out):
    """Output tensors of a kernel call: (o,) or (o, final_state)."""
    if isinstance(out, tuple):
        return [t for t in out if t is not None]
    return [out]


def check_correctness(name, B, T, H, D, dtype, device, states=True):
    """Max relative error of every output and gradient; PASS when all are under TOL.
    states=False drops initial_state / output_final_state (the timed configuration)."""
    import torch
    from linbench.kernels import reference
    from linbench.kernels import triton as kt
    base = name.split("[")[0]
    fn, ref = getattr(kt, base), getattr(reference, base + "_ref")
    args, kw = make_inputs(name, B, T, H, D, dtype, device)
    if not states:
        kw.pop("initial_state", None)
        kw.pop("output_final_state", None)
    leaves = [a for a in list(args) + list(kw.values())
              if torch.is_tensor(a) and a.is_floating_point() and a is not kw.get("decay")]

    def prepare(cast):
        new = {id(t): cast(t).detach().requires_grad_() for t in leaves}
        sub = lambda x: new.get(id(x), x) if torch.is_tensor(x) else x  # noqa: E731
        return [sub(a) for a in args], {n: sub(a) for n, a in kw.items()}, list(new.values())

    a1, k1, l1 = prepare(lambda t: t.clone())
    a2, k2, l2 = prepare(lambda t: t.double())
    outs, outs_ref = _outputs(fn(*a1, **k1)), _outputs(ref(*a2, **k2))
    gen = torch.Generator().manual_seed(1)
    cots = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device) for o in outs_ref]
    sum(((o.double() * c).sum() for o, c in zip(outs, cots))).backward()
    sum(((o * c).sum() for o, c in zip(outs_ref, cots))).backward()
    errs = {}
    for i, (o, r) in enumerate(zip(outs, outs_ref)):
        errs["out" if i == 0 else "final"] = _rel(o, r)
    for i, (x, r) in enumerate(zip(l1, l2)):
        errs[f"grad{i}"] = _rel(torch.zeros_like(x) if x.grad is None else x.grad, r.grad)
    tol = TOL[str(dtype).split(".")[-1]]
    return {"kernel": name, "dtype": str(dtype).split(".")[-1], "shape": [B, T, H, D],
            "max_err": max(errs.values()), "errors": errs, "tol": tol,
            "status": "PASS" if max(errs.values()) <= tol else "FAIL"}


def _rel(a, b):
    """max |a - b| / max |b|; inf when a has a non-finite value."""
    import torch
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return math.inf
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def flops(op, mode, B, T, H, D):
    """Forward FLOPs (suites/README.md, "Speed"): causal softmax 2 B T^2 H D; chunked linear with chunk C = 64
    B T H (2 C (K + V) + 4 K V). None where no formula applies."""
    if mode != "fwd":
        return None
    if op == "sdpa":
        return 2 * B * T * T * H * D
    if op in ("triton:linear_attention", "fla:chunk_simple_gla"):
        return B * T * H * (2 * 64 * 2 * D + 4 * D * D)
    return None


def timing_ops(names, device):
    """(op label, callable(B, T, H, D, dtype) -> (fn, inputs needing grad))."""
    import torch
    from linbench.kernels import triton as kt
    ops = [("sdpa", _sdpa_op)]
    for name in names:
        if kt.available(name):
            ops.append((f"triton:{name}", _kernel_op(getattr(kt, name), name)))
        if name == "linear_attention" and kt.available(name):  # chunk 32: fewer registers
            ops.append((f"triton:{name}[chunk32]", _kernel_op(getattr(kt, name), name, chunk=32)))
    if device == "cuda":
        try:
            import fla.ops.delta_rule
            import fla.ops.gla
            import fla.ops.simple_gla
            ops += [("fla:chunk_simple_gla", _fla_op(fla.ops.simple_gla.chunk_simple_gla,
                                                     "linear_attention", torch)),
                    ("fla:chunk_gla", _fla_op(fla.ops.gla.chunk_gla, "gated_linear_attention",
                                              torch)),
                    ("fla:chunk_delta_rule", _fla_op(fla.ops.delta_rule.chunk_delta_rule,
                                                     "delta_rule", torch))]
        except Exception as e:  # noqa: BLE001 - fla is optional
            print(f"fla unavailable: {type(e).__name__}: {e}")
    return ops


def _sdpa_op(B, T, H, D, dtype, device):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype) for _ in range(3))
    backend = SDPBackend.FLASH_ATTENTION if device == "cuda" else SDPBackend.MATH

    def fn():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return fn, [q, k, v]


def _kernel_op(kernel, name, chunk=None):
    """chunk: run linear attention with this chunk length (module attribute linear.BT)."""
    import importlib

    def build(B, T, H, D, dtype, device):
        args, kw = make_inputs(name, B, T, H, D, dtype, device)
        kw.pop("initial_state", None)
        kw.pop("output_final_state", None)
        if chunk is None:
            return (lambda: kernel(*args, **kw)), list(args[:3])
        module = importlib.import_module(kernel.__module__)

        def run():
            old, module.BT = module.BT, chunk
            try:
                return kernel(*args, **kw)
            finally:
                module.BT = old
        return run, list(args[:3])
    return build


def _fla_op(kernel, name, torch):
    def build(B, T, H, D, dtype, device):
        args, kw = make_inputs(name, B, T, H, D, dtype, device)
        extra = {"g_gamma": kw["decay"]} if name == "linear_attention" else {}
        return (lambda: kernel(*args, **extra)), list(args[:3])
    return build


def bench(build, mode, B, T, H, D, dtype, device, dry):
    """Median and 20/80% quantiles in ms, peak memory in GB, status ("ok", "oom", "error: ...")."""
    import torch
    row = {"T": T, "mode": mode, "status": "ok"}
    try:
        fn, leaves = build(B, T, H, D, dtype, device)
        if mode == "fwd+bwd":
            for x in leaves:
                x.requires_grad_(True)
            o = _outputs(fn())[0]
            do = torch.randn_like(o)
            step = lambda: _outputs(fn())[0].backward(do)  # noqa: E731
        else:
            step = lambda: fn()  # noqa: E731
        if device == "cuda":
            import triton.testing
            torch.cuda.reset_peak_memory_stats()
            med, p20, p80 = triton.testing.do_bench(
                step, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8],
                grad_to_none=leaves if mode != "fwd" else None)
            row["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            step()  # warm-up
            times = []
            for _ in range(1 if dry else 5):
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
            med, p20, p80 = statistics.median(times), min(times), max(times)
        row.update(ms=med, p20=p20, p80=p80)
    except torch.cuda.OutOfMemoryError:
        row["status"] = "oom"
    except Exception as e:  # noqa: BLE001 - every failure is a row, never a crash
        oom = "out of memory" in str(e)
        row["status"] = "oom" if oom else f"error: {type(e).__name__}: {e}"[:300]
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m linbench.kernels.check",
                                description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write all results to this JSON file")
    p.add_argument("--kernels", default=",".join(KERNELS),
                   help="comma-separated subset of " + ",".join(KERNELS))
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes on CPU (Triton interpreter)")
    p.add_argument("--autotune", action="store_true",
                   help="autotune linbench's kernels (LINBENCH_TRITON_AUTOTUNE=1)")
    p.add_argument("--tmax", type=int, default=65536, help="largest T timed (default 65536)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="skip the remaining timings after this many seconds (default 420)")
    args = p.parse_args(argv)
    names = [n for n in args.kernels.split(",") if n]
    for n in names:
        if n not in KERNELS:
            p.error(f"unknown kernel {n!r}; choose from {', '.join(KERNELS)}")
    import torch
    if args.dry_run and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel module is imported
    elif not torch.cuda.is_available():
        p.error("no CUDA device: run with --dry-run for the CPU path")
    if args.autotune:
        os.environ["LINBENCH_TRITON_AUTOTUNE"] = "1"
    device = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    start = time.time()
    from linbench.kernels import triton as kt
    half = torch.float16 if device == "cpu" else torch.bfloat16
    if args.dry_run:  # (B, T, H, D) per dtype, timing shapes
        SETTINGS["window"] = 8
        shapes = {torch.float32: (1, 20, 2, 16), half: (1, 20, 2, 16)}
        t_list, (B, H, D), t_dtype = [16, 32], (1, 2, 16), torch.float32
    else:  # fp32 with states at D64; bf16 without, at D128 and T % 16 == 0: the timed
        # configuration, so its compiled kernels are reused by the timings
        shapes = {torch.float32: (2, 333, 2, 64), half: (1, 336, 2, 128)}
        t_list = [2 ** i for i in range(11, 30) if 2 ** i <= args.tmax]
        (B, H, D), t_dtype = (1, 16, 128), half

    import triton
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
               "torch": torch.__version__, "triton": triton.__version__, "fla": _fla_version(),
               "autotune": bool(args.autotune), "correctness": [], "timing": []}
    print(f"== correctness on {results['device']}")
    variants = [v for n in names
                for v in ([n, n + "[normalize]"] if n == "linear_attention" else [n])]
    for name in variants:
        if not kt.available(name.split("[")[0]):
            results["correctness"].append({"kernel": name, "status": "missing"})
            print(f"{name:32s} missing")
            continue
        for dtype, shape in shapes.items():
            if name.endswith("[normalize]") and dtype != torch.float32:
                continue
            try:
                r = check_correctness(name, *shape, dtype, device, states=dtype == torch.float32)
            except Exception as e:  # noqa: BLE001
                r = {"kernel": name, "dtype": str(dtype).split(".")[-1], "status": "FAIL",
                     "error": f"{type(e).__name__}: {e}"[:500]}
            results["correctness"].append(r)
            print(f"{name:32s} {r['dtype']:9s} max_err {r.get('max_err', float('nan')):.2e} "
                  f"{r['status']}" + (f"  {r['error']}" if "error" in r else ""), flush=True)

    print(f"== timing B{B} H{H} D{D} {str(t_dtype).split('.')[-1]}, ms (median)")
    for label, build in timing_ops(names, device):
        for mode in ("fwd", "fwd+bwd"):
            for T in t_list:
                if time.time() - start > args.budget_s:
                    row = {"T": T, "mode": mode, "status": "skipped (time budget)"}
                else:
                    row = bench(build, mode, B, T, H, D, t_dtype, device, args.dry_run)
                fl = flops(label, mode, B, T, H, D)
                if fl and row["status"] == "ok":
                    row["tflops"] = fl / (row["ms"] * 1e-3) / 1e12
                results["timing"].append(dict(row, op=label, B=B, H=H, D=D))
    _print_table(results["timing"], t_list)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(f"done in {time.time() - start:.0f} s")
    return 1 if any(r["status"] == "FAIL" for r in results["correctness"]) else 0


def _fla_version():
    try:
        import fla
        return getattr(fla, "__version__", "unknown")
    except Exception:  # noqa: BLE001 - optional
        return None


def _print_table(rows, t_list):
    head = f"{'op':32s} {'mode':8s}" + "".join(f"{_k(T):>24s}" for T in t_list)
    print(head)
    keys = dict.fromkeys((r["op"], r["mode"]) for r in rows)
    for op, mode in keys:
        cells = []
        for T in t_list:
            r = next(r for r in rows if (r["op"], r["mode"], r["T"]) == (op, mode, T))
            cells.append(f"{r['ms']:.3f} [{r['p20']:.3f},{r['p80']:.3f}]" if r["status"] == "ok"
                         else r["status"].split(":")[0][:22])
        print(f"{op:32s} {mode:8s}" + "".join(f"  {c:>22s}" for c in cells))


def _k(T):
    return f"T={T // 1024}K" if T >= 1024 else f"T={T}"


if __name__ == "__main__":
    raise SystemExit(main())
