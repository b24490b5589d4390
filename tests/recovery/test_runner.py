"""The runner's options (--seed, --data, --checkpoints, --batch-size, --revision), the
checkpoint cache (round trips of non-default configs and bf16, the code-version key), the
announced plan and estimate, and the resume hint on Ctrl-C -- on the tiny random Llama."""
from __future__ import annotations

import hashlib
import json
import pathlib

import pytest
import torch

from linbench import estimate, registry
from linbench.recovery import cache, stages
from tests.recovery.test_recovery import write_corpus

SUITE = "plugin-nll"


@pytest.fixture
def env(tmp_path, tiny_model_dir, plugin_path, monkeypatch):
    monkeypatch.setenv("LINBENCH_CACHE", str(tmp_path / "cache"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {"model": str(tiny_model_dir), "data": str(write_corpus(tmp_path / "c.jsonl", n=200)),
           "tmp": tmp_path}
    torch.set_num_threads(n)


def run_args(env, *extra, method="lolcats", results="r", ckpt="ckpt"):
    return ["run", "--model", env["model"], "--methods", method, "--suite", SUITE,
            "--budget", "smoke", "--data", env["data"], "--results", str(env["tmp"] / results),
            "--checkpoints", str(env["tmp"] / ckpt), "--quiet", *extra]


def the_records(results) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(pathlib.Path(results).rglob("runs/**/*.json"))]


# -- run options ----------------------------------------------------------------------------
def test_seed_is_recorded_and_keys_the_record_and_the_checkpoint(env, invoke):
    for seed in (1, 2):
        code, _, err = invoke(*run_args(env, "--seed", seed))
        assert code == 0, err
    a, b = the_records(env["tmp"] / "r")
    assert {a["seeds"]["suite"], b["seeds"]["suite"]} == {1, 2}
    assert a["seeds"]["recovery"] == a["seeds"]["suite"]
    assert a["config_hash"] != b["config_hash"]
    assert a["budget"] == b["budget"] == "smoke"  # as given: the report names the preset
    assert len(list((env["tmp"] / "ckpt").glob("*/model"))) == 2  # two recoveries
    assert a["metrics"]["nll"]["value"] != b["metrics"]["nll"]["value"]


def test_data_is_hashed_into_the_record_and_another_corpus_is_another_result(env, invoke):
    code, _, err = invoke(*run_args(env))
    assert code == 0, err
    other = write_corpus(env["tmp"] / "other.jsonl", n=200, seed=7)
    code, _, err = invoke(*run_args({**env, "data": str(other)}))
    assert code == 0, err
    recs = the_records(env["tmp"] / "r")
    shas = sorted(r["config"]["recovery"]["data"]["sha256"] for r in recs)
    want = sorted(hashlib.sha256(pathlib.Path(p).read_bytes()).hexdigest() for p in (env["data"], other))
    assert shas == want
    assert len(list((env["tmp"] / "ckpt").glob("*/model"))) == 2


def test_checkpoints_go_where_asked_and_nowhere_else(env, invoke):
    code, _, err = invoke(*run_args(env, ckpt="mine"))
    assert code == 0, err
    (model,) = (env["tmp"] / "mine").glob("*/model")
    assert (model / "manifest.json").exists()
    assert not (env["tmp"] / "cache" / "checkpoints").exists()


def test_batch_size_reaches_the_suites(env, invoke):
    code, _, err = invoke(*run_args(env, "--batch-size", "3", method="softmax"))
    assert code == 0, err
    (rec,) = the_records(env["tmp"] / "r")
    assert rec["context"]["batch_size"] == 3


def test_revision_reaches_model_resolution(env, invoke, monkeypatch):
    from linbench.assets import models
    from linbench.errors import LinbenchError
    seen = []

    def resolve(name, revision=None):
        seen.append((name, revision))
        raise LinbenchError("stop here")
    monkeypatch.setattr(models, "resolve", resolve)
    code, _, err = invoke("run", "--model", "org/llama", "--revision", "v2", "--methods",
                          "softmax", "--suite", SUITE, "--results", str(env["tmp"] / "r"))
    assert code == 2 and seen == [("org/llama", "v2")] and "stop here" in err


def test_ctrl_c_says_how_to_resume(env, invoke, monkeypatch):
    from linbench import run as runner

    def interrupted(plan, echo):
        raise KeyboardInterrupt
    monkeypatch.setattr(runner, "run", interrupted)
    args = run_args(env, method="softmax")
    code, _, err = invoke(*args)
    assert code == 130
    (line,) = err.strip().splitlines()
    assert "interrupted" in line and "kept" in line
    assert f"rerun `linbench {' '.join(args)}` to resume" in line


# -- the checkpoint cache ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype, overrides", [
    ("float32", {"window": 16, "feature_map": "hedgehog", "gamma_init": -1.0, "lora_r": 4}),
    ("bfloat16", {}),
], ids=["non-default-config", "bf16"])
def test_recovered_checkpoint_round_trips_exactly(env, dtype, overrides):
    from linbench.assets import models
    spec = models.resolve(env["model"])
    method = registry.methods.get("lolcats")(**overrides)
    recovery = cache.recovery_config(method, "smoke", env["data"], 0)
    ckpt = cache.checkpoint_dir(env["tmp"] / "ckpt", spec.file_hash, method.config_dict(),
                                recovery, dtype)
    kw = dict(budget="smoke", data=env["data"], seed=0, dtype=dtype, device="cpu", progress=False)
    logs = []
    trained, tok = cache.recovered(method, "lolcats", spec, ckpt, echo=logs.append, **kw)
    assert any("recovering on" in s for s in logs)
    logs.clear()
    loaded, _ = cache.recovered(method, "lolcats", spec, ckpt, echo=logs.append, **kw)
    assert any("reusing recovered checkpoint" in s for s in logs)
    from linbench.methods import io
    assert io.method_of(loaded.config).config_dict() == method.config_dict()
    for k, v in overrides.items():
        assert loaded.config.linbench["config"][k] == v
    assert next(loaded.parameters()).dtype == getattr(torch, dtype)
    ref = trained.state_dict()
    for k, v in loaded.state_dict().items():
        assert v.dtype == ref[k].dtype and torch.equal(v, ref[k]), k
    ids = torch.tensor([tok("the cat sat on a mat").input_ids])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, trained(ids).logits)
    assert stages.stages_of(loaded) == json.loads(json.dumps(stages.stages_of(trained)))


