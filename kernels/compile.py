"""Compile every Triton kernel ahead of time for a GPU that is not here (default: sm_90a,
the H100/H200), and report each one's registers, spills and shared memory.

    python -m linbench.kernels.compile [--capability 90] [--dtypes fp32,fp16,bf16]
        [--dims 64,128] [--kernels a,b] [--stage cubin|ptx|ttir] [--max-spills N]
        [--quick] [--autotune] [--list] [--json PATH]

Where the launch configs come from: nowhere in this file. Each op's own Python launcher
(linbench.kernels.<op>.triton, forward and backward) runs on small CPU tensors built by
linbench.kernels.check.make_inputs, with triton's active driver replaced by a stand-in that
reports the target GPU and with triton's `knobs.runtime.jit_cache_hook` set. Every
`kernel[grid](...)` the launchers make then reaches the hook with the exact signature,
constexprs (block sizes, flags), pointer-alignment attributes and options (num_warps,
num_stages) that triton would compile on that GPU; the hook records them and declines the
launch. A new kernel, a changed block size or a new flag is covered as soon as an op's
public function launches it. Each op runs in every dtype and head dim asked for, with and
without initial/final states (the constexpr flags differ), forward and backward.

Each distinct launch is then compiled with `triton.compile(ASTSource(...), target=
GPUTarget("cuda", 90, 32))`: the frontend (TTIR), LLVM to PTX, and ptxas (shipped in the
triton wheel) to a cubin for sm_90a. Registers and spills are read from the cubin with
cuobjdump (also in the wheel) as triton's driver reports them on a GPU: n_regs, and
n_spills = the per-thread local memory (the stack frame ptxas spills into) / 4 bytes.
Shared memory is triton's own figure (metadata.shared); over the target's per-block limit
the launch would fail on the GPU, so it counts as a failure here.

Exit code 1 when a launch does not compile, needs more shared memory than the GPU has,
spills more than --max-spills, or when a kernel of the package is never launched (or a
launcher fails); the table is printed either way. --quick compiles only the first launch
of each kernel through ptxas and the others through the frontend (the CI test);
--autotune captures the LINBENCH_TRITON_AUTOTUNE=1 configs instead of the fixed ones.
Compiles are cached in triton's cache (TRITON_CACHE_DIR), so a second run is fast.
Run it in its own process:
the driver stand-in and TRITON_INTERPRET must not meet real launches.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time

DTYPES = ("fp32", "fp16", "bf16")
DIMS = (64, 128)  # head dims: SmolLM2 / Llama-3 8B
STAGES = ("ttir", "ptx", "cubin")
# n_spills (4-byte words per thread) above which a launch fails: a backstop against a
# kernel whose registers collapse (16 KiB of local memory per thread, 4 MiB per block of
# 256 threads). Spills below it cost speed, not correctness: the table reports them.
MAX_SPILLS = 4096
# Per-block shared memory limit (bytes) by compute capability (CUDA programming guide,
# "Technical Specifications per Compute Capability": 227 KB on 9.0, 163 KB on 8.0).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}
# Launcher variants per op (suffixes understood by check.make_inputs).
VARIANTS = {"linear_attention": ("", "[normalize]")}
SHAPE = dict(B=1, T=256, H=8)  # T a multiple of 16, as in training; H is a constexpr


@dataclasses.dataclass
class Launch:
    """One distinct kernel launch: what triton would compile for it on the target."""
    fn: object  # the JITFunction
    signature: dict
    constants: dict
    attrs: dict
    options: dict
    via: list  # workload labels that launched it

    @property
    def kernel(self) -> str:
        """"<op>.<kernel function>", e.g. "linear._fwd"."""
        return f"{self.fn.module.split('.')[-2]}.{self.fn.__name__}"

    @property
    def dtype(self) -> str:
        """Element types of the pointer arguments, in order of first use ("bf16/fp32")."""
        ptrs = [t[1:] for t in self.signature.values() if t.startswith("*")]
        return "/".join(dict.fromkeys(ptrs)) or "-"

    @property
    def config(self) -> str:
        """The constexprs that were given a value, then warps and stages."""
        names = self.fn.arg_names
        parts = [f"{names[k[0]]}={_short(v)}" for k, v in sorted(self.constants.items())
                 if v is not None and len(k) == 1]
        return " ".join(parts + [f"w{self.options['num_warps']}",
                                 f"s{self.options['num_stages']}"])


def _short(v) -> str:
    return str(int(v)) if isinstance(v, bool) else str(v)


# ---- capture: run the launchers against a stand-in driver -----------------------------

def _target_driver(target):
    """A triton driver that reports `target` and launches nothing (no GPU needed)."""
    import torch
    from triton.backends.driver import DriverBase

    class TargetDriver(DriverBase):
        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty):  # pragma: no cover - launchers only
            raise NotImplementedError

        def get_current_target(self):
            return target

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_benchmarker(self):
            """The autotuner's timer: run each config once (captured) and call it 1 ms."""
            def bench(kernel_call, quantiles=None, **kwargs):
                kernel_call()
                return [1.0] * len(quantiles) if quantiles else 1.0
            return bench

    return TargetDriver()


