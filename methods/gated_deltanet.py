"""`gated_deltanet` -- Gated Delta Networks (Yang, Kautz, Hatamizadeh, arXiv 2412.06464).

DeltaNet's layer (q, k through SiLU + L2 norm in the paper, `feature_map=silu_l2`;
linbench's default is a learnable Hedgehog map, see methods/README.md "Feature maps"; a
new write strength beta_t = sigmoid(W_beta x_t) per head) with a new data-dependent
decay per head in Mamba2's form, a_t = exp(-exp(A_log) softplus(W_a x_t + dt_bias)),
started near 1 (GatedDeltaMix):
    S_t = a_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,   o_t = S_t q_t,
computed by the delta rule kernels with the log-gate g_t = log a_t. Then a new per-head
RMSNorm and, by default, a new output gate (1 at start) before o_proj. Recovery: transfer
(MSE) on beta, the decay, the norm and the gate, then LoRA, as deltanet.
"""
from __future__ import annotations

from dataclasses import dataclass

from linbench.methods.base import LinearConfig, LinearMethod, OptionalOutputGate
from linbench.methods.features import make_feature_maps
from linbench.methods.mixers import GatedDeltaMix


@dataclass
class GatedDeltaNetConfig(LinearConfig):
    feature_map: str = "hedgehog"    # the paper: silu_l2
    dt_min: float = 1e-3             # Mamba2's dt range (arXiv 2405.21060), log-spaced over heads
    dt_max: float = 0.1
    a_init: float = 1.0              # exp(A_log) at start (the paper's code: A ~ U(0, 16))
    gate: bool = True                # the paper's output gate (here o * 2 sigmoid(W x), W = 0)


class GatedDeltaNet(OptionalOutputGate, LinearMethod):
    name = "gated_deltanet"
    config_cls = GatedDeltaNetConfig
    norm = True

    def build_mixer(self, heads, head_dim, hidden, layer, layers):
        c = self.config
        fq, fk = make_feature_maps(c.feature_map, heads, head_dim)  # one each (learnable maps)
        return GatedDeltaMix(fq, fk, hidden, heads, dt_min=c.dt_min, dt_max=c.dt_max,
                             a_init=c.a_init, backend=c.backend)
