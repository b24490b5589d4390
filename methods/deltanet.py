"""`deltanet` -- the delta rule (Yang et al., arXiv 2406.06484).

q, k through SiLU + L2 norm (the paper's form, `feature_map=silu_l2`; linbench's default is
a learnable Hedgehog map, see methods/README.md "Feature maps"); a new write strength beta_t = sigmoid(W_beta x_t) per head
(zero bias); S_t = S_{t-1}(I - beta_t k_t k_t^T) + beta_t v_t k_t^T computed in the WY
chunked form; a new per-head RMSNorm before o_proj. Recovery: transfer (MSE) on beta
and norm, then LoRA.
"""
from __future__ import annotations

from dataclasses import dataclass

from linbench.methods.base import LinearConfig, LinearMethod
from linbench.methods.features import make_feature_maps
from linbench.methods.mixers import DeltaMix


@dataclass
class DeltaNetConfig(LinearConfig):
    # on q and k (one map each). linbench's default is a learnable Hedgehog map (the
    # paper: "silu_l2"), measured better after recovery (methods/README.md "Feature maps")
    feature_map: str = "hedgehog"


class DeltaNet(LinearMethod):
    name = "deltanet"
    config_cls = DeltaNetConfig
    norm = True

    def build_mixer(self, heads, head_dim, hidden, layer, layers):
        c = self.config
        fq, fk = make_feature_maps(c.feature_map, heads, head_dim)  # one each (learnable maps)
        return DeltaMix(fq, fk, hidden, heads, backend=c.backend)
