"""Block-wise attention transfer (`transfer_blocks = K`; LoLCATs' recipe for its 70B and
405B models, arXiv 2410.10254): stage 1 cut into blocks of K decoder layers that train
one after another, each on its own cached inputs.

Attention transfer feeds every layer the teacher's hidden states (each linearized layer
passes the softmax output on), so a layer's loss depends on nothing downstream and on
nothing upstream but those hidden states. Hence:

1. `write_cache`: one no-grad forward of the model over the transfer rows (training and
   held-out), with every linearized layer in transfer mode, records the hidden states
   entering the first layer of each block and writes them to disk in shards, one
   safetensors file per (split, block, shard of rows), then a manifest (atomic writes;
   the manifest marks a complete cache). The forward stops at the last block's input.
   (Transfer mode also computes each layer's student output, which this pass discards.)
2. `train_block`: the decoder body runs with only that block's K layers installed
   (embedding and the other layers are not run), fed the cached rows; the block's new
   parameters train with `train.fit`, exactly as the joint stage's would. Activations
   and gradients are the block's only; the weights of the whole model stay where the
   caller loaded them (loading one block's weights at a time is not done here).
3. Each finished block's new parameters go to a file (the resume point and what
   `stitch` loads into the full model before LoRA); the cache is removed at the end,
   the block files once the stage checkpoint is written (recovery.stages).

Equivalence with the joint stage: the joint loss is transfer_weight x the MEAN over the
L linearized layers; a block's loss is transfer_weight x the SUM over its layers / L,
so every layer's gradient is the joint one's. Gradient clipping at max_grad_norm clips
each block's own gradient norm (the joint stage clips the norm over all layers), and
validation, early stopping and best-weight restore are per block. Without clipping
(max_grad_norm = 0) and with best weights at the same step, 1-layer blocks give the
joint stage's parameters (tests/recovery/test_blockwise.py).

Ranks (`linbench run --nproc N` / torchrun, LoLCATs' recipe of one block per GPU):
`blocks_for(n, rank, world)` gives each rank a contiguous run of blocks; a rank caches
and trains only its own (`train_blocks`), each block on the whole global batch with no
collective (recovery.dist.alone: the same steps one process takes), and after a barrier
every rank stitches all block files from the shared checkpoint dir (`finish`), so every
rank ends with the one-process model (tests/recovery/test_distributed.py). Each block's
record says which rank trained it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from linbench.errors import LinbenchError
from linbench.recovery.train import Objective, Plan, Result, autocast, fit

SHARD_BYTES = 256 << 20    # rows per cache shard: as many as fit in this many bytes


def blocks(model, k: int) -> list[list[int]]:
    """Decoder-layer indices of each block of k consecutive layers that holds at least
    one linearized layer (a block of kept softmax layers has nothing to train)."""
    from linbench.methods.attention import LinearizedAttention
    from linbench.methods.linearize import decoder_layers
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise LinbenchError(f"transfer_blocks: bad value {k!r}; valid: 0 (joint transfer) or "
                            f"a whole number of decoder layers per block >= 1")
    layers = decoder_layers(model)
    out = [list(range(s, min(s + k, len(layers)))) for s in range(0, len(layers), k)]
    return [b for b in out if any(isinstance(layers[i].self_attn, LinearizedAttention) for i in b)]


def blocks_for(n: int, rank: int, world: int) -> list[int]:
    """The blocks rank `rank` of `world` trains: a contiguous run, sizes within one of
    each other, every block exactly once over all ranks (a rank may get none)."""
    if world < 1 or not 0 <= rank < world:
        raise LinbenchError(f"blocks_for: bad rank {rank} of world {world}; valid: 0 <= rank < world")
    lo, extra = divmod(n, world)
    start = rank * lo + min(rank, extra)
    return list(range(start, start + lo + (rank < extra)))


# -- the cache of block inputs -------------------------------------------------------------
class BlockInputs:
    """The cached hidden states entering one block for one split, as a read-only
    (rows, T, C) array: slicing rows reads only the shards they lie in (what `fit` and
    `evaluate` need: `.shape` and `[a:b]`)."""

    def __init__(self, folder: Path, split: str, block: int, rows: int, shard_rows: int, shape):
        self.folder, self.split, self.block = Path(folder), split, block
        self.rows, self.shard_rows = rows, shard_rows
        self.shape = torch.Size((rows, *shape))

    def path(self, shard: int) -> Path:
        return self.folder / f"{self.split}.b{self.block}.s{shard}.safetensors"

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, rows: slice) -> torch.Tensor:
        a, b, step = rows.indices(self.rows)
        if step != 1:
            raise IndexError("BlockInputs takes contiguous row slices")
        parts = []
        for s in range(a // self.shard_rows, -(-b // self.shard_rows)):
            lo = max(a - s * self.shard_rows, 0)
            hi = min(b - s * self.shard_rows, self.shard_rows)
            with safe_open(str(self.path(s)), "pt") as f:
                parts.append(f.get_slice("h")[lo:hi])
        return torch.cat(parts) if len(parts) != 1 else parts[0]


def _fingerprint(splits: dict, starts: list[int], dtype) -> str:
    h = hashlib.sha256(json.dumps([starts, str(dtype)]).encode())
    for name, ids in sorted(splits.items()):
        h.update(name.encode() + ids.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _atomic(path: Path, write) -> None:
    """write(tmp), then rename: readers see the whole file or none (tmp per process)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


