"""The one timing loop (linbench.speed.timing), the one FLOP / bytes model
(linbench.speed.roofline) and the one fla peer list (linbench.speed.peers), which
`linbench speed` and the kernel device check share; and kernel-level rows of real
kernels. Timings themselves are never asserted."""
from __future__ import annotations

import inspect
import json
import types

import pytest
import torch

from linbench.speed import peers, roofline, timing
from linbench.units import parse_lengths as parse_seqlens


@pytest.mark.parametrize("text, expected", [
    ("2k", [2048]),
    ("2k,8k,1M", [2048, 8192, 1 << 20]),
    ("2k..16k", [2048, 4096, 8192, 16384]),
    ("512,512,1k", [512, 1024]),
])
def test_parse_seqlens(text, expected):
    assert parse_seqlens(text) == expected


@pytest.mark.parametrize("bad", ["", "2x", "3k..8k", "8k..2k", "2k..", "-1"])
def test_parse_seqlens_rejects(bad):
    with pytest.raises(ValueError):
        parse_seqlens(bad)


def test_quantile_interpolates_like_numpy():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert timing.quantile(xs, 0.5) == 3.0
    assert timing.quantile(xs, 0.2) == pytest.approx(1.8)
    assert timing.quantile(xs, 0.8) == pytest.approx(4.2)
    assert timing.quantile([7.0], 0.2) == 7.0


def test_time_call_reports_quantiles_not_min_max(monkeypatch):
    """A scripted clock: warm-up 60 ms, then reps of 10, 20, 30, 40, 50 ms."""
    ticks = iter([0.0, 0.06] + [x for i, d in enumerate([0.01, 0.02, 0.03, 0.04, 0.05])
                                for x in (1.0 + i, 1.0 + i + d)])
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    ms, reps, status = timing.time_call(lambda: None, "cpu", cap_s=10, target_s=0.01,
                                        min_reps=5, max_reps=5)
    assert status == "ok" and reps == 5
    assert ms == pytest.approx([30.0, 18.0, 42.0])  # median, q20, q80 (min / max: 10, 50)


def test_time_call_timeout_on_the_first_call(monkeypatch):
    ticks = iter([0.0, 2.0])
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    ms, reps, status = timing.time_call(lambda: None, "cpu", cap_s=1.0)
    assert status == "timeout" and reps == 1 and ms[0] == pytest.approx(2000.0)


def test_a_long_first_call_is_the_measurement(monkeypatch):
    """A scripted clock: a first call of 40 s (>= SINGLE_CALL_S) is measured once, n = 1;
    one of 20 s is a warm-up followed by the loop."""
    calls = []
    ticks = iter([0.0, 40.0])
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    ms, reps, status = timing.time_call(lambda: calls.append(1), "cpu", cap_s=600, target_s=0)
    assert (status, reps, len(calls)) == ("ok", 1, 1) and ms[0] == pytest.approx(40000.0)
    ticks = iter([0.0, 20.0, 100.0, 121.0, 200.0, 222.0, 300.0, 319.0])
    calls.clear()
    ms, reps, status = timing.time_call(lambda: calls.append(1), "cpu", cap_s=600, target_s=0)
    assert (status, reps, len(calls)) == ("ok", 3, 4) and ms[0] == pytest.approx(21000.0)
    # a --target-seconds longer than the call still gets its loop
    ticks = iter([0.0, 40.0, 100.0, 141.0, 200.0, 242.0, 300.0, 339.0])
    ms, reps, status = timing.time_call(lambda: None, "cpu", cap_s=600, target_s=100)
    assert (status, reps) == ("ok", 3) and ms[0] == pytest.approx(41000.0)


def test_prepared_call_modes():
    x = torch.randn(3, requires_grad=True)
    w = torch.nn.Parameter(torch.ones(3))
    seen = []

    def fn(x):
        seen.append(torch.is_grad_enabled())
        return x * w

    timing.prepared_call(fn, [x], [w], "fwd")()
    assert seen == [False]
    run = timing.prepared_call(fn, [x], [w], "fwdbwd")
    run()
    run()
    assert seen[1:] == [True, True] and x.grad is None and w.grad is None  # nothing accumulates
    with pytest.raises(ValueError, match="unknown mode"):
        timing.prepared_call(fn, [x], [w], "bwd")


