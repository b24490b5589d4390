"""The training loop shared by the recovery stages: AdamW on a named set of parameters,
real gradient clipping, validation every few steps with early stopping and best-weight
restore, and a resumable state file.

Determinism: batch i is rows [i*B, (i+1)*B) of the packed training tensor, the RNG is
seeded per stage and saved with the state, so a run interrupted at any step and resumed
ends with the same weights as one that never stopped (on the same device).

Distributed (linbench.recovery.dist): with N ranks each rank trains on its rows
r, r+N, ... of every global batch of plan.batch rows (which N must divide), under FSDP2 for
the length of the stage; the loss is averaged over the ranks, validation runs on every
rank on all held-out rows, so the curve is that of one process at the same global batch.
The resumable state file is neither read nor written there (an interrupted distributed
run redoes its unfinished stage; finished stages are kept).
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from linbench.recovery import dist


class NonFiniteLoss(RuntimeError):
    """A training step produced a NaN/Inf loss or gradient norm: the stage is stopped."""

    def __init__(self, stage: str, step: int, steps: int, what: str, value: float):
        self.stage, self.step = stage, step
        super().__init__(f"recovery stage {stage} diverged: {what} {value} at step {step} of "
                         f"{steps}; stopped, nothing cached (lower the stage's learning rate "
                         f"or loss weight)")


@dataclass
class StepInfo:
    """Handed to `on_step` after clipping, before the optimizer step."""
    stage: str
    step: int            # optimizer steps done, this one included
    tokens: int          # training tokens seen, this step included
    loss: float
    grad_norm: float     # total gradient norm BEFORE clipping
    params: list         # the trainable parameters (their .grad is the clipped gradient)


@dataclass
class Objective:
    name: str
    params: dict                               # name -> trainable Parameter
    loss: Callable[[torch.Tensor], torch.Tensor]  # ids (b, T) -> scalar mean loss
    lr: float
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    val: Callable[[torch.Tensor], torch.Tensor] | None = None  # default: `loss`
    # distributed: True when `loss` is a function of the model's forward output, so FSDP2's
    # backward hooks see it (dist.parallel); False (losses a layer leaves behind, as in
    # attention transfer): parameters replicated, gradients all-reduced
    shardable: bool = False


@dataclass
class Plan:
    steps: int
    batch: int
    micro: int
    eval_steps: int
    patience: int
    save_every: int
    seed: int = 0
    device: str = "cpu"
    dtype: torch.dtype = torch.float32   # the model's (pretrained) parameter dtype
    state_path: Path | None = None
    progress: bool = False
    on_step: Callable[[StepInfo], None] | None = None


@dataclass
class Result:
    tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    curve: list = field(default_factory=list)       # [[tokens, train loss], ...]
    val_curve: list = field(default_factory=list)   # [[tokens, val loss], ...]
    stopped: str = "budget"
    best_val: float = math.inf
    first_val: float = math.nan
    best_step: int = 0       # the step whose weights were kept (0: the initial ones)
    parallel: str = "none"   # distributed: "fsdp2" | "replicate" (dist.parallel)

    @property
    def final_loss(self) -> float:
        """Mean training loss over the last (up to) 10 steps."""
        tail = [v for _, v in self.curve[-10:]]
        return sum(tail) / len(tail) if tail else math.nan


def autocast(device, dtype=torch.float32) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; elsewhere autocast only for a half-precision model (its fp32
    master parameters meet half-precision activations), else full precision."""
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cpu", dtype=dtype)
    return contextlib.nullcontext()


