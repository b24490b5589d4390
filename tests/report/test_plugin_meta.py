"""The report reads plugins through their records only: a third-party suite's own metadata
(order, labels, direction, chance level, derived metrics) and a method's role decide the
tables without any report change; the report's code names no registered plugin; frame()
and `linbench report --csv` give every metric as rows."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from linbench import registry
from linbench.records.store import Store
from linbench.report import frame
from linbench.report.build import build_tables
from linbench.report.frame import read_csv
from linbench.report.plots import method_colors, quality_figure
from linbench.suites.base import MetricSpec, Suite, accuracy
from tests.report.records import HASH, metric, record, speed, synthetic_records

REPORT = Path(__file__).resolve().parents[2] / "linbench" / "report"


class Quiz(Suite):
    """A third-party suite: its own metric order, a lower-is-better metric with a chance
    level, and a derived metric that takes another suite's metric."""
    name = "plugin-quiz"
    order = -1                      # before every built-in suite
    primary = "brier"
    metrics = (accuracy("hits", chance=0.1),
               MetricSpec("brier", label="Brier", higher_is_better=False, chance=0.9,
                          note="Brier: lower is better, beside {parent} as a ratio"),
               accuracy("hits_mmlu", label="hits+MMLU", mean_of=("hits",),
                        plus=(("mmlu5", "acc"),)))


def quiz(method: str, role: str, hits: float, brier: float, **kw) -> dict:
    rec = record(method, Quiz.name, {"brier": metric(brier), "hits": metric(hits, n=40)}, **kw)
    return {**rec, "method_role": role, "suite_meta": json.loads(json.dumps(Quiz().meta()))}


@pytest.fixture(scope="module")
def quiz_records():
    mmlu = record("alpha", "mmlu5", {"acc": metric(0.3)})  # alpha's 5-shot MMLU, same model
    return [mmlu, quiz("alpha", "linearized", 0.5, 0.3), quiz("zeta", "baseline", 0.4, 0.25),
            quiz("teacher", "parent", 0.8, 0.2)]


def _rows(table) -> list[dict[str, str]]:
    return [{c: cell.text for c, cell in zip(table.columns, row)} for row in table.rows]


def test_third_party_suite_metadata_drives_order_direction_and_derived(quiz_records):
    first, mmlu = build_tables(quiz_records)
    assert first.suite == "plugin-quiz" and mmlu.suite == "mmlu5"  # declared order -1 first
    assert first.columns == ["method", "status", "n", "hits", "hits % of teacher", "Brier",
                             "Brier / teacher", "hits+MMLU", "hits+MMLU % of teacher",
                             "state bytes", "recovery budget (tokens)"]  # declared order
    rows = {r["method"]: r for r in _rows(first)}
    # the parent, then by the primary metric (Brier, lower is better): zeta 0.25, alpha 0.3
    assert [r["method"] for r in _rows(first)] == ["teacher", "zeta", "alpha"]
    assert rows["alpha"]["hits"] == "50.0 ±1.0" and rows["alpha"]["hits % of teacher"] == "62.5%"
    assert rows["alpha"]["Brier"] == "0.3 ±0.01 (n=100)" and rows["alpha"]["n"] == "40"
    assert rows["alpha"]["Brier / teacher"] == "1.500x"  # lower is better: a ratio
    assert rows["zeta"]["Brier / teacher"] == "1.250x" and rows["teacher"]["Brier / teacher"] == "1.000x"
    # derived from data: mean of hits (0.5) and alpha's mmlu5 acc (0.3); n = 40 + 100
    assert rows["alpha"]["hits+MMLU"] == "40.0 (n=140)" and rows["teacher"]["hits+MMLU"] == "-"
    assert first.notes == ["Brier: lower is better, beside teacher as a ratio",
                           "significance: 5 of 5 cells beside teacher could not be tested and "
                           "are shown without a mark (no per-item data (records written before "
                           "suites stored per-item outcomes): 4; derived from other suites: no "
                           "paired test: 1)",
                           "rows: teacher (the parent) first, then by Brier (lower is better); "
                           "rows without it last"]
    assert [r["method"] for r in _rows(mmlu)] == ["alpha"]
    # no parent in the table: the order note names none
    assert [n for n in mmlu.notes if n.startswith("rows:")] == \
        ["rows: by acc (higher is better); rows without it last"]
    assert mmlu.columns[3:4] == ["acc"] and not any("%" in c for c in mmlu.columns)


def test_quality_plot_uses_the_declared_primary_metric_direction_and_chance(quiz_records):
    table = build_tables(quiz_records)[0]
    recs = [{**r, "state_bytes": {"seqlen": 2048, "bytes": b}}
            for r, b in zip(table.records, (4096, 1024, 2048))]
    table.records = recs
    fig, name, missing = quality_figure(table, method_colors(recs))
    ax = fig.axes[0]
    assert name == "brier" and missing == []
    assert ax.get_ylabel() == "brier (value), lower is better"
    chance = [ln for ln in ax.lines if list(ln.get_ydata()) == [0.9, 0.9]]
    assert len(chance) == 1 and chance[0].get_linestyle() == ":"
    colors = method_colors(recs)
    assert colors["teacher"] == "black" and colors["zeta"] == "0.5" and colors["alpha"] == "C0"


def test_speed_rows_compare_with_whichever_method_is_the_parent():
    recs = [speed("gla", "fwd", 4096), speed("softmax", "fwd", 4096), speed("lolcats", "fwd", 4096)]
    recs[0]["method_role"], recs[1]["method_role"] = "parent", "linearized"
    (table,) = build_tables(recs)
    rows = _rows(table)
    assert [r["method"] for r in rows] == ["gla", "lolcats", "softmax"]
    assert "tokens/s vs gla" in table.columns and rows[0]["tokens/s vs gla"] == "1.00x"


