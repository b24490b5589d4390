"""`linbench speed --nproc N`: LASP-2 rows beside the one-process rows (gloo on CPU).

One sweep launches processes (2 shapes, seconds each); the rest runs no launcher."""
from __future__ import annotations

import json

import pytest

from linbench.records import keys
from linbench.records.store import Store
from linbench.report.build import tables
from linbench.speed import parallel
from linbench.speed.sweep import SpeedConfig
from linbench.speed.timing import Guard
from tests.speed.test_sweep import cli, records



def test_which_mixers_lasp2_covers():
    assert parallel.coverage("lightning", 2, 8, "auto") == ("linear_attention",
                                                           "linear_attention (decay)")
    assert parallel.coverage("hedgehog", 2, 8, "auto") == ("linear_attention",
                                                           "linear_attention (normalize)")
    assert parallel.coverage("gla", 2, 8, "auto") == ("gated_linear_attention",
                                                      "gated_linear_attention")
    assert parallel.coverage("lolcats", 2, 8, "auto") == ("window_linear_attention",
                                                          "window_linear_attention")
    for name, why in [("deltanet", "delta rule"), ("gated_deltanet", "gated delta rule"),
                      ("softmax", "softmax attention"), ("liger", "window-softmax"),
                      ("swa", "sliding-window softmax")]:
        op, text = parallel.coverage(name, 2, 8, "auto")
        assert op is None and why in text, (name, text)


def test_sweep_writes_nproc_rows_beside_the_one_process_rows(tmp_path, capsys):
    res = tmp_path / "results"
    code, out, err = cli(capsys, "--nproc", "2", "--seqlen", "64,128", "--mode", "fwd",
                         "--methods", "lightning,deltanet", "--heads", "4", "--dim", "16",
                         "--threads", "1", "--target-seconds", "0.02", "--results", str(res))
    assert code == 0, err
    assert "deltanet: nproc=2 rows skipped: LASP-2 does not cover the delta rule" in err
    recs = records(res)
    par = [r for r in recs if r["details"].get("nproc") == 2]
    one = [r for r in recs if "nproc" not in r["details"]]
    assert sorted(r["details"]["seqlen"] for r in par) == [64, 128]
    assert {r["method"] for r in par} == {"lightning"}
    assert sorted((r["method"], r["details"]["seqlen"]) for r in one) == [
        ("deltanet", 64), ("deltanet", 128), ("lightning", 64), ("lightning", 128)]
    for r in par:
        d = r["details"]
        assert r["status"] == "ok", d["note"]
        assert r["config"]["nproc"] == 2 and d["lasp2_op"] == "linear_attention"
        assert r["metrics"]["tokens_per_s"]["value"] > 0
        assert d["peak_mem_bytes"] > 0 and len(d["peak_mem_bytes_per_rank"]) == 2
        assert d["slice_tokens"] == [d["seqlen"] // 2] * 2 and d["threads"] == 1
        assert keys.fields(r)["nproc"] == 2
    # a separate record (config hash) and row key, one table with the one-process rows
    assert {r["config_hash"] for r in par}.isdisjoint(r["config_hash"] for r in one)
    assert {keys.fields(r)["nproc"] for r in one} == {1}
    assert len({keys.key(r) for r in recs}) == 1
    report = "\n".join(tables(Store(res).scan()[0]))  # what `linbench report` prints
    for text in (out, report):
        lines = [line for line in text.splitlines() if line.startswith("| lightning | fwd | 64 |")]
        assert [line.split(" | ")[3] for line in lines] == ["1", "2"], text
        assert "| procs |" in text and "procs 2: LASP-2 sequence parallelism" in text


def test_a_shape_that_fails_in_the_children_is_a_record(tmp_path):
    cfg = SpeedConfig([64], ["lightning"], ["fwd"], heads=2, dim=8, nproc=2,
                      results_dir=str(tmp_path))
    import torch
    target, _ = parallel.parallel_target("lightning", cfg, torch.float32)

    def written_reason(nproc, spec):  # what a rank that raised leaves behind
        with open(f"{spec['notes']}/rank1.json", "w") as f:
            json.dump({"rank": 1, "status": "oom", "note": "rank 1: OutOfMemoryError: fake"}, f)
        raise RuntimeError("ChildFailedError")

    status, metrics, details = parallel.run_parallel_shape(
        target, "fwd", 64, cfg, torch.float32, "cpu", Guard(), launch=written_reason)
    assert (status, metrics) == ("oom", {}) and "rank 1: OutOfMemoryError: fake" in details["note"]

    class Killed(Exception):
        failures = {0: type("F", (), {"exitcode": -9, "signal_name": lambda self: "SIGKILL"})()}

    def killed(nproc, spec):
        raise Killed()
    guard = Guard()
    status, _, details = parallel.run_parallel_shape(target, "fwd", 64, cfg, torch.float32,
                                                     "cpu", guard, launch=killed)
    assert status == "oom" and "SIGKILL" in details["note"] and details["nproc"] == 2
    # the other ranks, stopped by the launcher (SIGTERM -> SignalException), are not the cause
    def killed_and_stopped(nproc, spec):
        with open(f"{spec['notes']}/rank1.json", "w") as f:
            json.dump({"rank": 1, "status": "stopped",
                       "note": "rank 1: SignalException: Process 7 got signal: 15"}, f)
        raise Killed()
    status, _, details = parallel.run_parallel_shape(target, "fwd", 64, cfg, torch.float32,
                                                     "cpu", Guard(), launch=killed_and_stopped)
    assert status == "oom" and details["note"].startswith("rank 0 exit code -9 (SIGKILL)")
    assert "stopped by the launcher: rank 1: SignalException" in details["note"]
    # linbench itself signalled while the group runs: an interruption, not a record
    import signal

    from torch.distributed.elastic.multiprocessing.api import SignalException

    def signalled(nproc, spec):  # what the launcher raises in the parent on SIGTERM
        raise SignalException("Process 1 got signal: 15", sigval=signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        parallel.run_parallel_shape(target, "fwd", 64, cfg, torch.float32, "cpu", Guard(),
                                    launch=signalled)
    # larger T of that mode follow without launching
    status, _, details = parallel.run_parallel_shape(target, "fwd", 128, cfg, torch.float32,
                                                     "cpu", guard, launch=None)
    assert status == "oom" and not details["ran"]


def test_a_failing_rank_names_its_reason_and_a_stopped_one_is_not_the_cause():
    """What _rank writes for the parent (_failure reads it): the launcher's SIGTERM to a
    healthy rank is "stopped", an out-of-memory error "oom", anything else "error"."""
    import signal

    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    stopped = parallel._rank_note(1, SignalException("Process 7 got signal: 15", sigval=signal.SIGTERM))
    assert stopped == {"rank": 1, "status": "stopped",
                       "note": "rank 1: SignalException: Process 7 got signal: 15"}
    assert parallel._rank_note(0, torch.OutOfMemoryError("CUDA out of memory"))["status"] == "oom"
    assert parallel._rank_note(0, RuntimeError("boom\nmore"))["note"] == "rank 0: RuntimeError: boom"


@pytest.mark.parametrize("args,message", [
    (["--nproc", "0"], "--nproc"),
    (["--nproc", "2", "--mode", "prefill"], "--nproc 2 times kernel-level rows"),
])
def test_bad_nproc_exits_2_with_one_line(tmp_path, capsys, args, message):
    code, out, err = cli(capsys, *args, "--seqlen", "64", "--methods", "lightning",
                         "--results", str(tmp_path))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()
