"""The recovered-checkpoint cache: one directory per (model file, method config, recovery
config, dtype, code version), so that a recovered model is trained once and reused by
every later run, suite and process.

    <root>/<key>/model/   the finished, merged model (methods.io format)
    <root>/<key>/work/    stage checkpoints and optimizer state while recovering
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from linbench.assets import models
from linbench.records import provenance
from linbench.recovery import budget as budgets
from linbench.recovery import stages

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


def recovered(method, label: str, spec, ckpt: Path, *, budget: str, data: str, seed: int,
              dtype: str, device: str, progress: bool, echo=print):
    """The linearized, recovered model and its tokenizer: from `ckpt`, or trained there."""
    from linbench.methods import io
    final = ckpt / "model"
    if (final / "config.json").exists():
        echo(f"[{label}] reusing recovered checkpoint {final}")
        model = stages.load(final, models.torch_dtype(dtype), device)
        return model, models.load_tokenizer(spec)
    model, tokenizer = models.load(spec, dtype, device)
    model = method.linearize(model)
    b = budgets.parse(budget)
    data_ = corpus(data, b.seqlen_for(method), seed)
    data_.tokenizer = tokenizer
    echo(f"[{label}] recovering on {data} (budget {b.name}) in {ckpt}")
    model = stages.recover(method, model, data_, b, seed=seed, progress=progress,
                           checkpoint_dir=ckpt / "work", echo=echo)
    tmp = ckpt / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    io.save_pretrained(model, tmp)
    os.replace(tmp, final)
    shutil.rmtree(ckpt / "work", ignore_errors=True)
    return model, tokenizer
