"""The method interface: linearize a pretrained model, then recover its quality."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar


@dataclass
class MethodConfig:
    """Every knob of a method, with the paper's default. Subclasses add fields."""


class Method:
    name: ClassVar[str]
    config_cls: ClassVar[type] = MethodConfig

    def __init__(self, config: MethodConfig | None = None):
        self.config = config if config is not None else self.config_cls()

    def config_dict(self) -> dict:
        return dataclasses.asdict(self.config)

    def linearize(self, model):
        """Swap attention modules in place and add the method's parameters."""
        raise NotImplementedError

    def recover(self, model, data, budget):
        """Run the recovery stages (attention transfer, LoRA) on `budget` tokens."""
        return model

    def needs_recovery(self) -> bool:
        return False

    def state_bytes(self, model, seqlen: int) -> int:
        """Bytes of recurrent state (or KV cache) per sequence at `seqlen` tokens."""
        raise NotImplementedError
