"""`lightning` -- Lightning Attention / TransNormerLLM (arXiv 2401.04658, 2307.14995).

Linear attention with a fixed per-head exponential decay and no normalizer,
S_t = lambda_h S_{t-1} + k_t v_t^T, o_t = S_t^T q_t, lambda_h = exp(-s_h); q, k through
a new learnable Hedgehog map (linbench's default, measured better after recovery;
`feature_map=silu` is TransNormerLLM's); a new per-head RMSNorm before o_proj; an output gate as an option (the pretrained
model has no gate weights). Slopes: ALiBi's s_h = 2^(-8(h+1)/H) in every layer (the
Lightning reference, default) or fla's layer-dependent (8/H)(1 - l/L) h.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from linbench.methods.base import LinearConfig, LinearMethod, OptionalOutputGate
from linbench.methods.features import make_feature_maps
from linbench.methods.mixers import LinearMix

SLOPES = ("alibi", "fla")


def slopes(rule: str, heads: int, layer: int, layers: int) -> torch.Tensor:
    """Per-head decay rates s_h >= 0 (lambda_h = exp(-s_h))."""
    h = torch.arange(heads, dtype=torch.float32)
    if rule == "alibi":
        return 2.0 ** (-8.0 * (h + 1) / heads)
    if rule == "fla":
        return (8.0 / heads) * (1 - layer / layers) * h
    raise ValueError(f"unknown slope rule {rule!r}; valid: {', '.join(SLOPES)}")


@dataclass
class LightningConfig(LinearConfig):
    slope_rule: str = "alibi"
    gate: bool = False               # TransNormerLLM's output gate (new, 1 at start)
    feature_map: str = "hedgehog"    # on q and k (TransNormerLLM: silu; methods/README.md)


class Lightning(OptionalOutputGate, LinearMethod):
    name = "lightning"
    config_cls = LightningConfig
    norm = True

    def build_mixer(self, heads, head_dim, hidden, layer, layers):
        c = self.config
        decay = -slopes(c.slope_rule, heads, layer, layers)  # log-decay per head
        fq, fk = make_feature_maps(c.feature_map, heads, head_dim)
        return LinearMix(fq, fk, normalize=False, log_decay=decay, backend=c.backend)
