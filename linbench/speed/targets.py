"""What `linbench speed` times: kernel-level mixers and model-level prefill / decode.

A Target turns (mode, T) into a prepared zero-argument call: inputs are built here,
outside the timed region, and the call does only the work being measured.

- kernel level: a registered method's mixer, `Method().mixer(heads, head_dim,
  backend=...)`, an nn.Module with forward(q, k, v) -> o on (B, T, H, D) tensors; or an
  fla chunk op ("fla:gla" ...), the GPU peer (its Triton kernels do not run on a CPU).
- model level: the base model linearized by the method (`method.linearize(model)`, no
  recovery: speed does not depend on weights); prefill = one forward over T random ids
  (B = 1, cache built, last logits only); decode = one-token steps with the cache the
  model returned after a prefill of T tokens.

Also the roofline numbers of the GPU rows: device peaks, FLOPs (suites/README.md, "Speed") and bytes moved.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

# Dense peaks per device-name pattern: (bf16/fp16 tensor-core TFLOP/s, fp32 TFLOP/s, TB/s).
# H100 SXM and H200: NVIDIA H100/H200 datasheets (989 dense bf16, 67 fp32; 3.35 / 4.8 TB/s).
DEVICE_PEAKS = [
    (r"H200", (989.0, 67.0, 4.8)),
    (r"H100.*(PCIe)", (756.0, 51.0, 2.0)),
    (r"H100", (989.0, 67.0, 3.35)),
    (r"A100.*80GB", (312.0, 19.5, 2.039)),
    (r"A100", (312.0, 19.5, 1.555)),
]

KERNEL_MODES = ("fwd", "fwdbwd")
MODEL_MODES = ("prefill", "decode")


@dataclass
class Target:
    name: str                                # method name, or "fla:<op>"
    level: str                               # "kernel" | "model"
    config: dict                             # hashed with every record (method config)
    prepare: Callable                        # (mode, T) -> (zero-argument call, tokens per call)
    state_bytes: Callable = lambda T: None   # (T) -> bytes of state / KV cache per sequence
    flops_kind: str | None = None            # "softmax" | "linear" (suites/README.md FLOP formulas)
    flops: Callable | None = None            # optional (batch, T, mode) -> FLOPs, from the mixer
    min_bytes: Callable = lambda mode, T: 0  # lower bound of the memory a shape needs
    info: dict = field(default_factory=dict)  # extra record details (shape of the model ...)


def _grad_call(fn, inputs, params, mode):
    """fwd: forward under no_grad; fwdbwd: forward + autograd.grad w.r.t. inputs and the
    trainable parameters, with the output gradient built on the first (warm-up) call."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(*inputs)
        return run
    wrt = [*inputs, *params]
    do = None

    def run_bwd():
        nonlocal do
        o = fn(*inputs)
        if do is None:
            do = torch.randn_like(o)
        torch.autograd.grad(o, wrt, do)
    return run_bwd


def _qkv(B, T, H, D, dtype, device, grad):
    return [torch.randn(B, T, H, D, dtype=dtype, device=device).requires_grad_(grad)
            for _ in range(3)]  # (B, T, H, D) each


def method_kernel_target(name, B, H, D, dtype, device, backend) -> Target | None:
    """The method's mixer as a kernel-level target; None when the method has no mixer."""
    from linbench import registry
    method = registry.methods.get(name)()
    if not callable(getattr(method, "mixer", None)):
        return None
    try:
        mixer = method.mixer(H, D, backend=backend).to(device=device, dtype=dtype)
    except NotImplementedError:
        return None
    except Exception as err:  # noqa: BLE001 - e.g. a backend the method lacks: error rows
        def fail(mode, T, err=err):
            raise err
        return Target(name, "kernel", {"name": name, **method.config_dict()}, fail)
    params = [p for p in mixer.parameters() if p.requires_grad]
    elem = torch.empty((), dtype=dtype).element_size()

    def prepare(mode, T):
        grad = mode == "fwdbwd"
        return _grad_call(mixer, _qkv(B, T, H, D, dtype, device, grad),
                          params if grad else [], mode), B * T

    def state_bytes(T):
        fn = getattr(mixer, "state_bytes", None)
        return int(fn(B, T, elem)) if callable(fn) else None

    flops = getattr(mixer, "flops", None)
    return Target(name, "kernel", {"name": name, **method.config_dict()}, prepare,
                  state_bytes, getattr(mixer, "flops_kind", "linear"),
                  flops if callable(flops) else None,
                  lambda mode, T: (4 if mode == "fwd" else 8) * B * T * H * D * elem)


