"""Model-level speed rows run in a fresh process per method (linbench.speed.isolate): where
the model loads, what a killed child leaves, and the opt-out."""
from __future__ import annotations

import functools
import os
import signal
from pathlib import Path

from linbench.speed.sweep import ModelSource, SpeedConfig, sweep
from tests.conftest import make_tiny_llama

INFO = {"name": "tiny-llama", "file_hash": "1" * 64, "source": "test"}


def tiny_logging_pid(pids: str, kill_at: int | None = None):
    """The tiny Llama, noting the loading process in `pids`; with kill_at, a forward over
    kill_at tokens SIGKILLs its process (the OOM killer's way: nothing can catch it)."""
    (Path(pids) / str(os.getpid())).touch()
    model = make_tiny_llama(vocab_size=512)
    if kill_at is not None:
        def hook(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is not None and ids.shape[1] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        model.register_forward_pre_hook(hook, with_kwargs=True)
    return model


def config(tmp_path, methods, **kw):
    return SpeedConfig(seqlens=[32, 64], methods=methods, modes=["prefill"],
                       results_dir=str(tmp_path / "r"), target_s=0.005, max_reps=3, **kw)


def test_each_method_loads_in_a_process_of_its_own_and_the_lines_come_back(tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    source = ModelSource(INFO, functools.partial(tiny_logging_pid, str(pids)))
    lines = []
    recs = sweep(config(tmp_path, ["softmax", "gla"]), echo=lines.append, model=source)
    assert [(r["method"], r["status"]) for r in recs] == [("softmax", "ok")] * 2 + [("gla", "ok")] * 2
    loaded = {int(p.name) for p in pids.iterdir()}
    assert len(loaded) == 2 and os.getpid() not in loaded
    assert any(line.startswith("[speed] gla prefill T=64: ok") for line in lines)


def test_same_process_loads_here(tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    source = ModelSource(INFO, functools.partial(tiny_logging_pid, str(pids)))
    sweep(config(tmp_path, ["gla"], isolate=False), echo=lambda s: None, model=source)
    assert [int(p.name) for p in pids.iterdir()] == [os.getpid()]


def test_a_killed_child_is_started_again_and_records_its_shape_oom(tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    source = ModelSource(INFO, functools.partial(tiny_logging_pid, str(pids), kill_at=64))
    lines = []
    recs = sweep(config(tmp_path, ["gla"]), echo=lines.append, model=source)
    assert [(r["details"]["seqlen"], r["status"]) for r in recs] == [(32, "ok"), (64, "oom")]
    assert "killed" in recs[1]["details"]["note"]
    assert len(list(pids.iterdir())) == 2  # the first child died at T=64; a second recorded it
    assert any("its measuring process was killed" in line for line in lines)
