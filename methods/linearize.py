"""Swap a model's attention layers for `LinearizedAttention` (the shared part of every
LinearMethod), and the bookkeeping that goes with it: the config record that makes the
model reloadable, and state sizes."""
from __future__ import annotations

import torch
from torch import nn

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
        for p in new.new_parameters():  # new parameters follow the model's device and dtype
            p.data = p.data.to(device=ref.device, dtype=ref.dtype)
        new.to(device=ref.device)
        layer.self_attn = new
    cfg.linbench = {"method": method.name, "config": method.config_dict(),
                    "window": method.window(), "softmax_layers": sorted(keep)}
    return model


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


__all__ = ["swap_attention", "new_parameters", "state_bytes", "MixerModule", "is_linearized",
           "SUPPORTED", "torch"]