@contextlib.contextmanager
def targeting(target):
    """Inside: triton compiles for `target`, and every launch is recorded, not run.
    Yields the list the launches are appended to (duplicates included)."""
    from triton import knobs
    from triton.runtime.driver import driver
    seen = []

    def hook(*, fn, compile, **_):
        options = json.loads(compile["specialization_data"])["options"]
        options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
        seen.append(Launch(fn.jit_function, dict(compile["signature"]),
                           dict(compile["constants"]), dict(compile["configs"][0]), options,
                           []))
        return True  # handled: triton neither compiles nor launches

    old_driver, old_hook = driver._active, knobs.runtime.jit_cache_hook
    driver.set_active(_target_driver(target))
    knobs.runtime.jit_cache_hook = hook
    try:
        yield seen
    finally:
        knobs.runtime.jit_cache_hook = old_hook
        driver._active = old_driver
        for launch in seen:  # binders made for the stand-in must not serve real launches
            launch.fn.device_caches.clear()


def workloads(names, dtypes=DTYPES, dims=DIMS, shape=SHAPE):
    """[(label, run)]: run() calls op `name`'s Triton launcher forward and backward on CPU
    tensors, for each variant, dtype, head dim, with and without states (initial and
    final state, and a learnable decay, on or off together)."""
    import torch

    from linbench.kernels import triton as kt
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    out = []
    for name in names:
        for variant in VARIANTS.get(name, ("",)):
            for dt in dtypes:
                for d in dims:
                    for states in (True, False):
                        label = f"{name}{variant} {dt} D{d}" + (" states" if states else "")
                        out.append((label, _runner(getattr(kt, name), name + variant,
                                                   torch_dtype[dt], d, states, shape)))
    return out


def _runner(fn, name, dtype, d, states, shape):
    def run():
        import torch

        from linbench.kernels.check import _outputs, make_inputs
        args, kw = make_inputs(name, shape["B"], shape["T"], shape["H"], d, dtype, "cpu")
        if not states:
            kw.pop("initial_state", None)
            kw.pop("output_final_state", None)
        # with states every floating input is differentiated (the full gradient path);
        # without, the fixed decay stays a constant, as lightning's buffer is
        leaves = [t for t in list(args) + list(kw.values())
                  if torch.is_tensor(t) and t.is_floating_point()
                  and (states or t is not kw.get("decay"))]
        for t in leaves:
            t.requires_grad_()
        outs = [o for o in _outputs(fn(*args, **kw)) if o.requires_grad]
        # launches write nothing here: outputs are uninitialized memory, which is fine,
        # only the launches matter
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return run


