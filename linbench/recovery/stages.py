"""Recovery: the stages that give a linearized model back its quality (methods/README.md, "Recovery").

    stage 1, attention transfer: every layer's frozen softmax attention (same q, k, v, same
        forward) is the teacher; only the method's new parameters train, on
        transfer_weight x mean over layers of each layer's loss ("mse" of the outputs before
        o_proj, LoLCATs arXiv 2410.10254; or "ce" of the attention weights, Hedgehog
        arXiv 2402.04347). Layers pass the teacher output on, so the forward stops at the
        decoder body (no lm_head).
    optional distillation (config.distill, off by default; RADLADS arXiv 2505.03005, step
        2): KL(teacher || student) of the next-token distributions, end to end, on the new
        parameters or on all; the teacher is the same model in transfer mode "teacher".
    stage 2, LoRA (peft): next-token cross-entropy, adapters on config.lora_targets, every
        other parameter frozen (feature maps included, as LoLCATs says), then merged, so
        the result is a plain linearized model that methods.io.save_pretrained writes.

Each stage: AdamW, gradient clipping at max_grad_norm (applied), validation every
eval interval on the held-out split, early stopping after `patience` evaluations without
improvement, best weights kept; seeded; bf16 autocast on CUDA, fp32 on CPU.
With a checkpoint_dir the training state is saved every few steps and each finished stage
as a whole model (with a manifest, assets.manifest, checked before reuse), so an
interrupted run continues where it stopped. A NaN/Inf training loss or gradient norm stops
the stage (train.NonFiniteLoss); a stage whose best weights were its initial ones says so
(stage dict "kept_initial", and a warning line).
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
from pathlib import Path

import torch

from linbench.recovery import adapters, budget as budgets, dist
from linbench.recovery import share as shared
from linbench.assets import manifest
from linbench.recovery.train import Objective, Plan, evaluate, fit

STAGES = ("transfer", "distill", "lora")  # distill: optional, off unless the config asks


def code_version() -> str:
    """linbench's version + a hash of the code a recovered model depends on (methods,
    kernels, and this package): any change there is a new checkpoint key."""
    import hashlib

    import linbench
    from linbench import kernels, methods
    files = sorted(Path(__file__).resolve().parent.glob("*.py"))
    for pkg in (methods, kernels):  # benchmarks and GPU checks do not change a model
        files += sorted(f for f in Path(pkg.__file__).resolve().parent.rglob("*.py")
                        if f.name not in ("bench.py", "check.py"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return f"{linbench.__version__}+{h.hexdigest()[:12]}"


def stages_of(model) -> list[dict]:
    """The recovery stages recorded in a (recovered) model's config."""
    rec = getattr(model.config, "linbench", None)
    return list(rec.get("recovery", [])) if isinstance(rec, dict) else []


def recover(method, model, data, budget, *, seed: int = 0, progress: bool = False,
            checkpoint_dir=None, on_step=None, echo=None, share=None):
    """Run the stages `method.config` names on `data` (a linbench.recovery.corpus.Corpus with a
    tokenizer) within `budget` (a Budget or its string form); return the model. The stage
    dicts are stored in model.config.linbench["recovery"]. `share` (with a checkpoint_dir):
    where stage 1 of this configuration is published for recoveries that differ only after
    it, or taken from (linbench.recovery.share; its claim is held while stage 1 trains)."""
    with shared.Claim() as claim:
        return _recover(method, model, data, budget, seed=seed, progress=progress,
                        checkpoint_dir=checkpoint_dir, on_step=on_step, echo=echo, share=share,
                        claim=claim)