def test_checkpoint_key_follows_the_code_version(monkeypatch):
    def key():
        return cache.checkpoint_dir("/c", "model", {"name": "lolcats"}, {"budget": 1}, "float32")
    base, version = key(), stages.code_version()
    real = pathlib.Path.read_bytes

    def edited(name):
        def read_bytes(self):
            return real(self) + (b"\n# edited" if self.name == name else b"")
        return read_bytes
    monkeypatch.setattr(pathlib.Path, "read_bytes", edited("lolcats.py"))  # a method's code
    assert stages.code_version() != version and key() != base
    monkeypatch.setattr(pathlib.Path, "read_bytes", edited("train.py"))  # the training loop
    assert stages.code_version() != version
    monkeypatch.setattr(pathlib.Path, "read_bytes", edited("bench.py"))  # benchmarks: no change
    assert stages.code_version() == version and key() == base
    monkeypatch.setattr(stages, "code_version", lambda: "0.0.0+other")
    assert key() != base and key().parent == base.parent


# -- the announced plan -----------------------------------------------------------------------
def _plan(env, limit=None, device="cpu"):
    from linbench import run as runner
    from linbench.suites.base import RunContext
    ctx = RunContext(limit=limit, device=device, dtype="float32", progress=False, seed=0)
    return runner.RunPlan(env["model"], ["lolcats"], [SUITE], ctx, str(env["tmp"] / "r"),
                          budget="smoke", data=env["data"], checkpoints=str(env["tmp"] / "ckpt"))


def test_the_budget_sets_the_lora_lr_of_recovering_methods_and_set_wins(env):
    from linbench import run as runner
    from linbench.records.schema import method_label as label
    plan = _plan(env)
    for budget, sets, want in (("cpu", {}, 1e-3), ("paper", {}, 1e-4), ("smoke", {}, 1e-4),
                               ("cpu,lora_lr=3e-4", {}, 3e-4),
                               ("cpu", {"lolcats": {"lora_lr": 5e-5}}, 5e-5)):
        plan.budget, plan.overrides = budget, sets
        assert runner.configured(plan, "lolcats").config.lora_lr == want, (budget, sets)
    # a method without recovery keeps its config (and so its records' hashes) as it was
    plan.budget, plan.overrides = "cpu", {}
    assert runner.configured(plan, "swa").config == registry.methods.get("swa")().config
    # the budget's lr is in the record's method config; the label names only --set values
    plan.budget = "smoke,lora_lr=0.002"
    spec, store, (job,) = runner.preflight(plan)
    assert job.config["method"]["lora_lr"] == 0.002 and job.method == label("lolcats", {})
    plan.budget = "smoke"
    assert runner.preflight(plan)[2][0].key != job.key


def test_the_plan_without_history_uses_a_stated_rough_default(env):
    from linbench import run as runner
    plan = _plan(env)
    spec, store, jobs = runner.preflight(plan)
    lines = []
    got = estimate.announce(plan, spec, store, jobs, lines.append)
    text = "\n".join(lines)
    assert "1 method(s) x 1 suite(s)" in text and "1 record(s) to compute" in text
    assert "lolcats: recovery transfer 4 steps + lora 4 steps of 1 x 128 tokens" in text
    assert "rough default" in text and "no earlier records" in text
    # 512 transfer tokens at 490/s + 512 lora tokens at 300/s; the suite is not measured
    assert got["seconds"] == pytest.approx(512 / 490 + 512 / 300)
    assert got["unknown"] == [f"lolcats/{SUITE}"] and "at least" in lines[-1]
    assert f"WARNING: {SUITE} without --limit may take hours (its size is not known in advance) on CPU" in text and "--limit N" in text
    lines.clear()
    estimate.announce(_plan(env, limit=5), spec, store, jobs, lines.append)
    assert "WARNING" not in "\n".join(lines)
    # a stage 1 another recovery published (linbench.recovery.share) costs nothing
    from linbench.recovery import cache
    (job,) = jobs
    cache.transfer_dir(plan.checkpoints, spec.file_hash, job.config["method"],
                       job.config["recovery"], "float32").mkdir(parents=True)
    lines.clear()
    got = estimate.announce(plan, spec, store, jobs, lines.append)
    assert "lolcats: recovery transfer shared (trained by an earlier recovery) + lora 4 steps" in \
        "\n".join(lines)
    assert got["seconds"] == pytest.approx(512 / 300)


