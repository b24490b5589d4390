"""GPU check of the Triton kernels: correctness against the references, then timings.

    python -m linbench.kernels.check [--json PATH] [--kernels a,b] [--autotune] [--dry-run]

1. Correctness: every kernel that linbench.kernels.triton.available() reports, against its
   op's reference (linbench.kernels.<op>.reference, run in float64 on the same input
   values), in fp32 and bf16: output, final state and every gradient; max |a - b| / max |b|
   per tensor.
2. Timing: fwd and fwdbwd (gradients of every positional input) at B1 H16 D128 bf16,
   T = 2K..64K, beside torch SDPA (causal, flash backend) and, when fla imports, the fla
   peers of linbench.speed.peers. The timing loop is linbench.speed.timing's (on GPU
   triton.testing.do_bench: median and 20% / 80% quantiles), with its peak memory; TFLOP/s,
   GB/s and percent of peak come from linbench.speed.roofline. Out-of-memory is a row with
   status "oom".
--dry-run runs the same code at tiny shapes on CPU in the Triton interpreter (fp16 in place
of bf16, which the interpreter breaks; the monotonic-clock loop in place of do_bench). Exit
code 1 when a correctness check fails.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

KERNELS = ["linear_attention", "gated_linear_attention", "delta_rule",
           "sliding_window_attention", "window_linear_attention"]
TOL = {"float32": 1e-3, "bfloat16": 3e-2, "float16": 1e-2}
SETTINGS = {"window": 64}  # window of the window kernels (LoLCATs' 64); the dry run uses 8
# FLOP kind (linbench.speed.roofline) of each kernel's timing rows; None: no formula
FLOP_KIND = {"linear_attention": "linear", "gated_linear_attention": "linear",
             "delta_rule": "linear", "sliding_window_attention": None,
             "window_linear_attention": None}


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
    import importlib

    import torch
    from linbench.kernels import triton as kt
    from linbench.kernels.common import OPS
    base = name.split("[")[0]
    reference = importlib.import_module(f"linbench.kernels.{OPS[base]}.reference")
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


def timing_ops(names, device):
    """[(op label, FLOP kind or None, build)], build(B, T, H, D, dtype, device, grad) ->
    (fn, inputs): fn(*inputs) returns the output timed (and differentiated in fwdbwd)."""
    from linbench.kernels import triton as kt
    ops = [("sdpa", "softmax", _sdpa_op)]
    for name in names:
        if kt.available(name):
            ops.append((f"triton:{name}", FLOP_KIND[name], _kernel_op(getattr(kt, name), name)))
        if name == "linear_attention" and kt.available(name):  # chunk 32: fewer registers
            ops.append((f"triton:{name}[chunk32]", "linear",
                        _kernel_op(getattr(kt, name), name, chunk=32)))
    if device == "cuda":
        from linbench.speed.peers import FLA_PEERS, fla_available
        if fla_available(device):
            ops += [(label, "linear", _peer_op(peer)) for label, peer in FLA_PEERS.items()
                    if peer.kernel in names]
        else:
            print("fla unavailable: no peer rows")
    return ops


def _sdpa_op(B, T, H, D, dtype, device, grad):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qkv = [torch.randn(B, H, T, D, device=device, dtype=dtype).requires_grad_(grad)
           for _ in range(3)]  # (B, H, T, D)
    backend = SDPBackend.FLASH_ATTENTION if device == "cuda" else SDPBackend.MATH

    def fn(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return fn, qkv


def _kernel_op(kernel, name, chunk=None):
    """chunk: run linear attention with this chunk length (module attribute BT)."""
    import importlib

    def build(B, T, H, D, dtype, device, grad):
        args, kw = make_inputs(name, B, T, H, D, dtype, device)
        kw.pop("initial_state", None)
        kw.pop("output_final_state", None)
        inputs = [a.requires_grad_(grad) for a in args]
        if chunk is None:
            return (lambda *xs: _outputs(kernel(*xs, **kw))[0]), inputs
        module = importlib.import_module(kernel.__module__)

        def run(*xs):
            old, module.BT = module.BT, chunk
            try:
                return _outputs(kernel(*xs, **kw))[0]
            finally:
                module.BT = old
        return run, inputs
    return build


def _peer_op(peer):
    def build(B, T, H, D, dtype, device, grad):
        inputs = [x.requires_grad_(grad) for x in peer.inputs(B, T, H, D, dtype, device)]
        return peer.function(), inputs
    return build


def bench(op, mode, B, T, H, D, dtype, device, dry):
    """One timing row: median and 20% / 80% quantiles in ms, peak memory in GiB, the
    roofline numbers where the op has a FLOP kind, status ("ok", "timeout", "oom",
    "error: ...")."""
    import torch

    from linbench.speed import roofline, timing
    label, kind, build = op
    row = {"op": label, "T": T, "mode": mode, "B": B, "H": H, "D": D, "status": "ok"}
    try:
        with timing.PeakMemory(device) as mem:
            fn, inputs = build(B, T, H, D, dtype, device, mode == "fwdbwd")
            run = timing.prepared_call(fn, inputs, [], mode)
            ms, reps, status = timing.time_call(run, device, cap_s=60.0,
                                                target_s=0.01 if dry else 0.1,
                                                min_reps=1 if dry else 3,
                                                max_reps=2 if dry else 1000)
            del run, fn, inputs
        row.update(status=status, ms=ms[0], q20=ms[1], q80=ms[2], reps=reps,
                   peak_gb=None if mem.bytes is None else mem.bytes / 2**30)
        if kind and status == "ok":
            elem = torch.empty((), dtype=dtype).element_size()
            row.update(roofline.roofline(
                roofline.kernel_flops(kind, B, T, H, D, mode),
                roofline.kernel_io_bytes(B, T, H, D, elem, mode), ms[0] / 1e3,
                torch.cuda.get_device_name() if device == "cuda" else "cpu", dtype))
    except Exception as e:  # noqa: BLE001 - every failure is a row, never a crash
        row["status"] = "oom" if timing.is_oom(e) else f"error: {type(e).__name__}: {e}"[:300]
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

    from linbench.speed.peers import fla_version
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
               "torch": torch.__version__, "triton": triton.__version__, "fla": fla_version(),
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

    print(f"== timing B{B} H{H} D{D} {str(t_dtype).split('.')[-1]}, ms: median [q20, q80]")
    for op in timing_ops(names, device):
        for mode in ("fwd", "fwdbwd"):
            for T in t_list:
                if time.time() - start > args.budget_s:
                    row = {"op": op[0], "T": T, "mode": mode, "B": B, "H": H, "D": D,
                           "status": "skipped (time budget)"}
                else:
                    row = bench(op, mode, B, T, H, D, t_dtype, device, args.dry_run)
                results["timing"].append(row)
    _print_table(results["timing"], t_list)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(f"done in {time.time() - start:.0f} s")
    return 1 if any(r["status"] == "FAIL" for r in results["correctness"]) else 0


def _print_table(rows, t_list):
    head = f"{'op':32s} {'mode':8s}" + "".join(f"{_k(T):>24s}" for T in t_list)
    print(head)
    keys = dict.fromkeys((r["op"], r["mode"]) for r in rows)
    for op, mode in keys:
        cells = []
        for T in t_list:
            r = next(r for r in rows if (r["op"], r["mode"], r["T"]) == (op, mode, T))
            cells.append(f"{r['ms']:.3f} [{r['q20']:.3f},{r['q80']:.3f}]" if r["status"] == "ok"
                         else r["status"].split(":")[0][:22])
        print(f"{op:32s} {mode:8s}" + "".join(f"  {c:>22s}" for c in cells))


def _k(T):
    return f"T={T // 1024}K" if T >= 1024 else f"T={T}"


if __name__ == "__main__":
    raise SystemExit(main())