def _recover(method, model, data, budget, *, seed, progress, checkpoint_dir, on_step, echo,
             share, claim):
    echo = echo or (lambda s: None)
    budget = budgets.parse(budget)
    cfg = method.config
    seqlen = budget.seqlen_for(method)
    corpus = data if data.seqlen == seqlen else data.with_seqlen(seqlen)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    cache: dict = {}
    # the calibrated init: nothing to do for methods without parameters it sets
    calibrating = getattr(cfg, "init", "paper") == "calibrated" and method.calibrates()

    def tensors():
        if not cache:
            rows = max(budget.steps(s, seqlen) for s in STAGES) * budget.batch_size
            if calibrating or getattr(cfg, "adapter", "lora") in adapters.CALIBRATING:  # their rows too
                rows = max(rows, -(-cfg.calibration_tokens // seqlen))
            cache["val"] = corpus.packed("val", max(1, budget.val_tokens // seqlen))
            cache["train"] = corpus.packed("train", max(rows, 1))
            corpus.release()
        return cache["train"], cache["val"]

    if ckpt is not None and dist.is_writer():  # distributed: rank 0 alone writes
        _claim(ckpt, {"method": method.config_dict(), "budget": budget.identity(),
                      "data": corpus.identity(), "seed": seed})
    todo = [s for s in STAGES if _wanted(s, method, model, budget)]
    share = Path(share) if share is not None and ckpt is not None else None
    adopted = share is not None and "transfer" in todo and dist.broadcast(
        shared.adopt(share, ckpt / "transfer", echo, claim) if dist.is_writer() else None)
    # a finished, sound stage checkpoint carries the calibrated weights; otherwise (none, or
    # only bad ones, which are set aside and rerun) the first stage starts from the fresh model
    started = ckpt is not None and any((ckpt / s).exists() and not manifest.problem(ckpt / s)
                                       for s in STAGES)
    if calibrating and todo and not started:
        from linbench.recovery.calibrate import calibrate
        info = calibrate(model, tensors()[0], cfg.calibration_tokens, budget.micro())
        model.config.linbench = {**model.config.linbench, "calibration": info}
        echo(f"recovery: calibrated init of {info['layers']} layers on {info['tokens']} tokens")
    stages: list[dict] = []
    for i, name in enumerate(todo):
        done_dir = ckpt / name if ckpt is not None else None
        if done_dir is not None and done_dir.exists() and manifest.problem(done_dir):
            why, aside = manifest.problem(done_dir), manifest.set_aside(done_dir)
            echo(f"linbench: stage checkpoint {done_dir} is bad ({why}); moved to "
                 f"{aside.name}, rerunning stage {name}")
        plan = Plan(steps=budget.steps(name, seqlen), batch=budget.batch_size,
                    micro=budget.micro(), eval_steps=budget.eval_steps(name, seqlen),
                    patience=budget.patience, save_every=budget.save_every, seed=seed + i,
                    device=str(next(model.parameters()).device),
                    dtype=next(model.parameters()).dtype, progress=progress,
                    on_step=on_step, state_path=ckpt / f"{name}.state.pt" if ckpt else None)
        if done_dir is not None and done_dir.exists():
            model = _reload(done_dir, model)
            stages = stages_of(model)
            echo(f"recovery: stage {name} already finished in {done_dir}")
            if not (name == "transfer" and adopted):
                continue
            # a shared stage 1 becomes ours: our config, then the path of a trained one
            # (our layer selection, the record, our stage checkpoint)
            model.config.linbench = {**model.config.linbench, "config": method.config_dict()}
            stage = {**stages.pop(), "shared": True}
        else:
            echo(f"recovery: stage {name}, {plan.steps} steps of {budget.batch_size} x {seqlen} tokens")
            run = {"transfer": _transfer, "distill": _distill, "lora": _lora}[name]
            chosen = _select(method, model, tensors()[1], plan, echo) if name == "lora" else None
            model, stage = run(cfg, model, *tensors(), plan)
            if name == "transfer" and share is not None and dist.is_writer():  # before selection
                model.config.linbench = {**model.config.linbench, "recovery": [*stages, stage]}
                shared.publish(model, share, _write)
                claim.release()
        if name == "transfer":  # auto:N hybrid selection after stage 1 (before LoRA if none)
            chosen = _select(method, model, tensors()[1], plan, echo)
        if chosen:
            stage["layer_selection"] = chosen
        if stage["kept_initial"]:
            echo(f"recovery: WARNING stage {name} kept its initial weights: no validation "
                 f"loss in its {stage['steps']} steps beat the starting one, so they were "
                 f"thrown away (ppl_after == ppl_before; try a lower learning rate)")
        stages.append(stage)
        model.config.linbench = {**model.config.linbench, "recovery": list(stages)}
        if done_dir is not None and dist.is_writer():
            _save_stage(model, done_dir)
            (ckpt / f"{name}.state.pt").unlink(missing_ok=True)
            shutil.rmtree(ckpt / f"{name}.blocks", ignore_errors=True)  # block-wise transfer's
    model.config.linbench = {**model.config.linbench, "recovery": stages}
    return model.eval()


def _select(method, model, val, plan: Plan, echo) -> dict | None:
    """keep_softmax_layers="auto:N": revert the N layers measured worst to softmax, once
    (linbench.recovery.select); the choice and the held-out ppl after it, for the record."""
    from linbench.recovery import select
    auto = select.pending(method, model)
    if auto is None:
        return None
    info = select.select(model, *auto, val, plan.micro)
    info["ppl_after"] = _ppl(model, val, plan)
    model.config.linbench = {**model.config.linbench, "layer_selection": info}
    echo(f"recovery: {info['spec']} kept layers {info['kept_softmax']} as softmax "
         f"({info['criterion']}, held-out ppl {info['ppl_after']})")
    return info


def _claim(ckpt: Path, meta: dict) -> None:
    """Record what a checkpoint dir recovers; refuse to resume a different recovery there."""
    import json
    meta = json.loads(json.dumps(meta, default=str))
    path = ckpt / "recovery.json"
    if path.exists():
        if json.loads(path.read_text()) != meta:
            raise ValueError(f"{ckpt} holds the state of a different recovery (method config, "
                             f"budget, data or seed differ); use another checkpoint dir")
        return
    ckpt.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, indent=1, sort_keys=True))


def _wanted(name: str, method, model, budget) -> bool:
    cfg = method.config
    if budget.stage_tokens(name) <= 0:
        return False
    if name == "transfer":
        from linbench.methods.linearize import new_parameters
        return getattr(cfg, "transfer", None) is not None and bool(new_parameters(model))
    if name == "distill":
        return getattr(cfg, "distill", None) is not None
    return getattr(cfg, "lora_r", 0) > 0


def _ce(model):
    def loss(ids):
        return model(input_ids=ids, labels=ids, use_cache=False).loss
    return loss


def _ppl(model, val, plan: Plan) -> float | None:
    """exp(mean next-token cross-entropy) on the held-out sequences."""
    model.eval()
    ce = evaluate(_ce(model), val, plan.micro, plan.device, plan.dtype)
    return _finite(math.exp(min(ce, 700.0)))


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _stage(name: str, res, ppl_before, ppl_after) -> dict:
    return {"stage": name, "tokens": res.tokens, "steps": res.steps, "seconds": round(res.seconds, 2),
            "final_loss": _finite(res.final_loss), "curve": res.curve, "val_curve": res.val_curve,
            "ppl_before": ppl_before, "ppl_after": ppl_after, "stopped": res.stopped,
            "kept_initial": res.steps > 0 and getattr(res, "best_step", None) == 0,
            **({"parallel": res.parallel} if getattr(res, "parallel", "none") != "none" else {})}


@contextlib.contextmanager
def _trainable(model, params: dict):
    """Only `params` require grad, in fp32 (master weights for a bf16 model); restored after."""
    flags = {id(p): p.requires_grad for p in model.parameters()}
    dtypes = {n: p.dtype for n, p in params.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.data = p.data.float()
        p.requires_grad_(True)
    try:
        yield
    finally:
        for n, p in params.items():
            p.data = p.data.to(dtypes[n])
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), True))