# fla chunk ops (the GPU peer rows): name -> (op, extra inputs (B, T, H, D) -> list, kwargs)
FLA_PEERS = {
    "fla:linear": ("chunk_linear_attn", lambda B, T, H, D, dt, dev: [], {"normalize": False}),
    "fla:simple_gla": ("chunk_simple_gla", lambda B, T, H, D, dt, dev: [
        F.logsigmoid(torch.randn(B, T, H, device=dev)).to(dt)], {}),  # g (B, T, H)
    "fla:gla": ("chunk_gla", lambda B, T, H, D, dt, dev: [
        (F.logsigmoid(torch.randn(B, T, H, D, device=dev)) / 16).to(dt)], {}),  # g (B, T, H, K)
    "fla:delta": ("chunk_delta_rule", lambda B, T, H, D, dt, dev: [
        torch.rand(B, T, H, device=dev).to(dt)], {"use_qk_l2norm_in_kernel": True}),  # beta
}


def check_device(device: str) -> None:
    """Raise the one-line user error for an unknown or absent device."""
    from linbench.errors import LinbenchError
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise LinbenchError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LinbenchError(f"device {device!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise LinbenchError(f"unsupported device {device!r} (use cpu, cuda or cuda:N)")


def fla_available(device) -> bool:
    if torch.device(device).type != "cuda":
        return False
    try:
        import fla.ops  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means no peer rows
        return False
    return True


def fla_target(name, B, H, D, dtype, device) -> Target:
    import fla
    import fla.ops
    op_name, extra, kwargs = FLA_PEERS[name]
    op = getattr(fla.ops, op_name)
    elem = torch.empty((), dtype=dtype).element_size()

    def prepare(mode, T):
        grad = mode == "fwdbwd"
        inputs = _qkv(B, T, H, D, dtype, device, grad)
        inputs += [x.requires_grad_(grad) for x in extra(B, T, H, D, dtype, device)]
        return _grad_call(lambda *xs: op(*xs, **kwargs)[0], inputs, [], mode), B * T

    return Target(name, "kernel", {"name": name, "op": f"fla.ops.{op_name}", "kwargs": kwargs,
                                   "fla": getattr(fla, "__version__", None)},
                  prepare, lambda T: B * H * D * D * 4, "linear", None,
                  lambda mode, T: (4 if mode == "fwd" else 8) * B * T * H * D * elem)


def _cache_kwarg(model) -> str:
    """transformers 5 renamed the cache keyword `past_key_values` -> `cache`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def model_target(name, method, model, device) -> Target:
    """Prefill / decode of a (linearized) causal LM at batch 1."""
    c = model.config
    vocab = c.vocab_size
    cache_kw = _cache_kwarg(model)
    heads = c.num_attention_heads
    dim = getattr(c, "head_dim", None) or c.hidden_size // heads

    def state_bytes(T):
        try:
            return int(method.state_bytes(model, T))
        except NotImplementedError:
            return None

    def prepare(mode, T):
        ids = torch.randint(vocab, (1, T), device=device)  # (1, T)
        if mode == "prefill":
            def run():
                with torch.no_grad():
                    model(ids, use_cache=True, logits_to_keep=1)
            return run, T
        with torch.no_grad():  # the prefill is set-up, outside the timed steps
            out = model(ids, use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None) or out.past_key_values
        tok = ids[:, -1:]  # (1, 1)

        def step():
            with torch.no_grad():
                model(tok, use_cache=True, **{cache_kw: cache})
        return step, 1

    return Target(name, "model", {"name": name, **method.config_dict()}, prepare, state_bytes,
                  min_bytes=lambda mode, T: state_bytes(T) or 0,
                  info={"batch": 1, "heads": heads, "dim": dim, "layers": c.num_hidden_layers})


def device_peaks(name: str, dtype: torch.dtype) -> tuple[float | None, float | None]:
    """(peak TFLOP/s for dtype, peak TB/s) of a GPU by name; (None, None) when unknown."""
    for pattern, (tc, fp32, tbs) in DEVICE_PEAKS:
        if re.search(pattern, name):
            return (fp32 if dtype == torch.float32 else tc), tbs
    return None, None


def kernel_flops(kind: str, B: int, T: int, H: int, D: int, mode: str, chunk: int = 64) -> float:
    """FLOPs of one call (suites/README.md, "Speed"): causal softmax forward 2*B*T^2*H*D; chunked linear
    forward B*T*H*(2C(K+V) + 4KV) with chunk C (K = V = D). Backward: 2.5x forward for
    softmax (the FlashAttention-2 paper's count), 2x forward for the linear forms."""
    if kind == "softmax":
        fwd = 2.0 * B * T * T * H * D
        return fwd * (3.5 if mode == "fwdbwd" else 1.0)
    fwd = float(B * T * H * (2 * chunk * (D + D) + 4 * D * D))
    return fwd * (3.0 if mode == "fwdbwd" else 1.0)


def kernel_io_bytes(B: int, T: int, H: int, D: int, elem: int, mode: str) -> int:
    """Minimum memory traffic: read q, k, v, write o (forward); the backward also reads
    q, k, v, o, do and writes dq, dk, dv. Intermediate state traffic is not counted."""
    tensors = 4 + (8 if mode == "fwdbwd" else 0)
    return tensors * B * T * H * D * elem
