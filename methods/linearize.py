"""Swap a model's attention layers for `LinearizedAttention` (the shared part of every
LinearMethod), and the bookkeeping that goes with it: the config record that makes the
model reloadable, and state sizes."""
from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface

from linbench.methods.attention import Heads, LinearizedAttention, linearized_layers
from linbench.assets.archs import CAUSAL_LM_CLASSES as SUPPORTED
from linbench.errors import LinbenchError


def unsupported(model, supported) -> LinbenchError:
    arch = type(model).__name__
    return LinbenchError(f"cannot linearize {arch}: supported architectures are {', '.join(supported)}")


def decoder_layers(model):
    if type(model).__name__ not in SUPPORTED:
        raise unsupported(model, SUPPORTED)
    return model.model.layers


def swap_attention(model, method):
    """Replace each decoder layer's self_attn (except the kept softmax layers) in place."""
    cfg = model.config
    layers = decoder_layers(model)
    keep = method.softmax_layers(len(layers))
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    for i, layer in enumerate(layers):
        if i in keep:
            continue
        base = layer.self_attn
        ref = base.q_proj.weight
        mixer = method.build_mixer(heads, head_dim, cfg.hidden_size, i, len(layers))
        new = LinearizedAttention(base, mixer, norm=method.norm, output_gate=method.output_gate)
        new.softmax_cls = type(base)  # what restore_softmax puts back
        # new parameters follow the model's device and dtype (Module.to swaps in new
        # Parameters where a data swap cannot, e.g. onto the meta device of a loader)
        new.to(device=ref.device)
        for p in new.new_parameters():
            p.data = p.data.to(dtype=ref.dtype)
        layer.self_attn = new
    cfg.linbench = {"method": method.name, "config": method.config_dict(),
                    "window": method.window(), "softmax_layers": sorted(keep)}
    set_attention_implementation(model)
    return model


# The attention implementation of a model with no softmax layer left. It is registered
# with transformers' AttentionInterface but has no mask function, so the model's forward
# builds no attention mask (masking_utils returns None for such implementations). A
# linearized layer ignores the mask; without this, every chunk of a long prefill would
# build a (chunk x tokens so far) causal mask for nobody: 4 kB per token of context at
# 4096-token chunks, the only part of a recurrent prefill's memory that grew with T.
NO_SOFTMAX = "linbench_no_softmax"


def _no_softmax_attention(module, *args, **kwargs):
    raise RuntimeError(f"{type(module).__name__} asked for softmax attention in a model "
                       f"whose attention implementation is {NO_SOFTMAX!r} (every layer linearized)")


AttentionInterface.register(NO_SOFTMAX, _no_softmax_attention)


def set_attention_implementation(model) -> None:
    """NO_SOFTMAX when every decoder layer is linearized; otherwise the model's softmax
    implementation (the one it had before linearizing: kept layers need their mask)."""
    cfg = model.config
    if cfg._attn_implementation != NO_SOFTMAX:
        model._linbench_softmax_attention = cfg._attn_implementation
    linear = all(isinstance(layer.self_attn, LinearizedAttention) for layer in decoder_layers(model))
    want = NO_SOFTMAX if linear else getattr(model, "_linbench_softmax_attention", None) or "sdpa"
    if cfg._attn_implementation != want:
        cfg._attn_implementation = want


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def softmax_twin(lin: LinearizedAttention) -> nn.Module:
    """The model's own softmax attention that `lin` replaced, rebuilt around lin's
    pretrained projections (the same modules, shared, not copied)."""
    with torch.device("meta"):
        attn = lin.softmax_cls(lin.config, lin.layer_idx)
    for name in PROJECTIONS:
        setattr(attn, name, getattr(lin, name))
    left = [n for n, t in [*attn.named_parameters(), *attn.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"cannot restore {lin.softmax_cls.__name__}: it has tensors besides "
                         f"{', '.join(PROJECTIONS)} ({', '.join(left)})")
    return attn.train(lin.training)


def restore_softmax(model, indices) -> None:
    """Put softmax attention back in the decoder layers `indices` (inverse of
    swap_attention there). The model's config then records them as kept layers, so a
    saved model reloads (methods.io) with exactly these layers softmax."""
    layers = decoder_layers(model)
    for i in indices:
        if isinstance(layers[i].self_attn, LinearizedAttention):
            layers[i].self_attn = softmax_twin(layers[i].self_attn)
    set_attention_implementation(model)
    rec = model.config.linbench
    fixed = [i for i in rec["config"]["keep_softmax_layers"] if isinstance(i, int)]
    model.config.linbench = {
        **rec, "softmax_layers": sorted(set(rec["softmax_layers"]) | set(indices)),
        "config": {**rec["config"], "keep_softmax_layers": tuple(sorted(set(fixed) | set(indices)))}}


def new_parameters(model) -> list[nn.Parameter]:
    return [p for m in linearized_layers(model) for p in m.new_parameters()]


def state_bytes(model, method, seqlen: int) -> int:
    """Recurrent state of every linearized layer + the KV cache of kept softmax layers."""
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    elem = next(model.parameters()).element_size()
    lin = linearized_layers(model)
    total = sum(m.mixer.state_bytes(heads, head_dim, seqlen, elem) for m in lin)
    softmax = cfg.num_hidden_layers - len(lin)
    return total + softmax * 2 * cfg.num_key_value_heads * head_dim * seqlen * elem


class MixerModule(nn.Module):
    """A mixer on bare (B, T, H, D) q, k, v: what the kernel-level speed sweep times.
    The layer input x that data-dependent gates read is stood in for by q."""

    def __init__(self, mixer: nn.Module, heads: int, head_dim: int):
        super().__init__()
        self.mixer, self.heads, self.head_dim = mixer, heads, head_dim

    flops_kind = "linear"  # the speed sweep's FLOP formula (suites/README.md, "Speed")

    def forward(self, q, k, v):
        B, T, H, D = q.shape
        h = Heads(q, k, v, q, k, q.reshape(B, T, H * D))
        return self.mixer(h, None, False)[0]

    def state_bytes(self, batch: int, seqlen: int, elem: int = 4) -> int:
        """Decode state of this one layer for `batch` sequences after `seqlen` tokens."""
        return batch * self.mixer.state_bytes(self.heads, self.head_dim, seqlen, elem)


def is_linearized(model) -> bool:
    return hasattr(model.config, "linbench")


__all__ = ["swap_attention", "restore_softmax", "set_attention_implementation", "NO_SOFTMAX", "softmax_twin", "new_parameters", "state_bytes",
           "MixerModule", "is_linearized", "SUPPORTED", "torch"]
