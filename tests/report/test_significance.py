"""What a reader needs to tell signal from noise in the quality tables: the paired test's
mark on every cell beside the parent (stats.compare), the at-chance flag, the recovery
budget, the row order, and notes on rows from different code."""
from __future__ import annotations

import copy
import random

import pytest

from linbench.report import leaderboard, stats
from linbench.report.build import BUDGET_COLUMN, build_tables, to_markdown
from tests.report.records import metric, record, with_docs, with_items

APPROX = stats.APPROX


def _rows(table) -> dict[str, dict[str, str]]:
    return {row[0].text: {c: cell.text for c, cell in zip(table.columns, row)}
            for row in table.rows}


def _cells(table) -> dict[str, dict]:
    return {row[0].text: dict(zip(table.columns, row)) for row in table.rows}


def _outcomes(n: int, right: int, seed: int) -> list[int]:
    out = [1] * right + [0] * (n - right)
    random.Random(seed).shuffle(out)
    return out


@pytest.fixture(scope="module")
def marked():
    """mmlu5 on 400 shared questions: the parent right on 240; "same" answers exactly like
    the parent; "worse" is right on 120 (a real difference); "old" has no per-item data."""
    parent_items = _outcomes(400, 240, 1)
    worse = [v if i % 2 else 0 for i, v in enumerate(parent_items)]  # loses half its rights
    recs = [with_items(record("softmax", "mmlu5", {}), "acc", parent_items),
            with_items(record("gla", "mmlu5", {}), "acc", list(parent_items)),
            with_items(record("lolcats", "mmlu5", {}), "acc", worse),
            record("hedgehog", "mmlu5", {"acc": metric(0.58, 0.025, 400)})]
    (table,) = build_tables(recs)
    return table


def test_an_identical_score_is_marked_approx_and_a_real_difference_is_not(marked):
    rows = _rows(marked)
    assert rows["gla"]["acc"] == f"{APPROX} 60.0 ±2.5"
    assert rows["gla"]["acc % of softmax"] == f"{APPROX} 100.0%"
    worse = rows["lolcats"]
    by = {r["method"]: r for r in marked.records}
    acc = by["lolcats"]["metrics"]["acc"]["value"]
    assert 0.25 < acc < 0.35  # about half the parent's 60%
    assert not worse["acc"].startswith(APPROX) and not worse["acc % of softmax"].startswith(APPROX)
    assert worse["acc"].startswith(f"{100 * acc:.1f} ±") and worse["acc % of softmax"] == \
        f"{100 * acc / 0.6:.1f}%"
    assert rows["softmax"]["acc"] == "60.0 ±2.5"  # the parent itself carries no mark
    cells = _cells(marked)
    assert cells["gla"]["acc"].css == "ns" and cells["lolcats"]["acc"].css is None
    assert cells["lolcats"]["acc"].title == stats.compare(by["softmax"], by["lolcats"], "acc").describe()
    assert "mcnemar-exact" in cells["lolcats"]["acc"].title
    assert cells["gla"]["acc"].title.endswith("p=1, n=400, mcnemar-exact")
    assert cells["gla"]["acc % of softmax"].title == cells["gla"]["acc"].title


def test_an_untestable_cell_is_unmarked_and_counted_in_a_note(marked):
    rows = _rows(marked)
    assert rows["hedgehog"]["acc"] == "58.0 ±2.5"  # no per-item data: as is
    assert rows["hedgehog"]["acc % of softmax"] == "96.7%"
    untested = [n for n in marked.notes if n.startswith("significance:")]
    assert len(untested) == 1
    assert "1 of 3 cells beside softmax could not be tested" in untested[0]
    assert stats.NO_ITEMS in untested[0] and ": 1)" in untested[0]
    assert any(n.startswith(f"{APPROX}: not significantly different from softmax at 95%")
               for n in marked.notes)


def test_every_cell_testable_means_no_untested_note():
    parent = _outcomes(200, 120, 2)
    recs = [with_items(record("softmax", "mmlu5", {}), "acc", parent),
            with_items(record("gla", "mmlu5", {}), "acc", parent)]
    (table,) = build_tables(recs)
    assert not any(n.startswith("significance:") for n in table.notes)
    assert _rows(table)["gla"]["acc"].startswith(APPROX)


