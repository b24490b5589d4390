"""Stage 1 shared between recoveries that differ only after it.

Attention transfer depends on the model, the method's stage-1 fields, the corpus, the
stage-1 part of the budget, the seed, the dtype and the code; not on what stage 2 does
with its result (the adapter and its hyper-parameters, the optional distillation stage)
nor on an `auto:N` layer selection, which scores the transferred model. So an adapter
sweep (`adapter=lora|pissa|eva|corda|bone`) or an `auto:N` sweep trains stage 1 once:
the first recovery publishes its transferred model (before any layer selection) under
<checkpoints>/transfer/<key>, and every later recovery with the same key copies it into
its own checkpoint as its finished transfer stage, then goes on as if it had trained it
(bit for bit the same weights: the training rows are a prefix of the same packed stream,
the stage's seed is the first stage's, tests/recovery/test_share.py). A recovery that finds
nothing published holds the key's claim (a file lock beside the published folder) until it
publishes, so one started meanwhile with the same key waits for that stage 1 instead of
training it a second time.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from linbench.assets import manifest

# method config fields that only stages after transfer read
AFTER_TRANSFER = ("adapter", "lora_r", "lora_alpha", "lora_dropout", "lora_lr", "lora_targets",
                  "distill", "distill_lr")
# budget fields of the later stages (the training rows are a prefix-stable stream, so
# their number does not change the rows stage 1 sees)
LATER_BUDGET = ("lora_tokens", "distill_tokens")


def identity(method_config: dict, recovery: dict) -> dict:
    """The part of a recovery's configuration stage 1 depends on (hashed into its key)."""
    method = {k: v for k, v in method_config.items() if k not in AFTER_TRANSFER}
    if "keep_softmax_layers" in method:  # indices change stage 1; "auto:N" entries do not
        method["keep_softmax_layers"] = [i for i in method["keep_softmax_layers"]
                                         if not isinstance(i, str)]
    budget = {k: v for k, v in recovery["budget"].items() if k not in LATER_BUDGET}
    return {"method": method, "budget": budget, "data": recovery["data"],
            "seed": recovery["seed"]}


class Claim:
    """The right to train one stage 1: taken when a recovery finds nothing published, held
    until it publishes (or ends), released at once when it adopts instead."""

    def __init__(self):
        self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def take(self, share: Path, echo) -> None:
        self._lock = manifest.lock(share, echo, f"linbench: waiting for another recovery that "
                                                f"trains the same stage 1, to adopt it ({share})")

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def adopt(share: Path, done_dir: Path, echo, claim: Claim | None = None) -> bool:
    """Copy a published stage 1 into done_dir (hard links where the filesystem allows);
    False when done_dir exists already or nothing sound is published. With a claim: first
    wait while another recovery holds it (it is training this stage 1), and keep it held
    when returning False (this recovery trains it, and releases the claim once published)."""
    if done_dir.exists():
        return False
    if claim is not None:
        claim.take(share, echo)
    if not share.exists():
        return False
    why = manifest.problem(share)
    if why is not None:
        aside = manifest.set_aside(share)
        echo(f"linbench: shared stage 1 {share} is bad ({why}); moved to {aside.name}")
        return False
    tmp = done_dir.with_name(f"{done_dir.name}.adopt{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(share, tmp, copy_function=_link_or_copy)
    os.replace(tmp, done_dir)
    if claim is not None:
        claim.release()
    echo(f"recovery: stage transfer taken from {share} (the same model, stage-1 config, "
         f"data, budget and seed; trained once)")
    return True


def publish(model, share: Path, save) -> None:
    """Write the transferred model to `share` unless someone already has (save: the stage
    checkpoint writer, to a unique temporary name, renamed in place)."""
    if share.exists():
        return
    share.parent.mkdir(parents=True, exist_ok=True)
    tmp = share.with_name(f"{share.name}.tmp{os.getpid()}")
    save(model, tmp)
    try:
        os.replace(tmp, share)
    except OSError:  # published meanwhile by another process: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
