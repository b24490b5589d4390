"""`swa` -- the sliding-window baseline: softmax over the last 64 keys only, training-free.

Shows how much of a hybrid method's quality the window alone carries (methods/README.md, swa)."""
from __future__ import annotations

from dataclasses import dataclass

from linbench.methods.base import LinearConfig, LinearMethod
from linbench.methods.mixers import WindowSoftmax


@dataclass
class SWAConfig(LinearConfig):
    window: int = 64
    transfer: str | None = None
    lora_r: int = 0


class SWA(LinearMethod):
    name = "swa"
    role = "baseline"
    config_cls = SWAConfig

    def build_mixer(self, heads, head_dim, hidden, layer, layers):
        return WindowSoftmax(self.config.window, backend=self.config.backend)

    def window(self) -> int:
        return self.config.window
