"""The recovered-checkpoint cache: one directory per (model file, method config, recovery
config, dtype, code version), so that a recovered model is trained once and reused by
every later run, suite and process.

    <root>/<key>/model/   the finished, merged model (methods.io format)
    <root>/<key>/work/    stage checkpoints and optimizer state while recovering
    <root>/<key>.lock     held (filelock) by the process recovering or reading that key

Every model directory carries a manifest (assets.manifest: sizes and sha256, written
last); one that does not match it is moved aside and rebuilt, never loaded.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from linbench.assets import models
from linbench.records import provenance
from linbench.recovery import budget as budgets
from linbench.assets import manifest
from linbench.recovery import dist, stages

_CORPORA: dict = {}


def corpus(source: str, seqlen: int, seed: int):
    """The recovery corpus (linbench.recovery.corpus.Corpus), built once per process."""
    from linbench.recovery.corpus import Corpus
    key = (source, seqlen, seed)
    if key not in _CORPORA:
        _CORPORA[key] = Corpus(source, seqlen=seqlen, seed=seed)
    return _CORPORA[key]


def recovery_config(method, budget: str, data: str, seed: int) -> dict:
    """Budget, corpus and seed of a method's recovery: part of every record's hashed config."""
    b = budgets.parse(budget)
    return {"budget": b.identity(), "data": corpus(data, b.seqlen_for(method), seed).identity(),
            "seed": seed}


def checkpoint_dir(root, model_hash: str, method_config: dict, recovery: dict, dtype: str) -> Path:
    """<root>/<hash of model, method config, recovery config, dtype, code version>."""
    key = provenance.config_hash({"model": model_hash, "method": method_config,
                                  "recovery": recovery, "dtype": dtype,
                                  "code": stages.code_version()})
    base = Path(root) if root else models.cache_root() / "checkpoints"
    return base / key


def transfer_dir(root, model_hash: str, method_config: dict, recovery: dict, dtype: str) -> Path:
    """<root>/transfer/<hash of what stage 1 depends on>: the stage 1 that recoveries
    differing only after it share (linbench.recovery.share)."""
    from linbench.recovery import share
    key = provenance.config_hash({"model": model_hash, **share.identity(method_config, recovery),
                                  "dtype": dtype, "code": stages.code_version()})
    base = Path(root) if root else models.cache_root() / "checkpoints"
    return base / "transfer" / key


def lock(ckpt: Path, echo=print):
    """The inter-process lock of one checkpoint key (filelock): a second identical run waits
    here, then finds the first one's checkpoint and reuses it."""
    return manifest.lock(ckpt, echo, f"linbench: waiting for another linbench process using "
                                     f"checkpoint {ckpt}")


def cached(ckpt: Path, echo=print) -> Path | None:
    """ckpt/model if it is complete and matches its manifest. A bad one is named in one
    line and moved aside (never used), so the caller rebuilds it."""
    final = ckpt / "model"
    if not final.exists():
        return None
    why = manifest.problem(final)
    if why is None:
        return final
    aside = manifest.set_aside(final)
    echo(f"linbench: cached checkpoint {final} is bad ({why}); moved to {aside.name}, rebuilding")
    return None


def recovered(method, label: str, spec, ckpt: Path, *, budget: str, data: str, seed: int,
              dtype: str, device: str, progress: bool, echo=print, share: Path | None = None):
    """The linearized, recovered model and its tokenizer: from `ckpt`, or trained there.
    Holds the checkpoint key's lock throughout. A diverging recovery (train.NonFiniteLoss)
    leaves nothing cached."""
    lk = lock(ckpt, echo) if dist.is_writer() else None  # distributed: rank 0 decides
    try:
        final = dist.broadcast(cached(ckpt, echo) if dist.is_writer() else None)
        if final is not None:
            echo(f"[{label}] reusing recovered checkpoint {final}")
            model = stages.load(final, models.torch_dtype(dtype), device)
            return model, models.load_tokenizer(spec)
        return _train(method, label, spec, ckpt, budget=budget, data=data, seed=seed,
                      dtype=dtype, device=device, progress=progress, echo=echo, share=share)
    finally:
        if lk is not None:
            lk.release()


def _train(method, label, spec, ckpt: Path, *, budget, data, seed, dtype, device, progress, echo,
           share=None):
    from linbench.methods import io
    from linbench.recovery.train import NonFiniteLoss
    model, tokenizer = models.load(spec, dtype, device)
    model = method.linearize(model)
    b = budgets.parse(budget)
    data_ = corpus(data, b.seqlen_for(method), seed)
    data_.tokenizer = tokenizer
    echo(f"[{label}] recovering on {data} (budget {b.name}) in {ckpt}")
    try:
        model = stages.recover(method, model, data_, b, seed=seed, progress=progress,
                               checkpoint_dir=ckpt / "work", echo=echo, share=share)
    except NonFiniteLoss:
        if dist.is_writer():
            shutil.rmtree(ckpt / "work", ignore_errors=True)  # diverged: keep nothing of it
        raise
    if not dist.is_writer():
        return model, tokenizer
    tmp = ckpt / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    io.save_pretrained(model, tmp)
    manifest.write(tmp)  # last: a directory without a matching manifest is never used
    os.replace(tmp, ckpt / "model")
    shutil.rmtree(ckpt / "work", ignore_errors=True)
    return model, tokenizer