def _code_words(path: Path):
    """Every string literal (docstrings excepted) and identifier of a module."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.value
        for attr in ("id", "attr", "name", "arg", "asname", "module"):
            value = getattr(node, attr, None)
            if isinstance(value, str):
                yield value


def test_report_code_names_no_registered_method_or_suite():
    names = registry.methods.names() + registry.suites.names()
    assert "softmax" in names and "mmlu5" in names
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b", re.IGNORECASE)
    found = sorted({f"{p.name}: {w!r}" for p in REPORT.glob("*.py") for w in _code_words(p)
                    if pattern.search(w)})
    assert found == []


def test_every_builtin_suite_declares_json_metadata():
    for name in registry.suites.names():
        meta = registry.suites.get(name)().meta()
        assert json.loads(json.dumps(meta)) == meta, name
        assert meta["metrics"] and isinstance(meta["order"], int), name
        assert meta["primary"] in {m["name"] for m in meta["metrics"]}, name
        for m in meta["metrics"]:
            assert {"name", "label", "higher_is_better", "chance", "kind", "note", "derived"} <= set(m)


COLUMNS = ["kind", "suite", "suite_version", "lm_eval", "model", "model_hash", "dtype", "device",
           "versions", "level", "mode", "seqlen", "batch", "heads", "dim", "backend", "nproc",
           "prefill_chunk", "method",
           "method_role", "metric", "label", "higher_is_better", "chance", "metric_kind",
           "derived", "value", "stderr", "n", "status", "config_hash", "created", "git_sha",
           "git_dirty", "run_id", "path", "record"]


@pytest.fixture
def results(tmp_path):
    store = Store(tmp_path / "results")
    recs = synthetic_records()
    for i, rec in enumerate(recs):
        store.write(store.path(rec["model"]["name"], rec["method"], rec["suite"], f"{i:03d}"), rec)
    return tmp_path / "results", recs


def test_frame_has_one_row_per_record_and_metric(results):
    root, recs = results
    df = frame(root)
    assert list(df.columns) == COLUMNS
    derived = df[df.derived]
    # commonsense: "avg" for the four records, "avg incl. MMLU" where an mmlu5 record exists
    assert sorted(zip(derived.method, derived.metric)) == sorted(
        [(m, "avg") for m in ("softmax", "swa", "lolcats", "gla")]
        + [(m, "avg_incl_mmlu") for m in ("softmax", "swa", "lolcats")])
    assert len(df) == sum(max(1, len(r["metrics"])) for r in recs) + len(derived)
    assert df.record.nunique() == len(recs)

    one = df[(df.suite == "mmlu5") & (df.method == "lolcats") & (df.metric == "acc")].iloc[0]
    assert (one.kind, one.suite_version, one.lm_eval, one.model, one.model_hash, one["dtype"]) == \
        ("quality", "1", "0.4.13", "smollm2-135m", HASH, "float32")
    assert (one.value, one.stderr, one.n, one.status, one.method_role) == (0.27, 0.01, 100, "ok",
                                                                           "linearized")
    assert (one.label, one.higher_is_better, one.chance, one.metric_kind) == ("acc", True, 0.25,
                                                                              "accuracy")
    assert one.config_hash == "c" * 16 and one.git_sha.startswith("0123456789ab")
    assert not one.git_dirty and one.path.endswith(".json") and one.created == "2025-01-01T00:00:00Z"
    assert pd.isna(one.level) and pd.isna(one.seqlen)

    failed = df[(df.suite == "mmlu5") & (df.method == "liger")]
    assert len(failed) == 1 and failed.status.iloc[0] == "error" and pd.isna(failed.metric.iloc[0])

    ppl = df[(df.suite == "ppl") & (df.metric == "ppl_wiki")]
    assert set(ppl.higher_is_better) == {False} and set(ppl.metric_kind) == {"perplexity"}

    avg = df[(df.method == "lolcats") & (df.metric == "avg_incl_mmlu")].iloc[0]
    assert avg.value == pytest.approx((0.58 + 0.59 + 0.60 + 0.61 + 0.62 + 0.27) / 6)
    assert avg.n == 5 * 50 + 100 and pd.isna(avg.stderr) and avg.label == "avg incl. MMLU"

    sp = df[(df.kind == "speed") & (df.method == "gla") & (df["mode"] == "fwdbwd")
            & (df.seqlen == 4096)]
    assert set(sp.metric) == {"ms", "tokens_per_s"} and set(sp.method_role) == {"linearized"}
    row = sp.iloc[0]
    assert (row.level, row.batch, row.heads, row.dim, row.backend, row.device, row["dtype"],
            row.nproc) == ("kernel", 1, 8, 64, "torch", "cpu: x86_64", "float32", 1)
    assert pd.isna(row.higher_is_better)  # speed records declare no metadata: unknown


def test_cli_csv_round_trips_the_frame(invoke, results, tmp_path):
    root, _ = results
    csv = tmp_path / "out" / "metrics.csv"
    code, _, err = invoke("report", "--results", str(root), "--out", str(tmp_path / "lb"),
                          "--csv", str(csv))
    expected = frame(root)
    assert code == 0 and f"wrote {csv} ({len(expected)} rows)" in err
    pd.testing.assert_frame_equal(read_csv(csv), expected)
    plain = pd.read_csv(csv)  # any CSV reader gets the same rows and columns
    assert list(plain.columns) == COLUMNS and len(plain) == len(expected)
