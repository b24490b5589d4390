"""The same command twice gives identical metrics: recovery (calibration, transfer, LoRA)
and evaluation are seeded end to end. Two methods at the smoke budget on the tiny random
Llama, each run into fresh results and checkpoint directories so nothing is reused."""
from __future__ import annotations

import pytest

from tests.faults.test_faults import env, lb, records, run_args, strict  # noqa: F401 (fixture)


def _run(env, tag, method):
    results, ckpt = env["root"] / f"{tag}-results", env["root"] / f"{tag}-ckpt"
    code, _, err = lb(*run_args(env, results, ckpt, method=method))
    assert code == 0, err
    (path,) = records(results)
    return strict(path)


@pytest.mark.parametrize("method", ["lolcats", "gla"])
def test_the_same_command_twice_gives_identical_metrics(env, method):  # noqa: F811
    a, b = _run(env, f"{method}-a", method), _run(env, f"{method}-b", method)
    assert a["run_id"] != b["run_id"]               # two real runs, not a reused record
    assert a["config_hash"] == b["config_hash"]
    assert a["metrics"] == b["metrics"]
    strip = [{k: v for k, v in s.items() if k != "seconds"} for s in a["recovery"]]
    assert strip == [{k: v for k, v in s.items() if k != "seconds"} for s in b["recovery"]]
    assert [s["stage"] for s in a["recovery"]] == ["transfer", "lora"]