@contextlib.contextmanager
def _transfer_mode(layers, mode: str):
    for layer in layers:
        layer.transfer = mode
    try:
        yield
    finally:
        for layer in layers:
            layer.transfer, layer.transfer_loss = None, None


def _transfer(cfg, model, train, val, plan: Plan):
    """Stage 1: attention transfer on the new parameters only."""
    from linbench.methods.attention import linearized_layers
    layers = linearized_layers(model)
    new = {id(p) for layer in layers for p in layer.new_parameters()}
    params = {n: p for n, p in model.named_parameters() if id(p) in new}
    body = model.get_decoder() if hasattr(model, "get_decoder") else model

    def loss(ids):
        body(input_ids=ids, use_cache=False)
        return cfg.transfer_weight * torch.stack([l.transfer_loss.float() for l in layers]).mean()

    ppl_before = _ppl(model, val, plan)
    if getattr(cfg, "transfer_blocks", 0):  # block-wise on cached teacher inputs
        from linbench.recovery import blockwise
        w = dist.world()  # several processes: the blocks spread over them
        res, info = blockwise.transfer(cfg, model, train, val, plan, trainable=_trainable,
                                       transfer_mode=_transfer_mode, rank=w.rank, world=w.size)
        return model, {**_stage("transfer", res, ppl_before, _ppl(model, val, plan)), **info}
    obj = Objective("transfer", params, loss, cfg.transfer_lr, cfg.weight_decay, cfg.max_grad_norm)
    with _trainable(model, params), _transfer_mode(layers, cfg.transfer):
        res = fit(obj, model, train, val, plan)
    return model, _stage("transfer", res, ppl_before, _ppl(model, val, plan))