class _Stop(Exception):
    """Raised once the last block's input is captured: the rest of the forward is not needed."""


@torch.no_grad()
def write_cache(model, splits: dict, starts: list[int], folder, plan: Plan,
                shard_bytes: int = SHARD_BYTES) -> dict:
    """Run the model over `splits` ({"train": ids, "val": ids}, (rows, T) each) with every
    linearized layer in transfer mode and write the hidden states entering decoder layers
    `starts` to `folder`; return the manifest. A complete cache with the same
    fingerprint (rows, starts, dtype) is reused as it is."""
    from linbench.methods.attention import linearized_layers
    from linbench.methods.linearize import decoder_layers
    folder = Path(folder)
    key = _fingerprint(splits, starts, plan.dtype)
    done = folder / "cache.json"
    if done.exists():
        meta = json.loads(done.read_text())
        if meta.get("key") == key:
            return meta
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    layers, lin = decoder_layers(model), linearized_layers(model)
    body = model.get_decoder() if hasattr(model, "get_decoder") else model
    seen: dict[int, torch.Tensor] = {}

    def hook(b):
        def pre(module, args, kwargs):
            seen[b] = (args[0] if args else kwargs["hidden_states"]).detach().to("cpu")
            if b == len(starts) - 1:
                raise _Stop
        return pre

    hooks = [layers[s].register_forward_pre_hook(hook(b), with_kwargs=True)
             for b, s in enumerate(starts)]
    meta = {"key": key, "starts": starts, "rows": {}, "shard_rows": None, "shape": None}
    for layer in lin:
        layer.transfer = "mse"   # passes the teacher output on (any loss would: one is enough)
    try:
        for split, ids in splits.items():
            pending: list[list[torch.Tensor]] = [[] for _ in starts]
            shard, held = 0, 0

            def flush(final: bool):
                nonlocal shard, held
                n = meta["shard_rows"]
                while held >= n or (final and held):
                    for b in range(len(starts)):
                        rows = torch.cat(pending[b])
                        path = BlockInputs(folder, split, b, 0, 1, ()).path(shard)
                        _atomic(path, lambda p, t=rows[:n]: save_file({"h": t.contiguous()}, str(p)))
                        pending[b] = [rows[n:]] if rows.shape[0] > n else []
                    shard, held = shard + 1, max(0, held - n)

            for i in range(0, ids.shape[0], plan.micro):
                try:
                    with autocast(plan.device, plan.dtype):
                        body(input_ids=ids[i:i + plan.micro].to(plan.device), use_cache=False)
                except _Stop:
                    pass
                if meta["shape"] is None:
                    h = seen[0]
                    meta["shape"], meta["dtype"] = list(h.shape[1:]), str(h.dtype)
                    meta["shard_rows"] = max(1, shard_bytes // (h[0].numel() * h.element_size()))
                for b in range(len(starts)):
                    pending[b].append(seen.pop(b))
                held += pending[0][-1].shape[0]
                flush(False)
            flush(True)
            meta["rows"][split] = int(ids.shape[0])
    finally:
        for h in hooks:
            h.remove()
        for layer in lin:
            layer.transfer, layer.transfer_loss = None, None
    _atomic(done, lambda p: p.write_text(json.dumps(meta)))
    return meta


def inputs(folder, meta: dict, split: str, block: int) -> BlockInputs:
    return BlockInputs(folder, split, block, meta["rows"][split], meta["shard_rows"], meta["shape"])


# -- training one block, stitching ---------------------------------------------------------
@contextlib.contextmanager
def _only(body, idx: list[int]):
    """The decoder body holds only the layers `idx` (so only they run), restored after."""
    full = body.layers
    body.layers = nn.ModuleList([full[i] for i in idx])
    try:
        yield
    finally:
        body.layers = full


def block_parameters(model, idx: list[int]) -> dict:
    """name -> new parameter of the linearized layers among decoder layers `idx`."""
    from linbench.methods.attention import LinearizedAttention
    from linbench.methods.linearize import decoder_layers
    layers = decoder_layers(model)
    new = {id(p) for i in idx if isinstance(layers[i].self_attn, LinearizedAttention)
           for p in layers[i].self_attn.new_parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) in new}