def test_roofline_model():
    B, T, H, D = 1, 1024, 4, 64
    fwd = roofline.kernel_flops("linear", B, T, H, D, "fwd")
    assert roofline.kernel_flops("linear", B, T, H, D, "fwd", chunk=32) < fwd
    assert roofline.kernel_flops("softmax", B, T, H, D, "fwdbwd") == 3.5 * 2 * B * T * T * H * D
    with pytest.raises(ValueError, match="no FLOP formula"):
        roofline.kernel_flops("window", B, T, H, D, "fwd")
    with pytest.raises(ValueError, match="no FLOP formula"):
        roofline.kernel_flops("linear", B, T, H, D, "fwd+bwd")
    io = roofline.kernel_io_bytes(B, T, H, D, 2, "fwdbwd")
    assert io == 12 * B * T * H * D * 2
    r = roofline.roofline(989e12, 4.8e12, 1.0, "NVIDIA H200", torch.bfloat16)
    assert r["tflops"] == pytest.approx(989) and r["pct_peak"] == pytest.approx(100)
    assert r["gbps"] == pytest.approx(4800) and r["pct_peak_bw"] == pytest.approx(100)
    assert roofline.roofline(1e12, 1e9, 1.0, "cpu", torch.float32)["pct_peak"] is None


def test_peer_list():
    """Every peer names a public linbench kernel; its inputs are q, k, v (B, T, H, D) and
    extras over (B, T, H); no peers off CUDA."""
    import linbench.kernels as K
    assert set(peers.FLA_PEERS) == {"fla:linear", "fla:simple_gla", "fla:gla", "fla:delta"}
    for name, peer in peers.FLA_PEERS.items():
        assert peer.kernel in K.__all__, name
        xs = peer.inputs(2, 8, 3, 4, torch.float32, "cpu")
        assert [tuple(x.shape[:3]) for x in xs] == [(2, 8, 3)] * len(xs), name
        assert all(x.dtype == torch.float32 for x in xs)
    assert not peers.fla_available("cpu")


def test_peer_ops_exist_in_fla():
    pytest.importorskip("fla")
    import fla.ops
    for name, peer in peers.FLA_PEERS.items():
        op = getattr(fla.ops, peer.op)
        params = inspect.signature(op).parameters
        assert set(peer.kwargs) <= set(params), name
        assert len(peer.extra(1, 4, 2, 4, torch.float32, "cpu")) + 3 <= len(params), name
    assert peers.fla_version() == fla.__version__


def test_real_kernel_rows_are_ok(capsys, tmp_path):
    """`linbench speed` at kernel level through real kernels (chunked linear with decay,
    GLA, delta rule, window + linear hybrid; SDPA is in test_sweep), fwd and fwdbwd: one
    ok row per shape, its median between its quantiles."""
    from linbench.cli import main
    results = tmp_path / "r"
    methods = ["lightning", "gla", "deltanet", "lolcats"]
    with pytest.raises(SystemExit) as exc:
        main(["speed", "--seqlen", "100", "--heads", "2", "--dim", "16", "--methods",
              ",".join(methods), "--mode", "fwd,fwdbwd", "--target-seconds", "0.002",
              "--device", "cpu", "--quiet", "--results", str(results)])
    err = capsys.readouterr().err
    assert exc.value.code == 0, err
    recs = [json.loads(p.read_text()) for p in (results / "runs").rglob("*.json")]
    rows = {(r["method"], r["details"]["mode"]): r for r in recs}
    assert set(rows) == {(m, mode) for m in methods for mode in ("fwd", "fwdbwd")}
    for key, r in rows.items():
        d, ms = r["details"], r["metrics"]["ms"]
        assert r["status"] == "ok" and d["seqlen"] == 100, (key, d["note"])
        assert d["ms_q20"] <= ms["value"] <= d["ms_q80"] and ms["n"] >= 3, key
