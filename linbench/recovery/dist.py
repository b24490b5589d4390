"""Distributed runs on torch.distributed: N processes (torchrun, or `linbench run --nproc N`
through torch's elastic launcher), one model replica per process for evaluation,
data-parallel recovery with the model sharded per decoder layer by FSDP2.

    world()              (rank, size, local rank) of this process; size 1 when not launched
    init(device)         join the process group torchrun's environment describes (gloo on
                         CPU, NCCL on CUDA); the device this rank uses
    is_writer()          rank 0: the only process that writes checkpoints and records
    shard_rows(rows)     this rank's rows of a global batch: rows r, r+N, r+2N, ...
    all_reduce_grads(ps) average the gradients of replicated parameters over the ranks
    clip_grads(ps, max)  clip_grad_norm_ over sharded and replicated gradients alike
    parallel(model, ps)  FSDP2 for the length of a training stage: fully_shard on every
                         decoder layer, then on the root, and the plain model back after
    launch(n, args)      `python -m linbench <args>` in n processes (elastic_launch)
    alone()              inside it this process acts as a world of one (no collectives):
                         block-wise transfer's ranks each train their own blocks

Suites split their work with linbench.suites.base.shared_map (all_gather_object of
per-batch outcomes; suites may not import this package).

Recovery sharding: `fully_shard` on each decoder layer, then on the root. The parameters
outside the decoder layers (embeddings, final norm, LM head: small, and usually tied
between the embedding and the head, which FSDP cannot place in two units) stay
replicated: `ignored_params` of the root, their gradients averaged by
`all_reduce_grads` -- the DDP rule. Where FSDP2 cannot be used, every parameter is
replicated and all-reduced the same way, through the same training loop; the stage record
says which ran ("fsdp2" or "replicate"): for losses that do not flow through the model's
forward output (attention transfer reads the loss each layer leaves behind: FSDP2's
backward hooks, registered on forward inputs and outputs, never run and the gradients
never reach the shards), when no decoder layers are found, or with
LINBENCH_PARALLEL=replicate. The LoRA stage (cross-entropy of the output) runs FSDP2.

The ranks together train on the global batch the budget names (each on its rows, as
micro-batches of at most the budget's micro) and each validates on all held-out rows, so
the loss curve, the early-stopping decisions and the kept weights are those of one process
at that batch: up to float summation order, and bit for bit against one process run with
micro = batch / N when N is a power of two (scaling by 1/N is exact then). fully_shard has no inverse in
torch: `parallel` saves each module's class and attribute dict before sharding and puts
them back after, with the values gathered (DTensor.full_tensor) into the original
parameter objects, so later stages, the checkpoint writer and the suites see a plain
module. While sharded, each rank holds only its shards of the decoder layers (the full
copies are freed): that is the memory FSDP saves. A stage that fails under FSDP2 leaves
the model unusable -- and ends the distributed run anyway.
"""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass

import torch

from linbench.errors import LinbenchError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0


_ALONE = [False]


def world() -> World:
    """This process's place in the process group (size 1 when there is none, or inside
    `alone()`)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and not _ALONE[0]:
        return World(dist.get_rank(), dist.get_world_size(),
                     int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return World()


@contextlib.contextmanager
def alone():
    """Within: world() is a world of one, so the training loop runs this process's work
    on whole batches with no collective (block-wise transfer over ranks: each rank trains
    different blocks; linbench.recovery.blockwise). The caller synchronizes after."""
    before, _ALONE[0] = _ALONE[0], True
    try:
        yield
    finally:
        _ALONE[0] = before


def launched() -> bool:
    """True in a process started by torchrun / elastic_launch with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str) -> str:
    """Join the process group described by torchrun's environment variables (RANK,
    WORLD_SIZE, MASTER_ADDR, ...); return the device this rank uses ("cuda" -> its local
    GPU). NCCL on CUDA, gloo on CPU. A no-op outside a multi-process launch."""
    import torch.distributed as dist
    if not launched():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if ":" not in device:
            device = f"cuda:{local}"
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def finish() -> None:
    """Leave the process group (every rank, at the end of a run)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_writer() -> bool:
    return world().rank == 0


def broadcast(obj):
    """Rank 0's `obj` on every rank (a decision only the writer can take: cache hits)."""
    if world().size == 1:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_batch(batch: int, n: int | None = None) -> None:
    """The global batch must split evenly over the n ranks (one line, exit 2, otherwise)."""
    n = n or world().size
    if batch % n:
        raise LinbenchError(f"recovery batch {batch} does not split over --nproc {n} "
                            f"processes: give a budget batch= that is a multiple of {n}")


def shard_rows(rows: torch.Tensor) -> torch.Tensor:
    """Rows r, r+N, ... of a global batch for rank r of N (all of them for one process)."""
    w = world()
    return rows if w.size == 1 else rows[w.rank::w.size]


def _sum(t: torch.Tensor) -> torch.Tensor:
    """all_reduce(SUM) of a small CPU tensor (through the GPU under NCCL, which needs it)."""
    import torch.distributed as dist
    if dist.get_backend() == "nccl":
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(t)
    return t.cpu()


def mean(value: float) -> float:
    """The mean of a float over the ranks."""
    w = world()
    if w.size == 1:
        return value
    return float(_sum(torch.tensor([value], dtype=torch.float64))) / w.size


