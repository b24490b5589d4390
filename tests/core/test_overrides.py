"""`--set KEY=VALUE` config overrides: parsing, validation, labels, and their effect on runs."""
from __future__ import annotations

import pytest

from linbench.records.schema import method_label
from linbench import overrides
from linbench.errors import LinbenchError


@pytest.mark.parametrize("text, value", [("7", 7), ("0.5", 0.5), ("true", True), ("None", None),
                                         ("1,2", (1, 2)), ("[3]", (3,)), ("mamba2", "mamba2")])
def test_values_are_python_literals_or_strings(text, value):
    assert overrides.parse_value(text) == value


def test_scoped_and_global_keys():
    got = overrides.resolve(["liger", "lolcats", "softmax"],
                            ["liger.softmax_every=7", "window=128", "lolcats.keep_softmax_layers=0"])
    assert got == {"liger": {"softmax_every": 7, "window": 128},
                   "lolcats": {"window": 128, "keep_softmax_layers": (0,)}, "softmax": {}}


@pytest.mark.parametrize("items, needle", [
    (["window"], "expected KEY=VALUE"),
    (["liger.nope=1"], "unknown field; valid: adapter, backend"),
    (["nope=1"], "no selected method has that field"),
    (["gla.window=3"], "'gla' is not among --methods"),
    (["liger.softmax_every=seven"], "expected int"),
    (["lolcats.transfer_lr=true"], "expected float"),
])
def test_bad_overrides_are_one_line_errors(items, needle):
    with pytest.raises(LinbenchError, match=None) as err:
        overrides.resolve(["liger", "lolcats"], items)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_label_names_the_overrides():
    assert method_label("liger", {}) == "liger"
    assert method_label("liger", {"window": 32, "softmax_every": 7}) == "liger[softmax_every=7,window=32]"


def test_overrides_change_the_method_the_record_path_and_the_hash(tmp_path):
    from linbench.assets import models
    from linbench import run as runner
    from linbench.records.store import Store
    from linbench.suites.base import RunContext
    spec = models.ModelSpec(name="m", source="local", path=str(tmp_path), file_hash="0" * 64)
    ctx = RunContext(limit=1)
    plain = runner.RunPlan("m", ["swa"], ["mmlu5"], ctx, str(tmp_path))
    changed = runner.RunPlan("m", ["swa"], ["mmlu5"], ctx, str(tmp_path), overrides={"swa": {"window": 16}})
    a = runner.plan_jobs(plain, spec, Store(tmp_path))[0]
    b = runner.plan_jobs(changed, spec, Store(tmp_path))[0]
    assert b.method_obj.config.window == 16 and a.method_obj.config.window == 64
    assert b.method == "swa[window=16]" and "swa_window_16" in str(b.path)
    assert a.key != b.key and b.config["method"]["window"] == 16


def test_cli_set_errors_are_one_line_exit_2(tmp_path):
    import subprocess
    import sys
    results = tmp_path / "r"
    out = subprocess.run([sys.executable, "-m", "linbench.cli", "run", "--methods", "liger",
                          "--suite", "ppl", "--set", "liger.nope=1", "--results", str(results)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "unknown field" in out.stderr and not results.exists()
