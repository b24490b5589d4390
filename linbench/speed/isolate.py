"""Model-level speed rows, each method's in a fresh process of its own.

A model-level shape times a whole causal LM, and its speed depends on the state of the
process it runs in: the allocator's arenas and free lists, the thread pool, whatever the
models measured before it left behind. Measured on the 2-core CPU (round 3): gla's decode
step at 16K took 75 ms/token when softmax, swa and lolcats had run before it in the same
sweep process, and 59 ms in a process of its own. So `linbench speed` measures the
model-level rows of each method in a spawned process (`--same-process` turns that off),
started with this process's torch thread count. The child writes the records to the
store as the sweep would, sends its progress lines back here, and returns its records.

A method whose rows are all in the store already is not given a process: its records are
reused here. A child the OS kills (out of memory) leaves its shape's marker behind
(`sweep.Marker`); the child is started again, records that shape "oom" from the marker
and goes on, at most once per shape.

This module imports no torch at import time.
"""
from __future__ import annotations

MODEL_MODES = ("prefill", "decode")
_LINES = None  # in a child: the queue its progress lines go to


class _Measure(Exception):
    """Raised by the dry pass's build: a shape has to be measured."""


def model_rows(run, name: str, source, model=None, isolate: bool = True,
               default_source=None) -> None:
    """Append the model-level rows of method `name` to run.out (a sweep._Sweep): reused,
    measured here, or (isolate) measured in a fresh process. `source`: the sweep's
    ModelSource; `model`: the one the caller gave (None: the child builds one with
    default_source(cfg); anything else must pickle). The child gets the sweep's classes
    as arguments (pickled by reference), so this module imports no sweep."""
    if not isolate:
        _rows(run, name, source)
        return
    if _all_reusable(run, name, source):  # the dry pass appended its records
        return
    from concurrent.futures.process import BrokenProcessPool
    for _ in range(len(run.cfg.modes) * len(run.cfg.seqlens) + 1):
        try:
            run.out += _in_child(run.cfg, name, (model, default_source, type(run)), run.echo)
            return
        except BrokenProcessPool:
            run.echo(f"[speed] {name}: its measuring process was killed (out of memory?); "
                     f"starting it again, which records that shape from its marker")
    raise RuntimeError(f"{name}: the measuring process was killed at every start")


def _rows(run, name: str, source) -> None:
    """The model-level rows of `name`, in this process."""
    from linbench import registry
    from linbench.speed.targets import model_target
    cfg = run.cfg
    method = registry.methods.get(name)()
    hashed = {k: source.info.get(k) for k in ("name", "file_hash")}

    def build():
        return model_target(name, method, method.linearize(source.load()).eval(), cfg.device,
                            prefill_chunk=cfg.prefill_chunk)
    run.rows(name, "model", {"name": name, **method.config_dict()},
             [m for m in cfg.modes if m in MODEL_MODES], build,
             {"batch": 1, "prefill_chunk": cfg.prefill_chunk}, hashed, source.info,
             role=method.role)


def _all_reusable(run, name: str, source) -> bool:
    """Whether every row of `name` is a reusable record: a dry pass whose model never
    loads. When it is, the pass has appended the records and printed its lines; when
    not, run.out is as it was and nothing is printed (the child prints its own)."""
    kept, echo, lines = len(run.out), run.echo, []

    def unloadable():
        raise _Measure
    run.echo = lines.append
    try:
        _rows(run, name, type(source)(source.info, unloadable))
    except _Measure:
        del run.out[kept:]
        return False
    finally:
        run.echo = echo
    for line in lines:
        echo(line)
    return True


def _in_child(cfg, name: str, build: tuple, echo) -> list[dict]:
    """Run `_rows` for `name` in a spawned process; its lines go to `echo` as they come.
    build: (model source or None, default source function, sweep class) for the child."""
    import multiprocessing
    import threading
    from concurrent.futures import ProcessPoolExecutor

    import torch
    ctx = multiprocessing.get_context("spawn")
    lines = ctx.Queue()

    def pump():
        while (line := lines.get()) is not None:
            echo(line)
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        with ProcessPoolExecutor(1, mp_context=ctx, initializer=_child_start,
                                 initargs=(lines, torch.get_num_threads())) as pool:
            return pool.submit(_child_rows, cfg, name, *build).result()
    finally:  # the pool has joined its process (and that its queue feeder): lines first
        lines.put(None)
        reader.join(timeout=30)


def _child_start(lines, threads: int) -> None:
    global _LINES
    import torch
    _LINES = lines
    torch.set_num_threads(threads)


def _child_rows(cfg, name: str, model, default_source, sweep_cls) -> list[dict]:
    run = sweep_cls(cfg, _LINES.put)
    _rows(run, name, model or default_source(cfg))
    return run.out