def test_the_plan_warns_about_missing_embedded_data(env, monkeypatch):
    from linbench import run as runner
    from linbench.assets import data
    plan = _plan(env, limit=5)
    spec, store, jobs = runner.preflight(plan)
    real = data.status()
    monkeypatch.setattr(data, "status", lambda: [{**real[0], "ok": False}, *real[1:]])
    lines = []
    estimate.announce(plan, spec, store, jobs, lines.append)
    (warning,) = [s for s in lines if "WARNING" in s]
    assert f"embedded data not installed: {real[0]['name']}" in warning and "linbench fetch" in warning


def test_the_plan_estimates_from_earlier_records_on_this_machine(env):
    from linbench import run as runner
    from linbench.records import provenance
    plan = _plan(env)
    spec, store, jobs = runner.preflight(plan)
    (job,) = jobs
    earlier = {"schema_version": 1, "run_id": "x", "created": "now", "model": {"file_hash": spec.file_hash},
               "method": "lolcats", "suite": SUITE, "config": {**job.config, "seed_other": 1},
               "config_hash": "other", "status": "ok", "device": provenance.device_name("cpu"),
               "metrics": {"nll": {"value": 3.0, "stderr": 0.1, "n": 40}}, "seconds": 20.0,
               "recovery": [{"stage": "transfer", "tokens": 1000, "seconds": 10.0},
                            {"stage": "lora", "tokens": 1000, "seconds": 20.0}]}
    store.write(store.path("m", "lolcats", SUITE, "other"), earlier)
    elsewhere = {**earlier, "device": "another machine", "seconds": 1e6}
    store.write(store.path("m", "lolcats", SUITE, "elsewhere"), elsewhere)
    lines = []
    got = estimate.announce(plan, spec, store, jobs, lines.append)
    text = "\n".join(lines)
    # 512 tokens x 0.01 s + 512 x 0.02 s; 40 items (from the earlier record) x 0.5 s/item
    assert got["seconds"] == pytest.approx(5.12 + 10.24 + 20.0)
    assert got["unknown"] == [] and got["history"] == 1
    assert "from 1 earlier record(s) of this model on this machine" in lines[-1]
    assert "~35 s" in lines[-1] and "40 items" in text and "WARNING" not in text
    # a measured full suite of hours on CPU says so, with the way to bound it
    store.write(store.path("m", "lolcats", SUITE, "other"), {**earlier, "seconds": 8000.0})
    lines.clear()
    got = estimate.announce(plan, spec, store, jobs, lines.append)
    assert got["seconds"] == pytest.approx(5.12 + 10.24 + 8000.0)
    (warning,) = [s for s in lines if "WARNING" in s]
    assert f"{SUITE} without --limit takes ~2.2 h per method on CPU; pass --limit N" in warning


def test_speed_announces_its_shapes_before_running(env, invoke, monkeypatch):
    from linbench.speed import sweep
    ran = []
    monkeypatch.setattr(sweep._Sweep, "rows", lambda self, *a, **k: ran.append(a[0]))
    code, out, err = invoke("speed", "--seqlen", "2k..2M", "--methods", "lolcats,gla",
                            "--mode", "fwd,fwdbwd", "--results", str(env["tmp"] / "r"),
                            "--time-cap", "10")
    assert code == 0, err
    (line,) = [s for s in err.splitlines() if "plan:" in s]
    assert "44 shapes" in line and "2K..2M" in line.upper() and "rough default" in line
    assert "at most 7 min at --time-cap 10 s per shape" in line  # 44 x 10 s
    assert ran == ["lolcats", "gla"]


def test_speed_checks_its_results_directory_before_any_shape(env, invoke, monkeypatch):
    from linbench.speed import sweep
    monkeypatch.setattr(sweep._Sweep, "rows", lambda self, *a, **k: pytest.fail("a shape ran"))
    blocker = env["tmp"] / "afile"
    blocker.write_text("x")
    code, out, err = invoke("speed", "--seqlen", "2k", "--methods", "lolcats", "--mode", "fwd",
                            "--results", str(blocker / "r"))
    assert code == 2
    assert err.strip() == (f"linbench: error: --results {blocker / 'r'} is under {blocker}, "
                           f"which is a file, not a directory (give a directory path)")