def jit_kernels():
    """{"<op>.<name>": JITFunction} of every Triton kernel in linbench.kernels (modules
    whose source has "@triton.jit"), helpers left out: a helper is a jit function called
    from another one; a kernel is launched from Python."""
    import importlib
    import pathlib

    from triton.runtime.jit import JITFunction
    root = pathlib.Path(__file__).parent
    fns = {}
    for path in sorted(root.rglob("*.py")):
        if "@triton.jit" not in path.read_text():
            continue
        name = ".".join(("linbench.kernels",) + path.relative_to(root).with_suffix("").parts)
        module = importlib.import_module(name)
        for obj in vars(module).values():
            for _ in range(3):  # unwrap a fixed-config launcher or triton's autotuner
                if isinstance(obj, JITFunction) or not hasattr(obj, "fn"):
                    break
                obj = obj.fn
            if isinstance(obj, JITFunction) and obj.module == name:
                fns[f"{name.split('.')[-2]}.{obj.__name__}"] = obj
    called = {n for n, f in fns.items() for g in fns.values()
              if g is not f and re.search(rf"(?<!def )\b{re.escape(f.__name__)}\(", g.src)}
    return {n: f for n, f in fns.items() if n not in called}


def unlaunched(launches, folders=None) -> list[str]:
    """Kernels (jit_kernels) of the op folders `folders` (None: all) that no captured launch
    reached: a new kernel or variant the workloads do not drive yet (add it to VARIANTS or
    linbench.kernels.check.make_inputs)."""
    seen = {launch.kernel for launch in launches}
    return sorted(n for n in jit_kernels()
                  if n not in seen and (folders is None or n.split(".")[0] in folders))


def capture(items, target, errors=None):
    """Run each (label, run) against `target`; the distinct launches, in first-seen order,
    each with the labels of the workloads that made it. A workload that raises goes to
    `errors` ("label: error") when a list is given, else the error propagates."""
    launches = {}
    with targeting(target) as seen:
        for label, run in items:
            start = len(seen)
            try:
                run()
            except Exception as e:  # noqa: BLE001 - reported, the other workloads go on
                if errors is None:
                    raise
                errors.append(f"{label}: launcher failed: {type(e).__name__}: {e}"[:400])
            for launch in seen[start:]:
                key = (id(launch.fn), repr(sorted(launch.signature.items())),
                       repr(sorted(launch.constants.items(), key=str)),
                       repr(sorted(launch.attrs.items())), repr(sorted(launch.options.items())))
                launches.setdefault(key, launch).via.append(label)
    for launch in launches.values():
        launch.via = list(dict.fromkeys(launch.via))
    return list(launches.values())


# ---- compile --------------------------------------------------------------------------

def first_per_kernel(launches):
    """The first launch of each kernel function (capture order)."""
    return list({launch.kernel: launch for launch in reversed(launches)}.values())[::-1]


def compile_launch(launch, target, stage="cubin"):
    """Compile one launch up to `stage`; a result row (status "ok" or "error: ...")."""
    import triton
    from triton.compiler import ASTSource
    row = {"kernel": launch.kernel, "dtype": launch.dtype, "config": launch.config,
           "via": launch.via, "stage": stage}
    src = ASTSource(launch.fn, launch.signature, launch.constants, launch.attrs)
    start, cpu = time.perf_counter(), _cpu()
    try:
        if stage == "cubin":
            compiled = triton.compile(src, target=target, options=launch.options)
            row["regs"], row["spills"] = resources(compiled.asm["cubin"])
            row["shared"] = compiled.metadata.shared
        else:
            _compile_to(src, target, launch.options, stage)
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - every failure is a row
        msg = " ".join(str(e).split())
        row["status"] = f"error: {type(e).__name__}: {msg}"[:400]
    row["seconds"] = round(time.perf_counter() - start, 2)
    row["cpu_seconds"] = round(_cpu() - cpu, 2)  # ptxas and cuobjdump included
    return row


