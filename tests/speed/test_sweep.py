"""`linbench speed`: parsing, records, statuses, resume, model level (no timing asserted)."""
from __future__ import annotations

import functools
import json
import time

import pytest
import torch
from torch import nn

from linbench import registry
from linbench.methods.base import Method
from linbench.speed.sweep import ModelSource, SpeedConfig, parse_seqlens, sweep
from linbench.speed.timing import Guard
from tests.conftest import make_tiny_llama

TOP_KEYS = {"schema_version", "run_id", "created", "versions", "git", "device", "model",
            "method", "suite", "suite_version", "config", "config_hash", "context", "dtype",
            "seeds", "recovery", "state_bytes", "status", "metrics", "details", "seconds"}
DETAIL_KEYS = {"level", "mode", "seqlen", "batch", "heads", "dim", "dtype", "backend", "device",
               "ms_q20", "ms_q80", "peak_mem_bytes", "tflops", "gbps", "pct_peak",
               "state_bytes"}


class CumsumMixer(nn.Module):
    """Unnormalized causal linear attention by prefix sums (a fake method's mixer)."""

    def __init__(self, oom_from: int | None = None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.oom_from = oom_from

    def forward(self, q, k, v):  # (B, T, H, D) each
        if self.oom_from is not None and q.shape[1] >= self.oom_from:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        kv = torch.einsum("bthk,bthv->bthkv", k, v).cumsum(1)  # (B, T, H, K, V)
        return self.scale * torch.einsum("bthk,bthkv->bthv", q, kv)

    def state_bytes(self, batch, seqlen, elem=4):
        return batch * 8 * 16 * 16 * 4


class FakeLinear(Method):
    name = "fake-linear"
    oom_from = None

    def mixer(self, heads, head_dim, backend="auto"):
        if backend == "fla":
            raise ValueError("fake-linear has no fla backend")
        return CumsumMixer(self.oom_from)


class FakeOOM(FakeLinear):
    oom_from = 128


class TripwireMixer(CumsumMixer):
    """Refuses lengths >= `limit`: raises, or dies as the OS out-of-memory killer kills
    (SIGKILL, nothing runs after it) when LINBENCH_TEST_KILL is set."""

    def __init__(self, limit: int, why: str):
        super().__init__()
        self.limit, self.why = limit, why

    def forward(self, q, k, v):
        import os
        import signal
        if q.shape[1] >= self.limit:
            if os.environ.get("LINBENCH_TEST_KILL"):
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(self.why)
        return super().forward(q, k, v)


class FakeKilled(FakeLinear):
    def mixer(self, heads, head_dim, backend="auto"):
        return TripwireMixer(128, "the shape that killed the last run was run again")


class FakeSmallOnly(FakeLinear):
    def mixer(self, heads, head_dim, backend="auto"):
        return TripwireMixer(129, "a shape the probes predicted to time out was run")


class NoMixer(Method):
    name = "no-mixer"


@pytest.fixture
def fakes():
    names = {"fake-linear": FakeLinear, "fake-oom": FakeOOM, "fake-killed": FakeKilled,
             "fake-small-only": FakeSmallOnly, "no-mixer": NoMixer}
    for name, cls in names.items():
        registry.methods.register(name, cls)
    yield
    for name in names:
        registry.methods.unregister(name)


def cli(capsys, *args):
    from linbench.cli import main
    with pytest.raises(SystemExit) as exc:
        main(["speed", *args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def records(results):
    return [json.loads(p.read_text()) for p in sorted((results / "runs").rglob("*.json"))]


SMALL = ["--seqlen", "64..256", "--heads", "2", "--dim", "16", "--target-seconds", "0.005"]


@pytest.mark.parametrize("text, expected", [
    ("2k..2M", [1 << e for e in range(11, 22)]),
    ("1k,4k,16k", [1024, 4096, 16384]),
    ("64..64,100", [64, 100]),
])
def test_parse_seqlens(text, expected):
    assert parse_seqlens(text) == expected


@pytest.mark.parametrize("bad", ["2k..3k", "2kb", "16k..2k", "1k,,2k", "0"])
def test_malformed_seqlen_is_one_line_exit_2(capsys, tmp_path, bad):
    code, out, err = cli(capsys, "--seqlen", bad, "--results", str(tmp_path / "r"))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "--seqlen" in err
    assert "2k..2M" in err  # names the accepted forms
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, needle", [
    (["--methods", "nope"], "unknown method 'nope'"),
    (["--mode", "fwd,sideways"], "unknown mode 'sideways'"),
    (["--methods", "fla:gla", "--device", "cpu"], "needs fla"),
])
def test_bad_choices_exit_2(capsys, tmp_path, args, needle):
    code, _, err = cli(capsys, *args, "--results", str(tmp_path / "r"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err
    assert not (tmp_path / "r").exists()


def test_tiny_sweep_writes_records_with_the_schema(capsys, tmp_path, fakes):
    results = tmp_path / "r"
    code, out, err = cli(capsys, *SMALL, "--methods", "fake-linear,softmax,no-mixer",
                         "--mode", "fwd,fwdbwd", "--results", str(results))
    assert code == 0, err
    recs = records(results)
    assert len(recs) == 2 * 2 * 3  # (method, mode, T); no-mixer has no kernel rows
    assert "no-mixer: the method has no kernel-level mixer" in err
    assert {(r["method"], r["details"]["mode"], r["details"]["seqlen"]) for r in recs} == {
        (m, mode, T) for m in ("fake-linear", "softmax") for mode in ("fwd", "fwdbwd")
        for T in (64, 128, 256)}
    for r in recs:
        assert TOP_KEYS <= set(r) and DETAIL_KEYS <= set(r["details"])
        assert r["status"] == "ok" and r["suite"] == "speed" and r["model"]["name"] == "kernel"
        d, m = r["details"], r["metrics"]
        assert (d["level"], d["batch"], d["heads"], d["dim"], d["dtype"], d["device"]) == (
            "kernel", 1, 2, 16, "float32", r["device"])
        assert d["ms_q20"] <= m["ms"]["value"] <= d["ms_q80"] and m["ms"]["n"] >= 3
        assert m["tokens_per_s"]["value"] == pytest.approx(d["seqlen"] / m["ms"]["value"] * 1e3)
        assert d["tflops"] is None and isinstance(d["peak_mem_bytes"], int)
        assert r["state_bytes"]["seqlen"] == d["seqlen"]
        assert r["versions"]["torch"] == torch.__version__
    fake = [r for r in recs if r["method"] == "fake-linear"]
    assert {r["state_bytes"]["bytes"] for r in fake} == {8 * 16 * 16 * 4}
    # one config hash per shape, in the record path
    assert len({r["config_hash"] for r in recs}) == len(recs)
    # the report's speed table: one row per (method, mode, T), throughput vs the parent
    assert "| fake-linear | fwd | 64 | ok |" in out and "| fake-linear | fwdbwd | 256 | ok |" in out
    assert "tokens/s vs softmax" in out and "| softmax | fwd | 64 | ok |" in out
    assert err.count("[speed] fake-linear fwd T=") == 3


def test_timeout_and_oom_are_rows(capsys, tmp_path, fakes):
    results = tmp_path / "r"
    code, out, _ = cli(capsys, *SMALL, "--methods", "fake-linear", "--mode", "fwd",
                       "--time-cap", "0", "--results", str(results))
    assert code == 0
    recs = sorted(records(results), key=lambda r: r["details"]["seqlen"])
    assert [r["status"] for r in recs] == ["timeout"] * 3
    assert "first call" in recs[0]["details"]["note"]
    assert "already; not run" in recs[1]["details"]["note"]
    for r in recs:
        assert r["metrics"] == {} and DETAIL_KEYS <= set(r["details"])
    assert "| fake-linear | fwd | 64 | timeout |" in out
    assert "| fake-linear | fwd | 128 | timeout |" in out
    assert "fake-linear fwd T=128: timeout: timeout at T=64 already; not run" in out
    assert [r["details"]["ran"] for r in recs] == [True, False, False]

    # a real OutOfMemoryError at T >= 128, then larger T are oom without running
    code, out, _ = cli(capsys, *SMALL, "--methods", "fake-oom", "--mode", "fwd,fwdbwd",
                       "--results", str(results))
    assert code == 0
    oom = {(r["details"]["mode"], r["details"]["seqlen"]): r for r in records(results)
           if r["method"] == "fake-oom"}
    assert [oom[("fwd", T)]["status"] for T in (64, 128, 256)] == ["ok", "oom", "oom"]
    assert "OutOfMemoryError" in oom[("fwd", 128)]["details"]["note"]
    assert "not run" in oom[("fwd", 256)]["details"]["note"]
    assert oom[("fwdbwd", 128)]["status"] == "oom"  # fwd stopped at 128: fwdbwd cannot fit
    assert "fake-oom fwd T=128: oom: " in out and "fake-oom fwdbwd T=128: oom: " in out

    # a memory budget below the inputs themselves: oom by estimate, nothing allocated
    code, _, _ = cli(capsys, *SMALL, "--methods", "softmax", "--mode", "fwd",
                     "--mem-limit", "1e-6", "--results", str(tmp_path / "r2"))
    recs = sorted(records(tmp_path / "r2"), key=lambda r: r["details"]["seqlen"])
    assert code == 0 and [r["status"] for r in recs] == ["oom"] * 3
    assert "estimated" in recs[0]["details"]["note"]


def test_build_error_is_error_rows_and_exit_1(capsys, tmp_path, fakes):
    code, _, err = cli(capsys, *SMALL, "--methods", "fake-linear", "--mode", "fwd",
                       "--backend", "fla", "--results", str(tmp_path / "r"))
    recs = records(tmp_path / "r")
    assert code == 1 and len(recs) == 3 and {r["status"] for r in recs} == {"error"}
    assert "no fla backend" in recs[0]["details"]["note"] and "no fla backend" in err


def test_resume_reuses_records(capsys, tmp_path, fakes):
    results = tmp_path / "r"
    args = [*SMALL, "--methods", "fake-linear", "--mode", "fwd", "--results", str(results)]
    assert cli(capsys, *args)[0] == 0
    first = {r["config_hash"]: r["run_id"] for r in records(results)}
    code, out, err = cli(capsys, *args)
    assert code == 0 and err.count("reusing ok record") == 3
    assert {r["config_hash"]: r["run_id"] for r in records(results)} == first
    assert "| 128 |" in out  # the table is rebuilt from the reused records
    cli(capsys, *args, "--force")
    again = {r["config_hash"]: r["run_id"] for r in records(results)}
    assert again.keys() == first.keys() and not set(again.values()) & set(first.values())
    # timeouts are reused under the same cap, remeasured under a larger one
    cli(capsys, *args, "--seqlen", "512", "--time-cap", "0")
    _, _, err = cli(capsys, *args, "--seqlen", "512", "--time-cap", "0")
    assert "reusing timeout record" in err
    _, _, err = cli(capsys, *args, "--seqlen", "512")
    assert "reusing" not in err
    assert {r["status"] for r in records(results)} == {"ok"}


def test_records_from_another_cpu_are_not_reused(capsys, tmp_path, fakes, monkeypatch):
    """The device names the CPU model and ISA: a sweep on another machine of the same
    architecture measures again instead of reusing (or estimating from) the first one's
    rows (two CPUs reported as "cpu: x86_64" differed 4.8x in one bf16 fwd+bwd shape)."""
    from linbench.records import provenance
    results = tmp_path / "r"
    args = [*SMALL, "--methods", "fake-linear", "--mode", "fwd", "--results", str(results)]
    monkeypatch.setattr(provenance, "cpu_model", lambda: "CPU One")
    assert cli(capsys, *args)[0] == 0
    monkeypatch.setattr(provenance, "cpu_model", lambda: "CPU Two")
    code, _, err = cli(capsys, *args)
    assert code == 0 and "reusing" not in err
    devices = sorted({r["details"]["device"].split(" (")[0] for r in records(results)})
    assert devices == ["cpu: CPU One", "cpu: CPU Two"] and len(records(results)) == 6


def test_a_shape_that_killed_the_process_is_an_oom_row_next_time(capsys, tmp_path, fakes):
    """A process killed while measuring a shape (SIGKILL, as the OS out-of-memory killer
    does) leaves its marker; the resumed sweep records that shape "oom" with a note instead
    of running it (and being killed) again, stops the larger T, and --force runs it."""
    import os
    import subprocess
    import sys
    results = tmp_path / "r"
    # --threads: the device (with its thread count) is part of the shape's record key, and
    # the two processes must name the same record
    args = [*SMALL, "--methods", "fake-killed", "--mode", "fwd", "--threads", "1",
            "--results", str(results)]
    code = ("import sys; from linbench import registry; from linbench.cli import main; "
            "from tests.speed.test_sweep import FakeKilled; "
            "registry.methods.register('fake-killed', FakeKilled); main(sys.argv[1:])")
    env = {**os.environ, "LINBENCH_TEST_KILL": "1"}
    proc = subprocess.run([sys.executable, "-c", code, "speed", *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [r["details"]["seqlen"] for r in records(results)] == [64]  # 128 died unrecorded
    assert len(list(results.rglob("*.running"))) == 1

    code, out, err = cli(capsys, *args)
    assert code == 0, err
    recs = {r["details"]["seqlen"]: r for r in records(results)}
    assert [recs[T]["status"] for T in (64, 128, 256)] == ["ok", "oom", "oom"]
    assert "was killed while measuring this shape" in recs[128]["details"]["note"]
    assert recs[128]["details"]["ran"] is False and "not run" in recs[256]["details"]["note"]
    assert not list(results.rglob("*.running"))

    code, _, err = cli(capsys, *args, "--force")  # measured again: this time it raises
    recs = {r["details"]["seqlen"]: r for r in records(results)}
    assert recs[128]["status"] == "error" and "run again" in recs[128]["details"]["note"]
    assert not list(results.rglob("*.running"))


def test_a_sweep_that_starts_high_is_predicted_from_probes(capsys, tmp_path, fakes,
                                                            monkeypatch):
    """`--seqlen 4096` alone: two unrecorded probe calls at small lengths seed the guard,
    so a shape predicted past the cap is a timeout row without running (the fake mixer
    raises if it runs above 128); without probes the same shape runs."""
    from linbench.speed import timing
    monkeypatch.setattr(timing, "PROBE_LENGTHS", (64, 128))
    args = ["--seqlen", "4096", "--heads", "2", "--dim", "16", "--methods", "fake-small-only",
            "--mode", "fwd", "--time-cap", "0", "--results"]
    code, out, err = cli(capsys, *args, str(tmp_path / "r"))
    recs = records(tmp_path / "r")
    assert code == 0 and len(recs) == 1, err
    assert recs[0]["status"] == "timeout" and recs[0]["details"]["ran"] is False
    assert "estimated" in recs[0]["details"]["note"]
    assert "probed T=64" in err and "(not recorded)" in err
    monkeypatch.setattr(timing, "PROBE_LENGTHS", (64, 4096))  # 4096 is not above 2 x 4096
    code, _, err = cli(capsys, *args, str(tmp_path / "r2"))
    recs = records(tmp_path / "r2")
    assert recs[0]["status"] == "error" and "was run" in recs[0]["details"]["note"]


def test_a_forced_high_start_predicts_from_the_records_not_the_probes(capsys, tmp_path, fakes):
    """`--force` at a high first length with measured smaller lengths on disk: those
    records seed the prediction and nothing is probed (probes at 4K/8K once predicted a
    shape measured ok at 1M to run out of memory, and replaced its record)."""
    base = ["--heads", "2", "--dim", "16", "--methods", "fake-linear", "--mode", "fwd",
            "--target-seconds", "0.005", "--results", str(tmp_path / "r")]
    code, _, err = cli(capsys, "--seqlen", "1k,2k", *base)
    assert code == 0, err
    code, _, err = cli(capsys, "--seqlen", "64k", "--force", "--time-cap", "0", *base)
    rec = [r for r in records(tmp_path / "r") if r["details"]["seqlen"] == 65536]
    assert code == 0 and "probed" not in err, err
    assert rec[0]["status"] == "timeout" and rec[0]["details"]["ran"] is False


def test_guard_predicts_from_smaller_lengths():
    g = Guard()
    g.observe(64, "ok", 1.0, 1 << 20)
    g.observe(128, "ok", 2.0, 4 << 20)   # time ~ T, memory ~ T^2
    assert g.predict(256, 10.0, 64 << 20, 0) is None            # 4 s, 16 MiB: fits
    assert g.predict(256, 3.0, 64 << 20, 0)[0] == "timeout"     # 4 s > 3 s
    assert g.predict(256, 10.0, 16 << 20, 0)[0] == "oom"        # 16 MiB > 90% of 16 MiB
    assert g.predict(256, 10.0, 64 << 20, 60 << 20)[0] == "oom"  # lower bound of the inputs
    g.observe(256, "timeout", None, None)
    assert g.predict(512, 1e9, None, 0) == ("timeout", "timeout at T=256 already; not run")


def test_kernel_memory_is_not_extrapolated_below_linear():
    # peaks of small T are mostly fixed overhead: 0.85 GB at 32K, 2.9 GB at 128K fits T^0.88,
    # 18 GB at 1M, under 90% of 23 GB; lightning fwdbwd took 22 GB there and was killed
    g = Guard()
    g.observe(32768, "ok", 1.0, 846_274_560)
    g.observe(131072, "ok", 4.4, 2_872_053_760)
    budget = 23_103_250_432
    assert g.predict(1 << 20, 600.0, budget, 0) is None              # model level: may be flat
    status, why = g.predict(1 << 20, 600.0, budget, 0, mem_lo=1.0)  # kernel level
    assert status == "oom" and "GiB" in why
    assert g.predict(1 << 19, 600.0, budget, 0, mem_lo=1.0) is None  # 11.5 GB fits


def test_model_level_prefill_decode_on_tiny_llama(tmp_path):
    vocab = 512
    info = {"name": "tiny-llama", "file_hash": "0" * 64, "source": "test"}
    # each method measures in a fresh process (linbench.speed.isolate): the loader pickles
    source = ModelSource(info, functools.partial(make_tiny_llama, vocab_size=vocab))
    cfg = SpeedConfig(seqlens=[32, 64], methods=["softmax", "gla"], modes=["prefill", "decode"],
                      results_dir=str(tmp_path / "r"), target_s=0.005, max_reps=5)
    lines = []
    recs = sweep(cfg, echo=lines.append, model=source)
    assert len(recs) == 2 * 2 * 2 and all(r["status"] == "ok" for r in recs), \
        [r["details"]["note"] for r in recs]
    by = {(r["method"], r["details"]["mode"], r["details"]["seqlen"]): r for r in recs}
    for (method, mode, T), r in by.items():
        d = r["details"]
        assert r["model"] == info and r["config"]["model"] == {"name": "tiny-llama",
                                                               "file_hash": "0" * 64}
        assert (d["level"], d["batch"], d["heads"], d["dim"], d["layers"]) == ("model", 1, 4, 16, 2)
        tokens = T if mode == "prefill" else 1
        assert r["metrics"]["tokens_per_s"]["value"] == pytest.approx(
            tokens / r["metrics"]["ms"]["value"] * 1e3)
        assert d["setup_s"] >= 0 and isinstance(d["peak_mem_bytes"], int)
    # softmax KV cache: 2 (k, v) x 2 layers x 2 kv heads x 16 dims x T x 4 bytes
    assert by[("softmax", "decode", 64)]["state_bytes"]["bytes"] == 2 * 2 * 2 * 16 * 64 * 4
    # a linear method's state does not grow with T
    gla = [by[("gla", "decode", T)]["state_bytes"]["bytes"] for T in (32, 64)]
    assert gla[0] == gla[1] and gla[0] > 0
    files = list((tmp_path / "r" / "runs" / "tiny-llama").rglob("speed-*.json"))
    assert len(files) == 8
    # resume: nothing is measured again, the model is not even loaded
    source.load = lambda: pytest.fail("model loaded although every record exists")
    again = sweep(cfg, echo=lines.append, model=source)
    assert [r["run_id"] for r in again] == [r["run_id"] for r in recs]


def test_roofline_helpers():
    from linbench.speed.roofline import device_peaks, kernel_flops, kernel_io_bytes
    assert device_peaks("NVIDIA H100 80GB HBM3", torch.bfloat16) == (989.0, 3.35)
    assert device_peaks("NVIDIA H200", torch.bfloat16) == (989.0, 4.8)
    assert device_peaks("NVIDIA H100 PCIe", torch.float16)[1] == 2.0
    assert device_peaks("cpu: x86_64 x2 threads", torch.float32) == (None, None)
    B, T, H, D = 2, 4096, 8, 64
    assert kernel_flops("softmax", B, T, H, D, "fwd") == 2 * B * T * T * H * D  # suites/README.md, "Speed"
    fwd = kernel_flops("linear", B, T, H, D, "fwd", chunk=64)
    assert fwd == B * T * H * (2 * 64 * 128 + 4 * 64 * 64)
    assert kernel_flops("linear", B, T, H, D, "fwdbwd") == 3 * fwd
    assert kernel_io_bytes(B, T, H, D, 2, "fwd") == 4 * B * T * H * D * 2


def test_cpu_peak_memory_is_not_fooled_by_freed_heap():
    """glibc keeps freed 4 MiB chunks resident; a new shape must still count its own pages."""
    from linbench.speed.timing import PeakMemory
    for _ in range(3):
        big = [torch.ones(1 << 20) for _ in range(64)]  # 64 x 4 MiB, then freed
        del big
    with PeakMemory("cpu") as mem:
        xs = [torch.ones(1 << 20) for _ in range(16)]  # 64 MiB live
    assert len(xs) == 16 and 63 * 2**20 <= mem.bytes < 96 * 2**20


def test_speed_help_imports_no_torch():
    import subprocess
    import sys
    code = ("import sys\nfrom linbench.cli import main\n"
            "try:\n    main(['speed', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "print('HEAVY', [m for m in sys.modules if m.split('.')[0] in ('torch', 'triton')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout and "--seqlen" in out.stdout


def test_the_sweep_estimate_reads_the_same_shape_or_extrapolates_it():
    """Earlier records of the same method, level, mode, dtype and device: the same length
    gives its seconds, a longer one the power-law extrapolation through the nearest two
    (a softmax-like 4x per doubling is T^2), other shapes the median; each capped."""
    from linbench.speed.sweep import estimate_seconds

    def rec(method, T, seconds, mode="fwd"):
        return {"method": method, "device": "cpu", "seconds": seconds,
                "config": {"level": "kernel", "mode": mode, "dtype": "float32", "seqlen": T}}
    history = [rec("a", 1024, 1.0), rec("a", 2048, 4.0), rec("b", 1024, 10.0)]
    shape = lambda m, T, mode="fwd": (m, "kernel", mode, "float32", "cpu", T)  # noqa: E731
    assert estimate_seconds(history, [shape("a", 2048)], 1e9)[0] == pytest.approx(4.0)
    assert estimate_seconds(history, [shape("a", 8192)], 1e9)[0] == pytest.approx(64.0)
    assert estimate_seconds(history, [shape("b", 4096)], 1e9)[0] == pytest.approx(40.0)
    total, basis = estimate_seconds(history, [shape("a", 8192), shape("c", 1024)], 1e9)
    assert total == pytest.approx(64.0 + 4.0) and "1 of 2 shapes" in basis  # median 4.0
    assert estimate_seconds(history, [shape("a", 1 << 21)], 600)[0] == 600  # capped
    assert "rough default" in estimate_seconds([], [shape("a", 1024)], 600, 7.0)[1]


def _cheap_probes(monkeypatch, timing):
    """The probe loop alone: no process-wide peak-memory reads, garbage collections or
    meminfo reads (in a full test session each costs up to a second)."""
    class NoPeak:
        bytes = None

        def __init__(self, device):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(timing, "PeakMemory", NoPeak)
    monkeypatch.setattr(timing, "available_bytes", lambda device: 1 << 40)
    monkeypatch.setattr(timing.gc, "collect", lambda: 0)


def test_a_probe_keeps_the_faster_of_its_calls(monkeypatch):
    """A probe's first call pays one-time costs; extrapolated from 8K to 2M they once
    turned a one-minute shape into a predicted timeout. Each probe length keeps its faster
    call, so a target whose first call is slow is predicted from its steady calls."""
    from linbench.speed import timing

    class FirstCallSlow:
        calls = 0

        def prepare(self, mode, T):
            def run():
                FirstCallSlow.calls += 1
                time.sleep(0.2 if FirstCallSlow.calls == 1 else 0.001 * T / 64)
            return run, None

    monkeypatch.setattr(timing, "PROBE_LENGTHS", (64, 128))
    _cheap_probes(monkeypatch, timing)
    g = Guard()
    done = timing.probe(FirstCallSlow(), "fwd", 512, g, "cpu")  # 512 / 4: no longer probe
    assert len(done) == 2 and FirstCallSlow.calls == 2 * timing.PROBE_CALLS
    (t1, s1, _), (t2, s2, _) = g.points
    assert (t1, t2) == (64, 128) and s1 < 0.1 and s2 < 0.1, g.points
    # the steady calls scale ~T: 4096 is predicted near 64 ms, not from the 0.2 s call
    assert g.predict(4096, 1.0, None, 0) is None


def test_probes_climb_while_the_next_length_is_cheap(monkeypatch):
    """After the fixed probe lengths, 8x longer probes follow while the guard predicts
    them cheap and they stay at most T_first / 4, so a 2M shape is predicted from 512K,
    not from 8K (whose fixed costs, times 256, once predicted an oom for a 9 GiB shape)."""
    from linbench.speed import timing

    class Linear:  # sleeps `per` seconds per token
        def __init__(self, per):
            self.per, self.lengths = per, []

        def prepare(self, mode, T):
            self.lengths.append(T)
            return (lambda: time.sleep(self.per * T)), None

    monkeypatch.setattr(timing, "PROBE_LENGTHS", (64, 128))
    _cheap_probes(monkeypatch, timing)
    fast = Linear(1e-7)
    timing.probe(fast, "fwd", 1 << 21, Guard(), "cpu")
    assert fast.lengths == [64, 128, 1024, 8192, 65536, 524288]  # 524288 = 2M / 4
    monkeypatch.setattr(timing, "PROBE_SECONDS", 0.05)
    slow = Linear(1e-4)  # 1024 would take ~0.1 s > max(0.05 s, cap / 20 = 0.05 s): not probed
    timing.probe(slow, "fwd", 1 << 21, Guard(), "cpu", time_cap=1)
    assert slow.lengths == [64, 128]
    slow = Linear(1e-4)  # a 4 s cap allows 0.2 s per probe: 1024 (~0.1 s) is, 8192 is not
    timing.probe(slow, "fwd", 1 << 21, Guard(), "cpu", time_cap=4)
    assert slow.lengths == [64, 128, 1024]
