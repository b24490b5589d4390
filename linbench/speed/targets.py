"""What `linbench speed` times: kernel-level mixers and model-level prefill / decode.

A Target turns (mode, T) into a prepared zero-argument call: inputs are built here,
outside the timed region, and the call does only the work being measured.

- kernel level: a registered method's mixer, `Method().mixer(heads, head_dim,
  backend=...)`, an nn.Module with forward(q, k, v) -> o on (B, T, H, D) tensors; or an
  fla chunk op ("fla:gla" ...), the GPU peer (its Triton kernels do not run on a CPU).
- model level: the base model linearized by the method (`method.linearize(model)`, no
  recovery: speed does not depend on weights); prefill = `chunked_prefill` over T random
  ids (B = 1, chunks of `prefill_chunk` tokens, the cache carried, last logits only), so
  a linearized model's activations are O(chunk) and its peak memory flat in T, while the
  softmax parent's KV cache grows with T; decode = one-token steps from a cache at
  position T built by `decode_cache` (set-up, untimed).

Decode at T without paying a prefill of T tokens: a one-token step costs the same for
any cache of the right shape, so `decode_cache` prefills min(T, `decode_prefix`) real
tokens (chunked) and then advances the cache to position T (`advance_cache`): a KV
cache is tiled to T keys and values (the memory and the attention over T keys are
real), a recurrent layer only moves its position, which is exact for the mixers whose
state has a size independent of T (the method's state_bytes(T) equals its
state_bytes at the prefix; otherwise the whole T is prefilled for real). Each record
says which (details["setup"]).

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
    setup: Callable = lambda mode, T: None    # (mode, T) -> how the inputs were built (a dict)


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


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def chunked_prefill(model, ids, chunk: int = 4096, cache=None, logits_to_keep: int = 1):
    """Run a causal LM over ids (B, T) in chunks of `chunk` tokens with use_cache=True,
    each chunk continuing from the cache the previous one returned: activations are
    O(chunk), the recurrent state (or the KV cache, for softmax attention) is carried.
    Returns the last chunk's output: its logits are the last `logits_to_keep` positions
    of that chunk (of the prompt, when the chunk has at least that many tokens), its
    cache holds the whole prompt. Same results as one forward over ids (tests)."""
    if chunk < 1:
        raise ValueError(f"prefill chunk must be >= 1 token, got {chunk}")
    kw, out = _cache_kwarg(model), None
    for t0 in range(0, ids.shape[1], chunk):
        extra = {} if cache is None else {kw: cache}
        out = model(ids[:, t0:t0 + chunk], use_cache=True, logits_to_keep=logits_to_keep, **extra)
        cache = _cache_of(out)
    return out


def advance_cache(cache, T: int) -> None:
    """Move every layer of a prefilled cache to position T (see the module docstring): a
    key/value layer (transformers' DynamicLayer) is tiled to T keys and values, a
    recurrent layer (one with a `seen` counter and no keys) gets seen = T. Raises
    NotImplementedError for any other layer type."""
    from transformers.cache_utils import DynamicLayer
    for i, layer in enumerate(cache.layers):
        keys = getattr(layer, "keys", None)
        if type(layer) is DynamicLayer and torch.is_tensor(keys):  # (B, Hkv, P, D)
            P = keys.shape[-2]
            if P >= T:
                continue
            for name in ("keys", "values"):
                old = getattr(layer, name)
                new = old.new_empty(*old.shape[:-2], T, old.shape[-1])
                for t0 in range(0, T, P):
                    new[..., t0:t0 + P, :] = old[..., :T - t0, :]
                setattr(layer, name, new)
        elif keys is None and isinstance(getattr(layer, "seen", None), int):
            layer.seen = max(layer.seen, T)
        else:
            raise NotImplementedError(f"cannot advance cache layer {i} "
                                      f"({type(layer).__name__}) to position {T}")


def decode_cache(model, ids, T: int, *, chunk: int = 4096, prefix: int = 512,
                 state_is_constant: bool = False):
    """(cache at position T, how it was built) for a decode step after ids (B, T).

    The first min(T, prefix) ids are prefilled in chunks. Then a cache of key/value layers
    only, or one whose recurrent state does not grow with T (`state_is_constant`), is
    advanced to T (`advance_cache`); any other is prefilled over the remaining ids for real.
    """
    P = min(T, prefix)
    cache = _cache_of(chunked_prefill(model, ids[:, :P], chunk))
    recurrent = any(getattr(layer, "keys", None) is None for layer in cache.layers)
    if P == T:
        how = "real prefill"
    elif recurrent and not state_is_constant:
        chunked_prefill(model, ids[:, P:T], chunk, cache=cache)
        how = "real prefill (the state grows with T)"
    else:
        advance_cache(cache, T)
        how = f"{P} real tokens, cache advanced to position {T}"
    return cache, {"decode_prefix": P, "decode_cache": how}


def model_target(name, method, model, device, prefill_chunk: int = 4096,
                 decode_prefix: int = 512) -> Target:
    """Prefill / decode of a (linearized) causal LM at batch 1 (see the module docstring)."""
    c = model.config
    vocab = c.vocab_size
    cache_kw = _cache_kwarg(model)
    heads = c.num_attention_heads
    dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    built: dict = {}  # (mode, T) -> how the last prepare built its inputs

    def state_bytes(T):
        try:
            return int(method.state_bytes(model, T))
        except NotImplementedError:
            return None

    def prepare(mode, T):
        ids = torch.randint(vocab, (1, T), device=device)  # (1, T)
        built[mode, T] = {"prefill_chunk": prefill_chunk}
        if mode == "prefill":
            return (lambda: chunked_prefill(model, ids, prefill_chunk)), T
        P = min(T, decode_prefix)
        constant = state_bytes(T) is not None and state_bytes(T) == state_bytes(P)
        cache, how = decode_cache(model, ids, T, chunk=prefill_chunk, prefix=decode_prefix,
                                  state_is_constant=constant)  # set-up, outside the timed steps
        built[mode, T].update(how)
        tok = ids[:, -1:]  # (1, 1)

        def step():
            with torch.no_grad():
                model(tok, use_cache=True, **{cache_kw: cache})
        return step, 1

    return Target(name, "model", {"name": name, **method.config_dict()}, prepare, state_bytes,
                  min_bytes=lambda mode, T: state_bytes(T) or 0,
                  info={"batch": 1, "heads": heads, "dim": dim, "layers": c.num_hidden_layers},
                  setup=lambda mode, T: built.get((mode, T)))
