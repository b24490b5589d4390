"""`deltanet` -- the delta rule (Yang et al., arXiv 2406.06484).

q, k through SiLU + L2 norm; a new write strength beta_t = sigmoid(W_beta x_t) per head
(zero bias); S_t = S_{t-1}(I - beta_t k_t k_t^T) + beta_t v_t k_t^T computed in the WY
chunked form; a new per-head RMSNorm before o_proj. Recovery: transfer (MSE) on beta
and norm, then LoRA.
"""
from __future__ import annotations

from dataclasses import dataclass

from linbench.methods.base import LinearConfig, LinearMethod
from linbench.methods.features import make_feature_map
from linbench.methods.mixers import DeltaMix


@dataclass
class DeltaNetConfig(LinearConfig):
    feature_map: str = "silu_l2"


class DeltaNet(LinearMethod):
    name = "deltanet"
    config_cls = DeltaNetConfig
    norm = True

    def build_mixer(self, heads, head_dim, hidden, layer, layers):
        c = self.config
        fm = make_feature_map(c.feature_map, heads, head_dim)
        return DeltaMix(fm, fm, hidden, heads, backend=c.backend)
