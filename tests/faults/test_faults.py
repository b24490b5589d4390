"""Fault injection: every failure of issue 12, reproduced on the tiny random Llama with a
local corpus and the `smoke` budget (seconds each). Each test asserts the exit code, the
one line that names the fault, and that no good data was lost or overwritten."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PLUGIN_DIR
from tests.recovery.test_recovery import write_corpus

SUITE = "plugin-nll"  # tests/core/plugin_dist: a real next-token NLL of a fixed text


def strict(path) -> dict:
    """The record, parsed as strict JSON (NaN/Infinity tokens are an error)."""
    def no(name):
        raise AssertionError(f"non-strict JSON token {name} in {path}")
    return json.loads(Path(path).read_text(), parse_constant=no)


def records(results) -> list[Path]:
    return sorted(Path(results, "runs").rglob("*.json"))


def lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    """Model, corpus and a private LINBENCH_CACHE; the test plugin on sys.path."""
    root = tmp_path_factory.mktemp("faults")
    data = write_corpus(root / "corpus.jsonl", n=200)
    sys.path.insert(0, str(PLUGIN_DIR))
    old = os.environ.get("LINBENCH_CACHE")
    os.environ["LINBENCH_CACHE"] = str(root / "cache")
    yield {"model": str(tiny_model_dir), "data": str(data), "root": root}
    sys.path.remove(str(PLUGIN_DIR))
    if old is None:
        os.environ.pop("LINBENCH_CACHE", None)
    else:
        os.environ["LINBENCH_CACHE"] = old


def lb(*args) -> tuple[int, str, str]:
    """`linbench ARGS` in this process: (exit code, stdout, stderr)."""
    from linbench.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(map(str, args)))
        except SystemExit as e:
            code = e.code
        else:  # pragma: no cover
            code = None
    return code, out.getvalue(), err.getvalue()


def run_args(env, results, ckpt, *extra, method="lolcats", suite=SUITE):
    return ["run", "--model", env["model"], "--methods", method, "--suite", suite,
            "--budget", "smoke", "--data", env["data"], "--results", results,
            "--checkpoints", ckpt, "--quiet", *extra]


@pytest.fixture(scope="module")
def good(env):
    """One finished lolcats run: its results dir, checkpoint dir, record and value."""
    results, ckpt = env["root"] / "good-results", env["root"] / "good-ckpt"
    code, out, err = lb(*run_args(env, results, ckpt))
    assert code == 0, err
    (path,) = records(results)
    rec = strict(path)
    assert rec["status"] == "ok" and math.isfinite(rec["metrics"]["nll"]["value"])
    (model_dir,) = [p for p in ckpt.glob("*/model")]
    return {"results": results, "ckpt": ckpt, "path": path, "record": rec,
            "value": rec["metrics"]["nll"]["value"], "model_dir": model_dir}


@pytest.fixture
def copy(good, tmp_path):
    """A private copy of the good results and checkpoints to break."""
    r, c = tmp_path / "results", tmp_path / "ckpt"
    shutil.copytree(good["results"], r)
    shutil.copytree(good["ckpt"], c)
    rel_rec = good["path"].relative_to(good["results"])
    rel_model = good["model_dir"].relative_to(good["ckpt"])
    return {"results": r, "ckpt": c, "path": r / rel_rec, "model_dir": c / rel_model}


# -- numbers are finite or the run fails ----------------------------------------------------
def test_nan_loss_stops_the_stage_caches_nothing_and_records_an_error(env, tmp_path):
    results, ckpt = tmp_path / "r", tmp_path / "c"
    code, out, err = lb(*run_args(env, results, ckpt, "--set", "lolcats.transfer_weight=1e39"))
    assert code == 1, err
    (line,) = lines_with(err, "diverged")
    assert "recovery stage transfer diverged: training loss inf at step 1 of 4" in line
    assert "nothing cached" in line and "Traceback" not in err
    (path,) = records(results)
    rec = strict(path)  # strict JSON
    assert rec["status"] == "error" and "diverged" in rec["error"] and rec["metrics"] == {}
    assert not list(ckpt.rglob("model")) and not list(ckpt.rglob("work"))
    assert not list(ckpt.rglob("*.safetensors"))
    # the leaderboard's reader sees an error row, never an ok one
    from linbench.records.store import Store
    recs, skipped = Store(results).scan()
    assert [r["status"] for r in recs] == ["error"] and skipped == []


class NaNSuite:
    name, version = "fault-nan", "1"

    def config(self, ctx):
        return {}

    def run(self, model, tokenizer, ctx):
        from linbench.suites.base import Metric, Record
        return [Record(self.name, {"ppl_wiki": Metric(float("nan"), None, 10),
                                   "ok_metric": Metric(1.5, None, 10)})]


class RaisingSuite(NaNSuite):
    name = "fault-raise"

    def run(self, model, tokenizer, ctx):
        raise RuntimeError("the suite broke on item 3")


@pytest.fixture
def fault_suites():
    from linbench import registry
    registry.suites.register("fault-nan", NaNSuite)
    registry.suites.register("fault-raise", RaisingSuite)
    yield
    registry.suites.unregister("fault-nan")
    registry.suites.unregister("fault-raise")


def test_a_non_finite_metric_is_an_error_in_strict_json(env, tmp_path, fault_suites):
    results = tmp_path / "r"
    code, out, err = lb(*run_args(env, results, tmp_path / "c", method="softmax",
                                  suite=f"fault-nan,{SUITE}"))
    assert code == 1
    (line,) = lines_with(err, "non-finite metric")
    assert "softmax/fault-nan" in line and "ppl_wiki" in line
    by_suite = {strict(p)["suite"]: strict(p) for p in records(results)}
    bad, fine = by_suite["fault-nan"], by_suite[SUITE]
    assert bad["status"] == "error" and bad["metrics"]["ppl_wiki"]["value"] is None
    assert bad["metrics"]["ok_metric"]["value"] == 1.5
    assert fine["status"] == "ok"
    text = "".join(p.read_text() for p in records(results))
    assert not re.search(r"[:\[,]\s*-?(NaN|Infinity)\b", text)  # no bare non-JSON tokens


def test_a_suite_that_raises_is_an_error_record_and_exit_1(env, tmp_path, fault_suites):
    results = tmp_path / "r"
    code, out, err = lb(*run_args(env, results, tmp_path / "c", method="softmax",
                                  suite=f"fault-raise,{SUITE}"))
    assert code == 1
    (line,) = lines_with(err, "the suite broke")
    assert line == "linbench: softmax/fault-raise error: RuntimeError: the suite broke on item 3"
    by_suite = {strict(p)["suite"]: strict(p) for p in records(results)}
    assert by_suite["fault-raise"]["status"] == "error"
    assert "RuntimeError" in by_suite["fault-raise"]["traceback"]
    assert by_suite[SUITE]["status"] == "ok"  # the other suite of the run still counts
    # an error record is recomputed by the next run, an ok one reused
    code, _, err = lb(*run_args(env, results, tmp_path / "c", method="softmax",
                                suite=f"fault-raise,{SUITE}"))
    assert code == 1 and len(lines_with(err, "reusing finished record")) == 1


# -- integrity of cached checkpoints --------------------------------------------------------
def _garbage(f: Path):
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.seek(size // 2 - (1 << 19))
        fh.write(os.urandom(1 << 20))
    assert f.stat().st_size == size


def _truncate(f: Path):
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)


@pytest.mark.parametrize("damage, why", [
    (_garbage, "model.safetensors does not match its sha256 in the manifest"),
    (_truncate, "model.safetensors has"),
    (lambda f: (f.parent / "manifest.json").unlink(), "no manifest.json"),
], ids=["garbage", "truncated", "no-manifest"])
def test_a_bad_checkpoint_is_named_set_aside_and_rebuilt(env, good, copy, damage, why):
    damage(copy["model_dir"] / "model.safetensors")
    code, out, err = lb(*run_args(env, copy["results"], copy["ckpt"], "--force"))
    assert code == 0, err
    (line,) = lines_with(err, "is bad")
    assert f"cached checkpoint {copy['model_dir']} is bad ({why}" in line
    assert "rebuilding" in line and "Traceback" not in err
    assert len(lines_with(err, "recovering on")) == 1
    aside = list(copy["model_dir"].parent.glob("model.corrupt-*"))
    assert len(aside) == 1 and (aside[0] / "model.safetensors").exists()  # kept for inspection
    from linbench.assets import manifest
    assert manifest.problem(copy["model_dir"]) is None  # rebuilt, with a good manifest
    rec = strict(copy["path"])
    assert rec["status"] == "ok"
    assert rec["metrics"]["nll"]["value"] == pytest.approx(good["value"], rel=1e-5)


def test_a_good_checkpoint_is_reused_without_training(env, good, copy):
    code, out, err = lb(*run_args(env, copy["results"], copy["ckpt"], "--force"))
    assert code == 0 and not lines_with(err, "recovering on")
    assert len(lines_with(err, "reusing recovered checkpoint")) == 1
    assert strict(copy["path"])["metrics"]["nll"]["value"] == pytest.approx(good["value"], rel=1e-6)


# -- integrity of records -------------------------------------------------------------------
def test_a_truncated_record_is_named_kept_and_recomputed(env, good, copy):
    path = copy["path"]
    torn = path.read_bytes()[:200]
    path.write_bytes(torn)
    code, out, err = lb(*run_args(env, copy["results"], copy["ckpt"]))
    assert code == 0, err
    (line,) = lines_with(err, "bad record")
    assert line.startswith(f"linbench: bad record {path} (not valid JSON")
    assert f"kept as {path.name}.corrupt" in line and "Traceback" not in err
    assert path.with_name(path.name + ".corrupt").read_bytes() == torn
    assert not lines_with(err, "recovering on")  # the checkpoint was still good
    rec = strict(path)
    assert rec["status"] == "ok" and rec["metrics"]["nll"]["value"] == pytest.approx(good["value"], rel=1e-6)
    # report lists the skipped file and why, and still renders the good record
    code, out, err = lb("report", "--results", copy["results"], "--out", copy["results"] / "lb")
    assert code == 0, err
    (skip,) = lines_with(err, "skipped")
    assert f"{path}.corrupt" in skip and "corrupt" in skip


def test_report_names_every_unreadable_record(tmp_path, good):
    results = tmp_path / "r"
    shutil.copytree(good["results"], results)
    (path,) = records(results)
    path.write_text(path.read_text()[:200])
    other = path.with_name("other-0123.json")
    other.write_text(json.dumps({"schema_version": 1, "status": "ok"}))
    code, out, err = lb("report", "--results", results)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 3, err
    assert lines_with(err, f"skipped {path}: not valid JSON")
    assert lines_with(err, f"skipped {other}: missing key 'run_id'")
    assert "no usable run records" in lines[-1] and "2 skipped" in lines[-1]
    assert path.read_text() == good["path"].read_text()[:200]  # report moves nothing


# -- preflight: one line, exit 2, nothing written -------------------------------------------
def _nothing_written(*paths):
    for p in paths:
        assert not Path(p).exists(), p


def test_results_under_a_regular_file_fails_before_any_work(env, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("keep me")
    code, out, err = lb(*run_args(env, blocker / "results", tmp_path / "c"))
    assert code == 2
    assert err.strip().splitlines() == [
        f"linbench: error: --results {blocker / 'results'} is under {blocker}, which is a file, "
        f"not a directory (give a directory path)"]
    assert blocker.read_text() == "keep me"
    _nothing_written(tmp_path / "c")


def test_unwritable_results_and_checkpoints_fail_before_any_work(env, tmp_path):
    code, _, err = lb(*run_args(env, "/proc/linbench-results", tmp_path / "c"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--results /proc/linbench-results: cannot write in /proc" in err
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    code, _, err = lb(*run_args(env, tmp_path / "r", blocker / "ckpt"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"--checkpoints {blocker / 'ckpt'} is under {blocker}, which is a file" in err
    assert blocker.read_text() == "x"
    _nothing_written(tmp_path / "r")


@pytest.mark.parametrize("edit, needle", [
    (lambda cfg: cfg.write_text(json.dumps({k: v for k, v in json.loads(cfg.read_text()).items()
                                            if k != "model_type"})),
     "has no model_type (supported: llama, mistral, qwen2)"),
    (lambda cfg: cfg.write_text(cfg.read_text()[:-20]), "is not valid JSON"),
    (lambda cfg: cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "model_type": "gpt2"})),
     "unsupported architecture 'gpt2' (supported: Llama, Mistral, Qwen2 families, model_type llama, mistral, qwen2)"),
    (lambda cfg: cfg.unlink(), "has no config.json"),
], ids=["no-model_type", "bad-json", "gpt2", "missing"])
def test_a_bad_config_json_is_one_line_exit_2(env, tmp_path, edit, needle):
    model = tmp_path / "model"
    shutil.copytree(env["model"], model)
    edit(model / "config.json")
    code, out, err = lb(*run_args({**env, "model": model}, tmp_path / "r", tmp_path / "c"))
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("linbench: error: model") and str(model) in line and needle in line
    _nothing_written(tmp_path / "r", tmp_path / "c")


def test_missing_recovery_data_fails_before_any_work(env, tmp_path, monkeypatch):
    from linbench.assets import models
    monkeypatch.setattr(models, "resolve", lambda *a, **k: pytest.fail("model loaded first"))
    missing = tmp_path / "nope.jsonl"
    code, _, err = lb(*run_args({**env, "data": missing}, tmp_path / "r", tmp_path / "c"))
    assert code == 2
    (line,) = err.strip().splitlines()
    assert str(missing) in line and "does not exist" in line
    _nothing_written(tmp_path / "r")


# -- concurrency: two real processes ---------------------------------------------------------
def test_two_identical_runs_at_once_recover_once_and_share_the_records(env, tmp_path):
    results, ckpt = tmp_path / "r", tmp_path / "c"
    penv = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGIN_DIR), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "LINBENCH_CACHE": os.environ["LINBENCH_CACHE"]}
    cmd = [sys.executable, "-m", "linbench.cli", *run_args(env, results, ckpt), "--threads", "1"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=penv) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    errs = "".join(e for _, e in outs)
    assert "Traceback" not in errs
    assert len(lines_with(errs, "recovering on")) == 1  # no duplicated work
    assert len(lines_with(errs, "] ok: wrote")) == 1     # one computed the record ...
    assert len(lines_with(errs, "reusing finished record")) == 1  # ... the other reused it
    (path,) = records(results)
    assert strict(path)["status"] == "ok"
    assert len(list(ckpt.glob("*/model"))) == 1
    tables = [o for o, _ in outs]
    assert tables[0] == tables[1] and "lolcats" in tables[0]


@pytest.mark.parametrize("method, value, needle", [
    ("gla", "ce", "transfer: 'ce' needs attention weights, which the gla mixer does not form; "
                  "valid for gla: mse, none"),
    ("lolcats", "kl", "unknown transfer 'kl' (choose from: ce, mse, none)"),
])
def test_a_transfer_loss_the_mixer_cannot_take_is_one_line_exit_2(env, tmp_path, method, value, needle):
    """Found at planning, before any model is loaded (it used to load the model, start
    recovery and end in an error record, AttributeError, exit 1)."""
    code, out, err = lb(*run_args(env, tmp_path / "r", tmp_path / "c", "--set",
                                  f"{method}.transfer={value}", method=method))
    assert code == 2
    (line,) = err.strip().splitlines()
    assert needle in line, line
    _nothing_written(tmp_path / "r", tmp_path / "c")