def all_reduce_grads(params) -> None:
    """Average the (plain, replicated) gradients over the ranks, in place; DTensor
    gradients (FSDP-sharded parameters) are already reduced and are skipped."""
    w = world()
    if w.size == 1:
        return
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    for p in params:
        if p.grad is not None and not isinstance(p.grad, DTensor):
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(w.size)


def clip_grads(params, max_norm) -> float:
    """torch.nn.utils.clip_grad_norm_ for a mix of sharded (DTensor) and replicated
    gradients: the total norm over the whole model, the same clip factor on every rank;
    returns the norm before clipping."""
    from torch.distributed.tensor import DTensor
    grads = [p.grad for p in params if p.grad is not None]

    def squares(gs) -> torch.Tensor:  # sum of squares, fp64, one device->host copy
        parts = [g.detach().double().pow(2).sum() for g in gs]
        return torch.stack(parts).sum().cpu() if parts else torch.zeros((), dtype=torch.float64)
    sharded = squares(g.to_local() for g in grads if isinstance(g, DTensor))
    whole = squares(g for g in grads if not isinstance(g, DTensor))
    if world().size > 1:
        sharded = _sum(sharded)
    norm = float((sharded + whole).sqrt())
    if max_norm is not None and max_norm > 0 and grads:
        coef = min(1.0, max_norm / (norm + 1e-6))  # torch's clip_grad_norm_ rule
        if coef < 1.0:
            with torch.no_grad():
                for g in grads:
                    g.mul_(coef)
    return norm


def describe() -> dict:
    """This run's parallel setup, for the records' provenance."""
    import torch.distributed as dist
    return {"world_size": world().size, "backend": dist.get_backend(),
            "recovery": os.environ.get("LINBENCH_PARALLEL", "fsdp2"),
            "suites": "batches split across ranks where the suite uses shared_map"}


def decoder_layers(model) -> list:
    """The decoder layers (FSDP units): modules whose class name ends in DecoderLayer."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def mode(model) -> str:
    """Which parallelism `parallel` uses for this model: "fsdp2" or "replicate"."""
    if os.environ.get("LINBENCH_PARALLEL", "fsdp2") == "replicate" or not decoder_layers(model):
        return "replicate"
    return "fsdp2"


@contextlib.contextmanager
def parallel(model, params: dict, shardable: bool = True):
    """Yield (params, mode): the named trainable parameters to optimize (sharded DTensors
    under FSDP2) and "none" | "fsdp2" | "replicate". On a normal exit the trained values are
    gathered into the original parameters and the model is plain again. shardable=False:
    replicate (the loss does not flow through the forward outputs FSDP2 hooks)."""
    w = world()
    if w.size == 1:
        yield params, "none"
        return
    how = mode(model) if shardable else "replicate"
    if how == "replicate":
        yield params, how
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (w.size,))
    layers = decoder_layers(model)
    inside = {id(p) for layer in layers for p in layer.parameters()}
    outside = {p for p in model.parameters() if id(p) not in inside}
    saved = {m: (m.__class__, {k: copy.copy(v) if isinstance(v, dict) else v
                               for k, v in m.__dict__.items()}) for m in model.modules()}
    originals = dict(model.named_parameters())
    ok = False
    try:
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh, ignored_params=outside)
        named = dict(model.named_parameters())
        for n, p in named.items():  # the shards hold the values now: free the full copies
            if isinstance(p, DTensor):
                originals[n].data = originals[n].data.new_empty(0)
        yield {n: named[n] for n in params}, how
        ok = True
    finally:
        if ok:  # collective: only when every rank got here (an error tears the group down)
            with torch.no_grad():
                for n, p in model.named_parameters():  # layer by layer: one full copy at a time
                    if isinstance(p, DTensor):
                        originals[n].data = p.full_tensor()
        _unshard(saved)


def _unshard(saved: dict) -> None:
    """Put back each module's class and attributes (hooks, parameters) from before
    fully_shard, and forget its FSDP state."""
    from torch.distributed import _composable_state
    for m, (cls, attrs) in saved.items():
        _composable_state._module_state_mapping.pop(m, None)
        m.__class__ = cls
        m.__dict__.clear()
        m.__dict__.update({k: copy.copy(v) if isinstance(v, dict) else v for k, v in attrs.items()})


def launch(nproc: int, args: list[str], module: str = "linbench") -> None:
    """Run `python -m <module> <args>` in `nproc` processes on this machine through torch's
    elastic launcher (torchrun's standalone mode: c10d rendezvous on a free local port, no
    restarts); each child joins the group in `init`. A failed child stops the others and
    becomes one LinbenchError line naming the rank and its exit code (its own output,
    traceback included, is above it); exit code 1."""
    import sys

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    from linbench.kernels.distributed import local_launch_config
    config = local_launch_config(nproc, monitor_interval=0.2)
    try:
        elastic_launch(config, sys.executable)("-m", module, *args)
    except ChildFailedError as e:
        rank, failure = min(e.failures.items(), key=lambda kv: kv[1].timestamp)
        err = LinbenchError(f"--nproc {nproc}: rank {rank} exited first, with code "
                            f"{failure.exitcode} (its output is above); the other ranks were "
                            f"stopped; finished records and checkpoints are kept, nothing "
                            f"half-written")
        err.exit_code = failure.exitcode if failure.exitcode == 2 else 1  # 2: bad input
        raise err from None
