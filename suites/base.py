"""The suite interface: a suite measures a model and returns records."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass
class Metric:
    value: float
    stderr: float | None
    n: int


@dataclass
class Record:
    """What one suite measured on one model: metrics plus suite-specific details."""
    suite: str
    metrics: dict[str, Metric]
    details: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"  # ok | oom | timeout | error

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RunContext:
    """Everything a suite may need besides the model: limits, device, seeds, progress."""
    limit: int | None = None        # per-subject / per-task example cap (None: all)
    batch_size: int = 8
    seed: int = 1234
    device: str = "cpu"
    dtype: str = "float32"
    progress: bool = True
    work_dir: str | None = None     # scratch space private to this (model, method) run


class Suite:
    name: ClassVar[str]
    version: ClassVar[str] = "1"    # bump when prompts or scoring change (comparability key)

    def config(self, ctx: RunContext) -> dict:
        """The resolved, hashable configuration of this suite under ctx."""
        return {"limit": ctx.limit, "seed": ctx.seed}

    def meta(self) -> dict:
        """What the report needs to know about this suite's metrics (order, direction,
        chance level, derived metrics); copied into every record the suite produces."""
        return {}

    def run(self, model, tokenizer, ctx: RunContext) -> list[Record]:
        raise NotImplementedError