def train_block(cfg, model, idx: list[int], train, val, plan: Plan, n_linear: int,
                trainable, transfer_mode) -> Result:
    """Train the new parameters of decoder layers `idx` on their cached inputs `train`,
    `val` (BlockInputs), loss = transfer_weight x sum of the block's layer losses / n_linear
    (the joint stage's per-layer gradients). `trainable` and `transfer_mode` are
    recovery.stages' contexts (this module does not import stages)."""
    from linbench.methods.attention import LinearizedAttention
    from linbench.methods.linearize import decoder_layers
    layers = decoder_layers(model)
    lin = [layers[i].self_attn for i in idx if isinstance(layers[i].self_attn, LinearizedAttention)]
    params = block_parameters(model, idx)
    body = model.get_decoder() if hasattr(model, "get_decoder") else model

    def loss(h):
        body(inputs_embeds=h, use_cache=False)
        return cfg.transfer_weight * torch.stack([l.transfer_loss.float() for l in lin]).sum() / n_linear

    obj = Objective("transfer", params, loss, cfg.transfer_lr, cfg.weight_decay, cfg.max_grad_norm)
    with trainable(model, params), transfer_mode(lin, cfg.transfer), _only(body, idx):
        return fit(obj, model, train, val, plan)


def stitch(model, files) -> int:
    """Load each block file's parameters into the full model (by name); returns how many."""
    own = dict(model.named_parameters())
    n = 0
    with torch.no_grad():
        for f in files:
            for name, t in load_file(str(f)).items():
                if name not in own:
                    raise ValueError(f"block file {f} holds {name!r}, which the model lacks")
                own[name].copy_(t.to(own[name].device, own[name].dtype))
                n += 1
    return n


def _summary(res: Result) -> dict:
    return {"steps": res.steps, "tokens": res.tokens, "seconds": round(res.seconds, 2),
            "stopped": res.stopped, "best_step": res.best_step, "curve": res.curve,
            "val_curve": res.val_curve, "best_val": res.best_val, "first_val": res.first_val}


def _combine(parts: list[dict]) -> Result:
    """One Result for the stage: losses summed over blocks (= the joint loss) over the
    steps and evaluations every block reached."""
    def summed(key):
        n = min(len(p[key]) for p in parts)
        return [[parts[0][key][j][0], sum(p[key][j][1] for p in parts)] for j in range(n)]
    res = Result(tokens=max(p["tokens"] for p in parts), steps=max(p["steps"] for p in parts),
                 seconds=sum(p["seconds"] for p in parts), curve=summed("curve"),
                 val_curve=summed("val_curve"),
                 stopped="budget" if all(p["stopped"] == "budget" for p in parts) else "early_stop")
    res.best_val = sum(p["best_val"] for p in parts)
    res.first_val = sum(p["first_val"] for p in parts)
    # 0 (kept initial) only when every block kept its initial weights
    res.best_step = max(p["best_step"] for p in parts)
    return res


def work_dir(plan: Plan) -> Path | None:
    """Where a checkpointed run keeps its block files and cache (None: a temporary dir)."""
    if plan.state_path is None:
        return None
    return Path(plan.state_path).with_name(Path(plan.state_path).name.split(".")[0] + ".blocks")


