"""The committed leaderboard is what `linbench report` makes of the committed records, and
those records carry the plugin metadata the report reads (results/embedded/scripts/add_meta.py
added it to the records written before the runner did)."""
from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path

from linbench.records.store import Store
from linbench.report import leaderboard

EMBEDDED = Path(__file__).resolve().parents[2] / "results" / "embedded"
STAMP = re.compile(r"^Generated \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC from", re.MULTILINE)


def _add_meta():
    spec = importlib.util.spec_from_file_location("add_meta", EMBEDDED / "scripts" / "add_meta.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_regenerated_leaderboard_equals_the_committed_one(tmp_path):
    board = leaderboard.write(Store(EMBEDDED).records(), tmp_path)
    committed = (EMBEDDED / "leaderboard" / "leaderboard.md").read_text()
    ours = board.markdown.read_text()
    assert STAMP.search(committed) and STAMP.search(ours)
    assert STAMP.sub("Generated <time> from", ours) == STAMP.sub("Generated <time> from", committed)
    assert sorted(p.path.name for p in board.plots) == sorted(
        p.name for p in (EMBEDDED / "leaderboard").glob("*.png"))


def test_regeneration_is_deterministic(tmp_path):
    """Two reports of the same records: the same markdown and HTML (but for the time they
    were made) and byte-identical plots, so the committed leaderboard can be checked."""
    records = Store(EMBEDDED).records()
    one, two = (leaderboard.write(copy.deepcopy(records), tmp_path / d) for d in ("a", "b"))
    html_stamp = re.compile(r"generated \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC")
    assert STAMP.sub("", one.markdown.read_text()) == STAMP.sub("", two.markdown.read_text())
    assert html_stamp.sub("", one.html.read_text()) == html_stamp.sub("", two.html.read_text())
    assert [p.path.name for p in one.plots] == [p.path.name for p in two.plots]
    for a, b in zip(one.plots, two.plots):
        assert a.path.read_bytes() == b.path.read_bytes(), a.path.name


def test_committed_leaderboard_shows_what_the_records_can_and_cannot_support():
    """Every committed quality record carries its per-item outcomes, so no cell beside the
    parent is left untested for want of them (cells without a paired test say why: a
    derived metric, no shared items); the 5-shot MMLU parent is at chance and says so."""
    md = (EMBEDDED / "leaderboard" / "leaderboard.md").read_text()
    assert "parent at chance: this suite cannot rank methods on this model" in md
    assert "no per-item data" not in md and "could not be tested" in md
    assert "≈: not significantly different from softmax" in md
    assert "recovery budget (tokens)" in md and "code: rows come from" in md


def test_committed_records_carry_role_and_suite_meta():
    add_meta = _add_meta()
    records = Store(EMBEDDED).records()
    assert records and all(add_meta.migrate(r) == {} for r in records)
    assert {r["method_role"] for r in records if r["method"] == "softmax"} == {"parent"}
    assert all(r.get("suite_meta", {}).get("metrics") for r in records if r["suite"] != "speed")


def test_add_meta_adds_what_the_runner_would_write(tmp_path):
    add_meta = _add_meta()
    rec = next(r for r in Store(EMBEDDED).records() if r["suite"] == "ppl" and r["method"] == "swa")
    old = {k: v for k, v in copy.deepcopy(rec).items() if k not in ("suite_meta", "method_role", "_path")}
    path = tmp_path / "runs" / "m" / "swa" / "ppl-x.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(old, indent=1, sort_keys=True))
    assert add_meta.main([str(tmp_path / "runs")]) == 0
    new = json.loads(path.read_text())
    assert new == {**old, "method_role": rec["method_role"], "suite_meta": rec["suite_meta"]}
    assert new["method_role"] == "baseline" and new["suite_meta"]["metrics"][0]["name"] == "ppl_wiki"
    before = path.read_text()
    assert add_meta.main([str(tmp_path / "runs")]) == 0 and path.read_text() == before  # idempotent
