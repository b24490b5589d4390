"""`gla` -- linearize into Gated Linear Attention (Yang et al., arXiv 2312.06635).

q, k, v from the pretrained projections (no feature map, scale 1/sqrt(d)); a NEW
data-dependent per-channel forget gate g = logsigmoid(W2 W1 x + b) / 16 (rank 16,
tau 16: the GLA paper's defaults); a new per-head RMSNorm before o_proj. Recovery:
attention transfer (MSE) on gate and norm, then LoRA, as LoLCATs.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from linbench.methods.base import LinearConfig, LinearMethod
from linbench.methods.mixers import GatedMix, LowRankGate


@dataclass
class GLAConfig(LinearConfig):
    gate_rank: int = 16
    gate_tau: float = 16.0


class GLA(LinearMethod):
    name = "gla"
    config_cls = GLAConfig
    norm = True

    def build_mixer(self, heads, head_dim, hidden, layer, layers):
        c = self.config
        gate = LowRankGate(hidden, heads, head_dim, rank=c.gate_rank, tau=c.gate_tau)
        return GatedMix(nn.Identity(), nn.Identity(), gate, backend=c.backend)