def _cpu() -> float:
    """CPU seconds of this process and its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _compile_to(src, target, options, stage):
    """triton.compile's pipeline stopped after `stage` ("ttir" or "ptx"), uncached: the
    same stages in the same order (triton.compiler.compile), the rest left out."""
    from triton._C.libtriton import ir
    from triton.compiler.compiler import make_backend
    backend = make_backend(target)
    opts = backend.parse_options(dict(options))
    stages = {}
    backend.add_stages(stages, opts, src.language)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(target, opts, backend.get_codegen_implementation(opts),
                         backend.get_module_map(), context)
    metadata = {"hash": "aot", "target": target, **opts.__dict__}
    for ext, step in stages.items():
        module = step(module, metadata)
        if ext == stage:
            return module
    raise ValueError(f"unknown stage {stage!r}; valid stages: {', '.join(STAGES)}")


def tool(name: str) -> str:
    """Path of a CUDA tool shipped in triton's nvidia backend (bin/<name>)."""
    from triton.backends.nvidia.compiler import get_ptxas
    return os.path.join(os.path.dirname(get_ptxas(90).path), name)


def resources(cubin: bytes) -> tuple[int, int]:
    """(n_regs, n_spills) of a single-kernel cubin, as triton's driver reports them
    (CU_FUNC_ATTRIBUTE_NUM_REGS; CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES / 4), read with
    `cuobjdump --dump-resource-usage` (REG, and STACK: the per-thread frame that ptxas
    spills into; triton kernels have no other local memory)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", f.name],
                              check=True, capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"no resource usage in cuobjdump output: {text!r}")
    return int(m.group(1)), (int(m.group(2)) + int(m.group(3))) // 4


def ptxas_problem() -> str | None:
    """None when triton's ptxas and cuobjdump run here, else why not (one line)."""
    try:
        for name in (os.path.basename(_ptxas_path()), "cuobjdump"):
            subprocess.run([tool(name), "--version"], check=True, capture_output=True,
                           timeout=60)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def _ptxas_path():
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(90).path


def failures(rows, capability, max_spills=MAX_SPILLS):
    """One line per row that fails: not compiled, over the shared-memory limit, or
    spilling more than max_spills."""
    bad = []
    limit = SHARED_LIMIT.get(capability)
    for r in rows:
        where = f"{r['kernel']} {r['dtype']} [{r['config']}]"
        if r["status"] != "ok":
            bad.append(f"{where}: {r['status']}")
            continue
        if limit and r.get("shared", 0) > limit:
            bad.append(f"{where}: {r['shared']} bytes of shared memory > {limit} "
                       f"on sm_{capability}")
        if r.get("spills", 0) > max_spills:
            bad.append(f"{where}: {r['spills']} spills > {max_spills}")
    return bad