def _distill(cfg, model, train, val, plan: Plan):
    """The optional stage between transfer and LoRA (RADLADS' step 2, arXiv 2505.03005):
    per token KL(teacher || student) of the next-token distributions, end to end, on
    cfg.distill's parameters ("new": the method's, "all": every one). The teacher is the
    same model with every linearized layer passing its softmax output on (transfer mode
    "teacher"), so no second copy of the weights is held."""
    import torch.nn.functional as F

    from linbench.methods.attention import linearized_layers
    layers = linearized_layers(model)
    new = {id(p) for layer in layers for p in layer.new_parameters()}
    params = {n: p for n, p in model.named_parameters() if cfg.distill == "all" or id(p) in new}

    def loss(ids):
        with torch.no_grad(), _transfer_mode(layers, "teacher"):
            teacher = model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
        student = model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)
        return F.kl_div(student, teacher, log_target=True, reduction="sum") / ids.numel()

    ppl_before = _ppl(model, val, plan)
    obj = Objective("distill", params, loss, cfg.distill_lr, cfg.weight_decay, cfg.max_grad_norm,
                    shardable=True)
    with _trainable(model, params):
        res = fit(obj, model, train, val, plan)
    return model, _stage("distill", res, ppl_before, _ppl(model, val, plan))


def _lora(cfg, model, train, val, plan: Plan):
    """Stage 2: cfg.adapter (LoRA by default; linbench.recovery.adapters) through peft on
    next-token cross-entropy, then merged."""
    torch.manual_seed(plan.seed)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = adapters.build(cfg, model, adapters.calibration_rows(cfg, train), plan.micro)
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"LoRA found none of {cfg.lora_targets} in {type(model).__name__}")
    obj = Objective("lora", params, _ce(peft_model), cfg.lora_lr, cfg.weight_decay, cfg.max_grad_norm,
                    shardable=True)
    res = fit(obj, peft_model, train, val, plan)
    merged = peft_model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(flags.get(id(p), True))
    ppl = lambda v: _finite(math.exp(min(v, 700.0)))  # noqa: E731
    return merged, {**_stage("lora", res, ppl(res.first_val), ppl(res.best_val)), "adapter": cfg.adapter}


def _write(model, path: Path) -> None:
    """The whole model (io.save_pretrained), its manifest last."""
    from linbench.methods import io
    shutil.rmtree(path, ignore_errors=True)
    io.save_pretrained(model, path)
    manifest.write(path)


def _save_stage(model, done_dir: Path) -> None:
    """Write the whole model through a temporary sibling + rename."""
    tmp = done_dir.with_name(done_dir.name + ".tmp")
    _write(model, tmp)
    shutil.rmtree(done_dir, ignore_errors=True)
    os.replace(tmp, done_dir)


def load(path, dtype=torch.float32, device="cpu"):
    """A recovered model (methods.io.from_pretrained keeps its recorded stages)."""
    from linbench.methods import io
    return io.from_pretrained(path, dtype=dtype, device=device)


def _reload(done_dir: Path, like):
    p = next(like.parameters())
    return load(done_dir, dtype=p.dtype, device=p.device)
