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

The fla peers are listed in linbench.speed.peers; the FLOP / bytes model of the GPU rows
is linbench.speed.roofline (suites/README.md, "Speed").
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

from linbench.speed.timing import prepared_call

KERNEL_MODES = ("fwd", "fwdbwd")
MODEL_MODES = ("prefill", "decode")


@dataclass
class Target:
    name: str                                # method name, or "fla:<op>"
    level: str                               # "kernel" | "model"
    config: dict                             # hashed with every record (method config)
    prepare: Callable                        # (mode, T) -> (zero-argument call, tokens per call)
    state_bytes: Callable = lambda T: None   # (T) -> bytes of state / KV cache per sequence
    flops_kind: str | None = None            # "softmax" | "linear" (linbench.speed.roofline)
    flops: Callable | None = None            # optional (batch, T, mode) -> FLOPs, from the mixer
    min_bytes: Callable = lambda mode, T: 0  # lower bound of the memory a shape needs
    info: dict = field(default_factory=dict)  # extra record details (shape of the model ...)


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
        return prepared_call(mixer, _qkv(B, T, H, D, dtype, device, grad),
                             params if grad else [], mode), B * T

    def state_bytes(T):
        fn = getattr(mixer, "state_bytes", None)
        return int(fn(B, T, elem)) if callable(fn) else None

    flops = getattr(mixer, "flops", None)
    return Target(name, "kernel", {"name": name, **method.config_dict()}, prepare,
                  state_bytes, getattr(mixer, "flops_kind", "linear"),
                  flops if callable(flops) else None,
                  lambda mode, T: (4 if mode == "fwd" else 8) * B * T * H * D * elem)


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


def fla_target(name, B, H, D, dtype, device) -> Target:
    """The fla peer `name` of linbench.speed.peers as a kernel-level target."""
    from linbench.speed.peers import FLA_PEERS, fla_version
    peer = FLA_PEERS[name]
    op = peer.function()
    elem = torch.empty((), dtype=dtype).element_size()

    def prepare(mode, T):
        grad = mode == "fwdbwd"
        inputs = [x.requires_grad_(grad) for x in peer.inputs(B, T, H, D, dtype, device)]
        return prepared_call(op, inputs, [], mode), B * T

    return Target(name, "kernel", {"name": name, "op": f"fla.ops.{peer.op}",
                                   "kwargs": peer.kwargs, "fla": fla_version()},
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
