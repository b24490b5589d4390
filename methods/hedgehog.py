"""`hedgehog` -- "The Hedgehog & the Porcupine" (Zhang et al., arXiv 2402.04347, ICLR 2024).

Pure normalized linear attention on learned spiky feature maps,
phi(x) = [softmax(x W_h) ; softmax(-x W_h)], separate maps for q and k after RoPE.
Stage 1 distills the softmax attention WEIGHTS (cross-entropy, soft labels), stage 2 is
LoRA as in LoLCATs.
"""
from __future__ import annotations

from dataclasses import dataclass

from linbench.methods.base import LinearConfig, LinearMethod
from linbench.methods.features import make_feature_maps
from linbench.methods.mixers import LinearMix


@dataclass
class HedgehogConfig(LinearConfig):
    feature_map: str = "hedgehog"    # two softmaxes; "hedgehog_joint" is fla's one-softmax variant
    feature_dim: int | None = None   # features of phi; None = head_dim (f = head_dim / 2 per softmax)
    transfer: str | None = "ce"      # attention-weight distillation (the paper's stage 1)
    transfer_weight: float = 1.0


class Hedgehog(LinearMethod):
    name = "hedgehog"
    config_cls = HedgehogConfig

    def build_mixer(self, heads, head_dim, hidden, layer, layers):
        c = self.config
        fq, fk = make_feature_maps(c.feature_map, heads, head_dim, c.feature_dim)
        return LinearMix(fq, fk, normalize=True, scale=1.0, backend=c.backend)