def evaluate(fn, data: torch.Tensor, micro: int, device, dtype=torch.float32) -> float:
    """Row-weighted mean of fn over `data` in chunks (all rows have the same length)."""
    total, rows = 0.0, 0
    with torch.no_grad(), autocast(device, dtype):
        for i in range(0, data.shape[0], micro):
            chunk = data[i:i + micro].to(device)
            total += float(fn(chunk)) * chunk.shape[0]
            rows += chunk.shape[0]
    return total / max(rows, 1)


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP-sharded (DTensor) parameter; the tensor otherwise."""
    return p.to_local() if hasattr(p, "to_local") else p


def _snapshot(params: dict) -> dict:
    return {n: _local(p.detach()).to("cpu", copy=True) for n, p in params.items()}


def _restore(params: dict, saved: dict) -> None:
    with torch.no_grad():
        for n, p in params.items():
            dst = _local(p)
            dst.copy_(saved[n].to(dst.device, dst.dtype))


def fit(obj: Objective, model, train: torch.Tensor, val: torch.Tensor, plan: Plan) -> Result:
    """Train obj.params on `train` for plan.steps optimizer steps; keep the best weights.
    Under torch.distributed: data-parallel over the ranks (module docstring)."""
    if dist.world().size == 1:
        return _fit(obj, model, train, val, plan, "none")
    import dataclasses
    dist.check_batch(plan.batch)
    with dist.parallel(model, obj.params, obj.shardable) as (params, how):
        return _fit(dataclasses.replace(obj, params=params), model, train, val,
                    dataclasses.replace(plan, state_path=None), how)


def _fit(obj: Objective, model, train, val, plan: Plan, parallel: str) -> Result:
    params = obj.params
    plist = list(params.values())
    opt = torch.optim.AdamW(plist, lr=obj.lr, weight_decay=obj.weight_decay)
    val_fn = obj.val or obj.loss
    res, best, bad, start = Result(), None, 0, 0
    state = _load(plan.state_path)
    if state is not None:
        _restore(params, state["params"])
        opt.load_state_dict(state["optim"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng"])
        res, best, bad, start = state["result"], state["best"], state["bad"], state["step"]
    else:
        torch.manual_seed(plan.seed)
    res.parallel = parallel

    def validate(step):
        nonlocal best, bad
        model.eval()
        v = evaluate(val_fn, val, plan.micro, plan.device, plan.dtype)
        model.train()
        res.val_curve.append([step * plan.batch * train.shape[1], v])
        if step == 0:
            res.first_val = v
        if v < res.best_val:
            res.best_val, best, bad = v, _snapshot(params), 0
            res.best_step = step
        else:
            bad += 1

    t0 = time.time() - res.seconds
    model.train()
    done = state is not None and state.get("finished", False)
    if not done and start == 0:
        validate(0)
    bar = _bar(plan, start, obj.name)
    step = start
    while not done and step < plan.steps:
        rows = dist.shard_rows(train[step * plan.batch:(step + 1) * plan.batch])
        loss_sum = 0.0
        for i in range(0, rows.shape[0], plan.micro):  # gradient accumulation
            chunk = rows[i:i + plan.micro].to(plan.device)
            with autocast(plan.device, plan.dtype):
                loss = obj.loss(chunk) * (chunk.shape[0] / rows.shape[0])
            loss.backward()
            loss_sum += float(loss.detach())
        if parallel != "none":  # this rank's mean -> the global batch's; replicated grads too
            loss_sum = dist.mean(loss_sum)
            dist.all_reduce_grads(plist)
        if not math.isfinite(loss_sum):
            _close(bar)
            raise NonFiniteLoss(obj.name, step + 1, plan.steps, "training loss", loss_sum)
        norm = dist.clip_grads(plist, obj.max_grad_norm)  # torch's rule, over all ranks
        if not math.isfinite(norm):
            _close(bar)
            raise NonFiniteLoss(obj.name, step + 1, plan.steps, "gradient norm", norm)
        step += 1
        tokens = step * plan.batch * train.shape[1]
        if plan.on_step is not None:
            plan.on_step(StepInfo(obj.name, step, tokens, loss_sum, norm, plist))
        opt.step()
        opt.zero_grad(set_to_none=True)
        res.curve.append([tokens, loss_sum])
        res.steps, res.tokens = step, tokens
        if step % plan.eval_steps == 0 or step == plan.steps:
            validate(step)
            if bad >= plan.patience and step < plan.steps:
                res.stopped, done = "early_stop", True
        res.seconds = time.time() - t0
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4g}", tok_s=f"{tokens / max(res.seconds, 1e-9):.0f}")
        if step % plan.save_every == 0 or done or step == plan.steps:
            _save(plan.state_path, params, opt, res, best, bad, step, done or step == plan.steps)
    if bar is not None:
        bar.close()
    if best is not None:
        _restore(params, best)
    model.eval()
    return res


def _close(bar) -> None:
    if bar is not None:
        bar.close()


def _bar(plan: Plan, start: int, name: str):
    if not plan.progress or not dist.is_writer():
        return None
    from tqdm.auto import tqdm
    return tqdm(total=plan.steps, initial=start, desc=f"recover:{name}", unit="step", leave=False)


def _load(path: Path | None):
    if path is None or not Path(path).exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a torn or corrupt state file: start the stage over
        aside = Path(path).with_name(Path(path).name + ".corrupt")
        os.replace(path, aside)
        import sys
        print(f"linbench: training state {path} is unreadable ({type(e).__name__}); moved to "
              f"{aside.name}, restarting that stage", file=sys.stderr, flush=True)
        return None


def _save(path, params, opt, res, best, bad, step, finished) -> None:
    """Atomically write what a resumed run needs to continue at `step`."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"params": _snapshot(params), "optim": opt.state_dict(), "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
             "result": res, "best": best, "bad": bad, "step": step, "finished": finished}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
