"""`gla` -- linearize into Gated Linear Attention (Yang et al., arXiv 2312.06635).

q, k, v from the pretrained projections (the paper: no feature map; linbench's default:
a new learnable Hedgehog map on q and k, `feature_map=identity` is the paper's form),
scale 1/sqrt(d); a NEW
data-dependent per-channel forget gate g = logsigmoid(W2 W1 x + b) / 16 (rank 16,
tau 16: the GLA paper's defaults); a new per-head RMSNorm before o_proj. Recovery:
attention transfer (MSE) on gate and norm, then LoRA, as LoLCATs.
"""
from __future__ import annotations

from dataclasses import dataclass

from linbench.methods.base import LinearConfig, LinearMethod
from linbench.methods.features import make_feature_maps
from linbench.methods.mixers import GatedMix, LowRankGate


@dataclass
class GLAConfig(LinearConfig):
    gate_rank: int = 16
    gate_tau: float = 16.0
    # on q and k, must keep head_dim. linbench's default is a learnable Hedgehog map (the
    # paper: "identity"), measured better after recovery (methods/README.md "Feature maps")
    feature_map: str = "hedgehog"


class GLA(LinearMethod):
    name = "gla"
    config_cls = GLAConfig
    norm = True

    def build_mixer(self, heads, head_dim, hidden, layer, layers):
        c = self.config
        gate = LowRankGate(hidden, heads, head_dim, rank=c.gate_rank, tau=c.gate_tau)
        fq, fk = make_feature_maps(c.feature_map, heads, head_dim)
        return GatedMix(fq, fk, gate, backend=c.backend)
