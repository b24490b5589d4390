"""`liger` -- "Liger: Linearizing LLMs to Gated Recurrent Structures" (arXiv 2503.01496).

No new parameters: q and k pass a softmax over the head dimension (before RoPE, as the
reference code does), the forget gate comes from the pretrained key projection
(GLA form: g = logsigmoid(k) / 16), and Liger Attention is 0.5 x gated linear attention
+ 0.5 x sliding-window softmax (window 64, RoPE'd q, k). One recovery stage: LoRA r 8,
alpha 8 on q, k, v, lr 1e-3. `softmax_every=7` gives Liger-H.
Unlike the reference code, the model config is the base model's and the window branch
keeps its cache while decoding.
"""
from __future__ import annotations

from dataclasses import dataclass

from linbench.methods.base import LinearConfig, LinearMethod
from linbench.methods.features import make_feature_map
from linbench.methods.mixers import GatedMix, KeyGate, MixSum, WindowSoftmax


@dataclass
class LigerConfig(LinearConfig):
    window: int = 64
    gate: str = "gla"                # gla | mamba2 | hgrn2 | rwkv6 (Liger Table 1)
    gate_tau: float = 16.0
    linear_weight: float = 0.5       # the window branch gets 1 - linear_weight
    transfer: str | None = None
    lora_alpha: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    lora_lr: float = 1e-3


class Liger(LinearMethod):
    name = "liger"
    config_cls = LigerConfig

    def build_mixer(self, heads, head_dim, hidden, layer, layers):
        c = self.config
        fm = make_feature_map("softmax_head", heads, head_dim)
        gla = GatedMix(fm, fm, KeyGate(c.gate_tau, form=c.gate), pre_rope=True, backend=c.backend)
        swa = WindowSoftmax(c.window, backend=c.backend)
        # a branch of weight 0 (linear_weight 1.0: no SWA, the paper's ablation; 0.0: SWA
        # only) is not built: it would cost time and a decode state and add exactly 0
        return MixSum([(w, m) for w, m in ((c.linear_weight, gla), (1 - c.linear_weight, swa))
                       if w != 0])

    def window(self) -> int:
        return self.config.window
