"""The suite interface: a suite measures a model and returns records, and declares how
the report shows its metrics (`Suite.meta()`, copied into every record it produces).

`shared_map` splits a suite's batches across the ranks of a torch.distributed run
(`linbench run --nproc N`, torchrun) and gathers the outcomes, so a suite that scores its
batches through it gives the one-process numbers with N processes (suites may not import
linbench.recovery.dist, the training side of the same rules). `world`, `gather_indexed`
and `contiguous_shares` are its parts, for suites that split work of uneven cost
(suites/prefix.py: lm-eval's model calls).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

KINDS = ("accuracy", "perplexity", "value")  # accuracy: a fraction in [0, 1], shown as %


@dataclass(frozen=True)
class MetricSpec:
    """How the report shows one metric; a derived metric also says how it is computed.

    Derived (`mean_of` set): the unweighted mean of `mean_of` (metrics of the same record)
    and `plus` ((suite, metric) pairs, taken from the newest ok record of that suite with
    the same base-model hash, method and dtype); n is the sum of theirs, stderr None. The
    report computes it when every input is there and the record does not carry it itself.
    `note` is printed under any table showing the metric; "{parent}" in it becomes the
    parent row's method.
    """
    name: str
    label: str | None = None          # column header (default: the name)
    higher_is_better: bool = True
    chance: float | None = None       # score of random guessing (0.25: 4-way choice); None: none
    kind: str = "value"               # one of KINDS
    note: str | None = None
    mean_of: tuple[str, ...] = ()
    plus: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"metric {self.name!r}: kind {self.kind!r} (choose from {KINDS})")

    def to_json(self) -> dict:
        derived = ({"mean_of": list(self.mean_of),
                    "plus": [{"suite": s, "metric": m} for s, m in self.plus]}
                   if self.mean_of else None)
        return {"name": self.name, "label": self.label or self.name,
                "higher_is_better": self.higher_is_better, "chance": self.chance,
                "kind": self.kind, "note": self.note, "derived": derived}


def accuracy(name: str, chance: float | None = None, **kw) -> MetricSpec:
    """A higher-is-better fraction in [0, 1] (shown as a percentage)."""
    return MetricSpec(name, chance=chance, kind="accuracy", **kw)


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
    prefix_reuse: bool = True       # lm-eval suites: compute shared prompt prefixes once


class Suite:
    name: ClassVar[str]
    version: ClassVar[str] = "1"    # bump when prompts or scoring change (comparability key)
    # Report metadata (class attributes; `meta()` hands them to the runner as JSON):
    metrics: ClassVar[tuple[MetricSpec, ...]] = ()  # in column order; undeclared ones follow
    primary: ClassVar[str | None] = None    # plotted against state size (default: the first)
    order: ClassVar[int | None] = None      # position among suites in the report (None: last)
    heatmaps: ClassVar[tuple[str, ...]] = ()  # details keys holding (length, depth) cell grids

    def config(self, ctx: RunContext) -> dict:
        """The resolved, hashable configuration of this suite under ctx."""
        return {"limit": ctx.limit, "seed": ctx.seed}

    def meta(self) -> dict:
        """What the report needs to know about this suite's metrics (order, direction,
        chance level, derived metrics); copied into every record the suite produces."""
        return {"metrics": [m.to_json() for m in self.metrics],
                "primary": self.primary or (self.metrics[0].name if self.metrics else None),
                "order": self.order, "heatmaps": list(self.heatmaps)}

    def run(self, model, tokenizer, ctx: RunContext) -> list[Record]:
        raise NotImplementedError


def world() -> tuple[int, int] | None:
    """(rank, world size) under an initialized torch.distributed run of more than one
    process; None otherwise (one process: callers keep their plain path)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return dist.get_rank(), dist.get_world_size()


def gather_indexed(mine: list[tuple[int, Any]], size: int) -> list:
    """Every rank's (index, value) pairs, exchanged with all_gather_object (keep values
    small and on the CPU), as one list of `size` values in index order, on every rank."""
    import torch.distributed as dist
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    out: list = [None] * size
    for part in parts:
        for i, value in part:
            out[i] = value
    return out


def contiguous_shares(costs: list[float], n: int) -> list[int]:
    """The rank (0..n-1) of each unit of work, in order: contiguous runs of units of about
    equal summed cost (a unit goes where the midpoint of its cost falls)."""
    total = float(sum(costs))
    if total <= 0:
        return [min(k * n // max(len(costs), 1), n - 1) for k in range(len(costs))]
    out, before = [], 0.0
    for c in costs:
        out.append(min(int(n * (before + c / 2) / total), n - 1))
        before += c
    return out


def shared_map(fn: Callable, items: list, wrap: Callable | None = None) -> list:
    """[fn(x) for x in items], in order, on every rank: under torch.distributed rank r
    computes items r, r+N, r+2N, ... and the outcomes are exchanged (all_gather_object:
    keep them small and on the CPU). Outcomes depend only on the item, so the result is the
    one-process result whatever N is. `wrap` wraps this rank's iteration (a progress bar).
    """
    wrap = wrap or (lambda it: it)
    if (w := world()) is None:
        return [fn(x) for x in wrap(items)]
    rank, n = w
    return gather_indexed([(i, fn(items[i])) for i in wrap(range(rank, len(items), n))], len(items))