def table(rows) -> str:
    lines = [f"{'kernel':34s} {'dtype':9s} {'regs':>4s} {'spills':>6s} {'smem KB':>7s} "
             f"{'s':>5s}  config"]
    for r in rows:
        ok = r["status"] == "ok"
        regs = str(r.get("regs", "-")) if ok else "FAIL"
        spills = str(r.get("spills", "-")) if ok else ""
        smem = f"{r['shared'] / 1024:.0f}" if ok and "shared" in r else "-"
        lines.append(f"{r['kernel']:34s} {r['dtype']:9s} {regs:>4s} {spills:>6s} {smem:>7s} "
                     f"{r['seconds']:5.1f}  {r['config']}")
        if not ok:
            lines.append(f"    {r['status']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from linbench.kernels.common import OPS
    p = argparse.ArgumentParser(prog="python -m linbench.kernels.compile",
                                description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--capability", type=int, default=90,
                   help="CUDA compute capability to compile for (default 90: sm_90a)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated subset of "
                   + ",".join(DTYPES))
    p.add_argument("--dims", default=",".join(map(str, DIMS)),
                   help="comma-separated head dims (default 64,128)")
    p.add_argument("--kernels", default=",".join(OPS),
                   help="comma-separated subset of " + ",".join(OPS))
    p.add_argument("--stage", default="cubin", choices=STAGES,
                   help="stop after this stage (default cubin: through ptxas)")
    p.add_argument("--max-spills", type=int, default=MAX_SPILLS,
                   help="fail a launch spilling more 4-byte words per thread "
                        f"(default {MAX_SPILLS})")
    p.add_argument("--autotune", action="store_true",
                   help="the configs of LINBENCH_TRITON_AUTOTUNE=1 instead of the fixed ones")
    p.add_argument("--quick", action="store_true",
                   help="only the first launch of each kernel through --stage, every other "
                        "launch through the frontend (ttir): the CI test's mode")
    p.add_argument("--list", action="store_true", help="list the launches, compile nothing")
    p.add_argument("--json", help="write the rows to this JSON file")
    args = p.parse_args(argv)
    dtypes = [d for d in args.dtypes.split(",") if d]
    names = [n for n in args.kernels.split(",") if n]
    for kind, got, valid in (("dtype", dtypes, DTYPES), ("kernel", names, list(OPS))):
        for x in got:
            if x not in valid:
                p.error(f"unknown {kind} {x!r}; choose from {', '.join(valid)}")
    try:
        dims = [int(d) for d in args.dims.split(",") if d]
    except ValueError:
        p.error(f"--dims must be comma-separated integers, got {args.dims!r}")
    if ("linbench.kernels.triton_common" in sys.modules
            and os.environ.get("TRITON_INTERPRET") == "1"):
        p.error("the Triton kernels were imported for the interpreter; run in a fresh process")
    os.environ.pop("TRITON_INTERPRET", None)  # the GPU configs, not the interpreter's
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton's default, stated
    if args.autotune:
        os.environ["LINBENCH_TRITON_AUTOTUNE"] = "1"
    from triton.backends.compiler import GPUTarget
    target = GPUTarget("cuda", args.capability, 32)
    stage = args.stage
    if stage == "cubin":
        problem = ptxas_problem()
        if problem:
            print(f"ptxas cannot run here ({problem}): compiling to PTX only", flush=True)
            stage = "ptx"
    start = time.perf_counter()
    errors = []
    launches = capture(workloads(names, dtypes, dims), target, errors)
    print(f"{len(launches)} distinct launches for sm_{args.capability} "
          f"({time.perf_counter() - start:.1f} s to capture)", flush=True)
    folders = {OPS[n] for n in names}
    bad = errors + [f"{n}: a Triton kernel that no workload launches"
                    for n in unlaunched(launches, folders)]
    if args.list:
        for launch in launches:
            print(f"{launch.kernel:34s} {launch.dtype:9s} {launch.config}")
        for line in bad:
            print("FAIL " + line)
        return 1 if bad else 0
    full = {id(x) for x in (first_per_kernel(launches) if args.quick else launches)}
    rows = []
    for launch in launches:
        rows.append(compile_launch(launch, target, stage if id(launch) in full else "ttir"))
        r = rows[-1]
        print(f"  {r['kernel']} {r['dtype']} {r['seconds']:.1f} s {r['status'][:60]}",
              file=sys.stderr, flush=True)
    print(table(rows))
    bad = failures(rows, args.capability, args.max_spills) + bad
    for line in bad:
        print("FAIL " + line)
    total = time.perf_counter() - start
    print(f"{len(rows)} launches ({len(full)} to {stage}, the rest to ttir) in {total:.0f} s, "
          f"{len(bad)} failing")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"capability": args.capability, "stage": stage, "rows": rows,
                       "kernels": sorted(n for n in jit_kernels() if n.split(".")[0] in folders),
                       "failures": bad}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