def transfer(cfg, model, train: torch.Tensor, val: torch.Tensor, plan: Plan, *,
             trainable, transfer_mode, rank: int = 0, world: int = 1) -> tuple[Result, dict]:
    """Block-wise stage 1 on `train` (rows, T) ids: this rank's blocks (`train_blocks`),
    then, once every rank is done (torch.distributed barrier when world > 1), all blocks
    stitched into `model` (`finish`). Returns the combined Result and the record's extras."""
    folder = work_dir(plan)
    temp = folder is None
    if temp and world > 1:
        raise LinbenchError("block-wise transfer over several ranks needs a checkpoint dir "
                            "that all ranks share (the block files meet there)")
    folder = Path(tempfile.mkdtemp(prefix="linbench-blocks-")) if temp else folder
    try:
        if world > 1:  # this rank's blocks, whole batches, no collectives; one progress bar
            from linbench.recovery import dist
            with dist.alone():
                train_blocks(cfg, model, train, val,
                             dataclasses.replace(plan, progress=plan.progress and rank == 0),
                             folder, trainable=trainable, transfer_mode=transfer_mode,
                             rank=rank, world=world)
            torch.distributed.barrier()
        else:
            train_blocks(cfg, model, train, val, plan, folder, trainable=trainable,
                         transfer_mode=transfer_mode)
        res, info = finish(model, folder, cfg.transfer_blocks)
        if world > 1:
            res.parallel = "blocks"  # the stage record: blocks spread over the ranks
        return res, info
    finally:
        if temp:
            shutil.rmtree(folder, ignore_errors=True)


def train_blocks(cfg, model, train, val, plan: Plan, folder, *, trainable, transfer_mode,
                 rank: int = 0, world: int = 1) -> list[int]:
    """Cache the inputs of rank `rank`'s blocks (blocks_for) in folder/cache.rank<r>, train
    them one after another (a finished block, one with its files in `folder`, is skipped;
    an interrupted one resumes from its state file when plan.state_path is set), write
    each block's new parameters and summary; remove the cache. Returns the blocks done."""
    from linbench.methods.attention import linearized_layers
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    groups = blocks(model, cfg.transfer_blocks)
    n_linear = len(linearized_layers(model))
    mine = blocks_for(len(groups), rank, world)
    todo = [b for b in mine if not (folder / f"block{b}.safetensors").exists()]
    # one cache per process: under the data-parallel training loop (recovery.dist) every
    # process runs all blocks on its share of the rows, each with a cache of its own
    cache = folder / f"cache.rank{_process_rank() if world == 1 else rank}"
    if todo:  # the inputs of all this rank's blocks: a resumed run finds the same cache
        meta = write_cache(model, {"train": train[:plan.steps * plan.batch], "val": val},
                           [groups[b][0] for b in mine], cache, plan)
    for b in todo:
        j = mine.index(b)
        bp = dataclasses.replace(plan, state_path=None if plan.state_path is None
                                 else folder / f"block{b}.state.pt")
        res = train_block(cfg, model, groups[b], inputs(cache, meta, "train", j),
                          inputs(cache, meta, "val", j), bp, n_linear, trainable, transfer_mode)
        size = sum(f.stat().st_size for f in cache.glob(f"*.b{j}.s*.safetensors"))
        info = {**_summary(res), "layers": groups[b], "cache_bytes": size, "rank": rank}
        _atomic(folder / f"block{b}.json", lambda p: p.write_text(json.dumps(info)))
        params = {n: p.detach().to("cpu").contiguous()
                  for n, p in block_parameters(model, groups[b]).items()}
        _atomic(folder / f"block{b}.safetensors", lambda p: save_file(params, str(p)))
        if bp.state_path is not None:
            Path(bp.state_path).unlink(missing_ok=True)
    shutil.rmtree(cache, ignore_errors=True)
    return mine


def _process_rank() -> int:
    import torch.distributed as tdist
    return tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0


def finish(model, folder, k: int) -> tuple[Result, dict]:
    """Stitch every block's file into `model`; the combined Result and the record's extras."""
    folder = Path(folder)
    n = len(blocks(model, k))
    missing = [b for b in range(n) if not (folder / f"block{b}.safetensors").exists()]
    if missing:
        raise RuntimeError(f"block-wise transfer: blocks {missing} of {n} have no trained "
                           f"parameters in {folder}")
    stitch(model, [folder / f"block{b}.safetensors" for b in range(n)])
    parts = [json.loads((folder / f"block{b}.json").read_text()) for b in range(n)]
    info = {"transfer_blocks": k, "cache_bytes": sum(p["cache_bytes"] for p in parts),
            "blocks": [{**{x: p.get(x) for x in ("layers", "rank", "steps", "seconds", "stopped",
                                                  "best_step")},
                        "final_loss": _final(p["curve"])} for p in parts]}
    return _combine(parts), info


def _final(curve) -> float | None:
    tail = [v for _, v in curve[-10:]]
    x = sum(tail) / len(tail) if tail else math.nan
    return x if math.isfinite(x) else None
