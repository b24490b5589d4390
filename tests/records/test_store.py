"""The results store: reuse rules, strict JSON, corrupt records set aside, locks."""
from __future__ import annotations

import json

import pytest

from linbench.records import schema
from linbench.records.store import Store, nonfinite, parse


def record(status="ok", value=1.25, **extra) -> dict:
    return schema.build(
        env={"device": "cpu: test"}, model={"name": "m", "file_hash": "h"}, method="softmax",
        suite="s", suite_version="1", config={"x": 1}, config_hash="k", dtype="float32",
        seeds={"suite": 0}, context={}, recovery=[], state_bytes={"seqlen": 2048, "bytes": 1},
        status=status, metrics={"acc": {"value": value, "stderr": None, "n": 3}}, details={},
        seconds=1.0, **extra)


@pytest.fixture
def store(tmp_path):
    warnings = []
    s = Store(tmp_path / "results", warn=warnings.append)
    s.warnings = warnings
    return s


@pytest.mark.parametrize("status, reused", [("ok", True), ("error", False), ("oom", False),
                                            ("timeout", False)])
def test_only_ok_records_are_reused(store, status, reused):
    path = store.path("m", "softmax", "s", "k")
    assert store.finished(path) is None  # nothing there yet
    store.write(path, record(status))
    got = store.finished(path)
    assert (got is not None) == reused
    if reused:
        assert got == json.loads(path.read_text()) and got["metrics"]["acc"]["value"] == 1.25
    assert store.warnings == [] and path.exists()  # a finished non-ok record is not corrupt


def test_paths_are_slugged_per_model_method_suite_and_hash(store):
    p = store.path("org/Model 1", "lolcats[window=32]", "mmlu5", "abc")
    assert p == store.root / "runs" / "org_Model_1" / "lolcats_window_32" / "mmlu5-abc.json"
    assert store.path("m", "a", "s", "k1") != store.path("m", "a", "s", "k2")


def test_write_is_strict_json_and_a_non_finite_ok_record_becomes_an_error(store):
    path = store.path("m", "softmax", "s", "k")
    store.write(path, record(value=float("nan")))
    text = path.read_text()
    rec = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} token"))
    assert rec["status"] == "error" and rec["metrics"]["acc"]["value"] is None
    assert "metrics.acc.value" in rec["error"]
    assert store.finished(path) is None
    assert nonfinite({"a": [1.0, float("inf")], "b": {"c": float("-inf")}, "d": 2}) == ["a[1]", "b.c"]


@pytest.mark.parametrize("text, why", [
    ('{"schema_version": 1, "run_id": "x"', "not valid JSON"),
    ("", "not valid JSON"),
    ("[1, 2]", "not a JSON object but list"),
    (json.dumps({"schema_version": 1, "status": "ok"}), "missing key 'run_id'"),
    (json.dumps({**record(), "schema_version": 99}), "schema_version 99"),
    (json.dumps({**record(), "status": "fine"}), "status 'fine'"),
    (json.dumps(record()).replace("1.25", "NaN"), "non-finite number NaN"),
    (json.dumps(record()).replace("1.25", "null"), "status ok with a missing or non-finite metric 'acc'"),
], ids=["truncated", "empty", "list", "missing-keys", "version", "status", "nan-token", "null-metric"])
def test_a_bad_record_is_named_kept_as_corrupt_and_recomputed(store, text, why):
    path = store.path("m", "softmax", "s", "k")
    path.parent.mkdir(parents=True)
    path.write_text(text)
    assert parse(text)[0] is None and why in parse(text)[1]
    assert store.finished(path) is None
    (line,) = store.warnings
    assert line.startswith(f"linbench: bad record {path} (") and why in line and "\n" not in line
    aside = path.with_name(path.name + ".corrupt")
    assert not path.exists() and aside.read_text() == text  # the bad file is kept
    # a second bad copy never overwrites the first one set aside
    for i in range(2):
        path.write_text(text + " " * i)
        assert store.load(path) is None
    kept = sorted(p.read_text() for p in path.parent.glob("*.corrupt"))
    assert aside.read_text() == text and kept == sorted([text, text, text + " "])


def test_scan_lists_every_skipped_file_without_moving_it(store):
    good = store.path("m", "softmax", "s", "k1")
    store.write(good, record())
    bad = store.path("m", "softmax", "s", "k2")
    bad.write_text("{")
    aside = store.path("m", "softmax", "s", "k3").with_suffix(".json.corrupt")
    aside.write_text("{")
    recs, skipped = store.scan()
    assert [r["_path"] for r in recs] == [str(good)]
    assert [p for p, _ in skipped] == [str(bad), str(aside)]
    assert skipped[0][1].startswith("not valid JSON") and "set aside" in skipped[1][1]
    assert bad.exists() and store.records() == recs
    assert Store(store.root / "nothing-here").scan() == ([], [])


def test_the_record_lock_is_exclusive_between_holders(store, tmp_path):
    from filelock import Timeout
    path = store.path("m", "softmax", "s", "k")
    first = store.lock(path)
    first.acquire(timeout=0)
    try:
        with pytest.raises(Timeout):
            store.lock(path).acquire(timeout=0.1)
        store.lock(store.path("m", "softmax", "s", "other")).acquire(timeout=0)  # another record: free
    finally:
        first.release()
    second = store.lock(path)
    second.acquire(timeout=0)
    second.release()
    assert (store.root / ".locks").is_dir() and not (store.root / "runs").exists()
    assert (store.root / ".locks" / ".gitignore").read_text() == "*\n"  # never committed