def test_perplexity_ratio_cells_follow_the_document_bootstrap():
    rng = random.Random(3)
    tokens = [rng.randint(200, 400) for _ in range(60)]
    nll = [t * (2.5 + rng.uniform(-0.3, 0.3)) for t in tokens]
    recs = [with_docs(record("softmax", "ppl", {}), "ppl_wiki", nll, tokens),
            with_docs(record("swa", "ppl", {}), "ppl_wiki", list(nll), tokens),  # identical
            with_docs(record("gla", "ppl", {}), "ppl_wiki", [x * 1.4 for x in nll], tokens)]
    (table,) = build_tables(recs)
    rows = _rows(table)
    assert rows["swa"]["ppl_wiki / softmax"] == f"{APPROX} 1.000x"
    assert rows["swa"]["ppl_wiki"].startswith(APPROX)
    assert not rows["gla"]["ppl_wiki / softmax"].startswith(APPROX)
    assert "ratio" in _cells(table)["gla"]["ppl_wiki"].title


def test_marks_and_legend_in_markdown_and_html(marked, tmp_path):
    md = to_markdown(marked)
    assert f"| gla | ok | 400 | {APPROX} 60.0 ±2.5 | {APPROX} 100.0% |" in md
    recs = list(marked.records)
    board = leaderboard.write(recs, tmp_path)
    page = board.html.read_text()
    assert 'id="legend"' in page and f"{APPROX} 41.2" in page
    assert f'class="ns">{APPROX} 60.0 ±2.5</td>' in page
    assert 'title="+0.0 pts, 95% CI [+0.0, +0.0], p=1, n=400, mcnemar-exact"' in page
    assert "Marks:" in board.markdown.read_text()


# ---------------------------------------------------------------- parent at chance

def _mmlu(parent_acc: float, stderr: float):
    return [record("softmax", "mmlu5", {"acc": metric(parent_acc, stderr, 200)}),
            record("lolcats", "mmlu5", {"acc": metric(0.40, 0.03, 200)})]


def test_a_parent_at_chance_flags_the_suite_and_drops_percent_of_parent(tmp_path):
    (table,) = build_tables(_mmlu(0.27, 0.03))  # chance 0.25: within 2 stderr
    assert table.at_chance is True
    assert table.notes[0] == stats.AT_CHANCE_NOTE
    assert not any("% of" in c or "/ softmax" in c for c in table.columns)
    assert stats.AT_CHANCE_NOTE in to_markdown(table)
    # not ranked: the parent, then by name, although lolcats scores higher
    assert [r[0].text for r in table.rows] == ["softmax", "lolcats"]
    page = leaderboard.write(_mmlu(0.27, 0.03), tmp_path).html.read_text()
    assert f'<li class="chance">{stats.AT_CHANCE_NOTE}</li>' in page
    assert "% of softmax" not in page


def test_a_parent_above_chance_is_not_flagged():
    (table,) = build_tables(_mmlu(0.45, 0.03))
    assert table.at_chance is False and stats.AT_CHANCE_NOTE not in table.notes
    assert "acc % of softmax" in table.columns


def test_a_derived_primary_metric_is_judged_at_chance_from_its_components():
    tasks = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")
    chance = {"piqa": 0.5, "arc_easy": 0.25, "arc_challenge": 0.25, "hellaswag": 0.25,
              "winogrande": 0.5}
    near = [record("softmax", "commonsense", {t: metric(chance[t] + 0.01, 0.03) for t in tasks})]
    far = [record("softmax", "commonsense", {t: metric(chance[t] + 0.2, 0.03) for t in tasks})]
    assert build_tables(near)[0].at_chance is True  # avg (primary) is derived by the report
    assert build_tables(far)[0].at_chance is False


# ---------------------------------------------------------------- recovery budget

def test_recovery_budget_column():
    named = record("lolcats", "ppl", {"ppl_wiki": metric(30.0, None)}, budget="paper",
                   config={"recovery": {"budget": {"transfer_tokens": 20_000_000,
                                                   "lora_tokens": 40_000_000}}})
    bare = record("gla", "ppl", {"ppl_wiki": metric(40.0, None)},
                  config={"recovery": {"budget": {"transfer_tokens": 20_000_000,
                                                  "lora_tokens": 40_000_000}}})
    early = copy.deepcopy(named)
    early["method"], early["recovery"][1]["tokens"] = "liger", 10_000_000
    early["recovery"] = early["recovery"][1:]  # a lora-only method that stopped early
    failed = record("hedgehog", "ppl", {}, status="error", error="boom",
                    budget="transfer=1M,lora=2M",
                    config={"recovery": {"budget": {"transfer_tokens": 1_000_000,
                                                    "lora_tokens": 2_000_000}}})
    failed["recovery"] = []
    parent = record("softmax", "ppl", {"ppl_wiki": metric(20.0, None)})
    # what the runner writes: the --budget it was given; older records: their command's
    given = copy.deepcopy(bare)  # a preset with an override names both
    given["method"], given["budget"] = "deltanet", "cpu,lora=147456"
    flagged = copy.deepcopy(bare)
    flagged["method"], flagged["command"] = "lightning", ["linbench", "run", "--budget", "quick"]
    assigned = copy.deepcopy(bare)
    assigned["method"], assigned["command"] = "swa", ["linbench", "run", "--budget=cpu"]
    with_lr = copy.deepcopy(named)  # the method config's LoRA lr (presets set it)
    with_lr["method"], with_lr["budget"] = "hedgehog_lr", "cpu"
    with_lr["config"]["method"] = {"lora_lr": 0.001}
    (table,) = build_tables([parent, named, bare, early, failed, given, flagged, assigned, with_lr])
    rows = _rows(table)
    assert rows["deltanet"][BUDGET_COLUMN] == "cpu,lora=147456: transfer 20M + lora 40M"
    assert rows["lightning"][BUDGET_COLUMN] == "quick: transfer 20M + lora 40M"
    assert rows["swa"][BUDGET_COLUMN] == "cpu: transfer 20M + lora 40M"
    assert BUDGET_COLUMN in table.columns and "recovery tokens" not in table.columns
    assert rows["lolcats"][BUDGET_COLUMN] == "paper: transfer 20M + lora 40M"
    assert rows["hedgehog_lr"][BUDGET_COLUMN] == "cpu: transfer 20M + lora 40M (lr 0.001)"
    assert rows["gla"][BUDGET_COLUMN] == "transfer 20M + lora 40M"  # no name: tokens only
    assert rows["liger"][BUDGET_COLUMN] == "paper: lora 10M/40M"     # trained / budgeted
    assert rows["hedgehog"][BUDGET_COLUMN] == "transfer 1M + lora 2M"  # planned, never run
    assert rows["softmax"][BUDGET_COLUMN] == "-"                     # no recovery
    sort = {row[0].text: row[table.columns.index(BUDGET_COLUMN)].sort for row in table.rows}
    assert sort["lolcats"] == 60_000_000 and sort["softmax"] is None


# ---------------------------------------------------------------- row order

def test_rows_parent_first_then_by_the_primary_metric_in_its_direction():
    ppl = [record(m, "ppl", {"ppl_wiki": metric(v, None)})
           for m, v in (("lolcats", 30.0), ("swa", 50.0), ("gla", 25.0), ("softmax", 20.0))]
    ppl.append(record("deltanet", "ppl", {}, status="timeout"))
    (table,) = build_tables(ppl)
    assert [r[0].text for r in table.rows] == ["softmax", "gla", "lolcats", "swa", "deltanet"]
    assert "rows: softmax (the parent) first, then by ppl_wiki (lower is better); rows " \
           "without it last" in table.notes
    mmlu = [record(m, "mmlu5", {"acc": metric(v, 0.01, 500)})
            for m, v in (("gla", 0.35), ("swa", 0.30), ("softmax", 0.45), ("lolcats", 0.40))]
    (table,) = build_tables(mmlu)
    assert [r[0].text for r in table.rows] == ["softmax", "lolcats", "gla", "swa"]  # descending
    assert any("then by acc (higher is better)" in n for n in table.notes)


# ---------------------------------------------------------------- provenance notes

def test_a_table_mixing_git_commits_or_dirty_trees_says_so():
    recs = _mmlu(0.45, 0.03)
    (table,) = build_tables(recs)
    assert not any(n.startswith("code:") for n in table.notes)  # one clean commit
    recs[1]["git"] = {"sha": "f" * 40, "dirty": True}
    (table,) = build_tables(recs)
    (note,) = [n for n in table.notes if n.startswith("code:")]
    assert "2 git commits" in note and "0123456789ab" in note and "ffffffffffff (dirty)" in note
    assert "1 of 2 records from a dirty tree" in note
    one = _mmlu(0.45, 0.03)
    for r in one:
        r["git"] = {"sha": "e" * 40, "dirty": True}
    (table,) = build_tables(one)
    (note,) = [n for n in table.notes if n.startswith("code:")]
    assert "every row from git eeeeeeeeeeee (dirty)" in note and "2 of 2" in note


def test_a_table_mixing_linbench_versions_says_so():
    recs = _mmlu(0.45, 0.03)
    assert not any("linbench versions" in n for n in build_tables(recs)[0].notes)
    recs[1]["linbench"] = "0.2.0"
    (table,) = build_tables(recs)
    assert "linbench versions differ: 0.1.0 (1 records), 0.2.0 (1 records)" in table.notes
