import copy

import pytest

from linbench.report.build import build_tables, provenance, tables
from linbench.report.plots import speed_figure
from tests.report.records import ROLES, record, speed, suite_meta, synthetic_records


def _rec(method, acc, dtype="float32", model_hash="a" * 64):
    return {"method": method, "suite": "mmlu5", "suite_version": "1", "status": "ok",
            "versions": {"lm_eval": "0.4.13"}, "dtype": dtype,
            "model": {"name": "m", "file_hash": model_hash},
            "metrics": {"acc": {"value": acc, "stderr": 0.01, "n": 100}},
            "method_role": ROLES.get(method, "linearized"), "suite_meta": suite_meta("mmlu5")}


def test_rows_share_a_table_only_under_one_comparability_key():
    out = tables([_rec("softmax", 0.5), _rec("lolcats", 0.4), _rec("softmax", 0.3, "bfloat16"),
                  _rec("softmax", 0.6, model_hash="b" * 64)])
    assert len(out) == 3
    first = out[0]
    assert "| lolcats | ok | 100 | 40.0 ±1.0 | 80.0% |" in first
    assert "| softmax | ok | 100 | 50.0 ±1.0 | 100.0% |" in first
    assert "bfloat16" in out[1] and "30.0" in out[1] and "40.0" not in out[1]


# --- the leaderboard tables (synthetic records in the shared schema) ----------------------


def _rows(table) -> list[dict[str, str]]:
    return [{c: cell.text for c, cell in zip(table.columns, row)} for row in table.rows]


def _table(tables, suite, dtype="float32"):
    found = [t for t in tables if t.suite == suite and t.records[0].get("dtype") == dtype]
    assert len(found) == 1, [t.title for t in tables]
    return found[0]


@pytest.fixture(scope="module")
def board():
    recs = synthetic_records()
    recs.append(record("softmax", "commonsense", {t: {"value": 0.6 + 0.01 * k, "stderr": 0.02, "n": 50}
                       for k, t in enumerate(("piqa", "arc_easy", "arc_challenge", "hellaswag",
                                              "winogrande"))}, dtype="bfloat16"))
    return build_tables(recs)


def test_parent_first_then_by_primary_metric_and_failed_rows_kept(board):
    mmlu = _table(board, "mmlu5")  # acc: softmax 0.30 (parent), lolcats 0.27, swa 0.24
    assert [r["method"] for r in _rows(mmlu)] == ["softmax", "lolcats", "swa", "liger"]
    liger = _rows(mmlu)[3]
    assert liger["status"] == "error" and liger["acc"] == "-"
    assert any("liger: error: RuntimeError: boom" in n for n in mmlu.notes)
    speed_rows = _rows(_table(board, "speed"))
    assert [r["method"] for r in speed_rows][:10] == ["softmax"] * 10
    assert {r["status"] for r in speed_rows} == {"ok", "oom", "timeout"}
    assert len(speed_rows) == 30  # every record is a row: none silently dropped


def test_percent_of_softmax_ppl_ratio_n_and_stderr(board):
    rows = {r["method"]: r for r in _rows(_table(board, "mmlu5"))}
    assert rows["lolcats"]["acc"] == "27.0 ±1.0" and rows["lolcats"]["acc % of softmax"] == "90.0%"
    assert rows["lolcats"]["n"] == "100" and rows["lolcats"]["acc_stem"] == "25.0 ±1.0 (n=30)"
    assert rows["swa"]["acc_stem % of softmax"] == f"{100 * 22 / 28:.1f}%"
    ppl = _table(board, "ppl")
    assert "ppl_wiki / softmax" in ppl.columns and "ppl_wiki % of softmax" not in ppl.columns
    rows = {r["method"]: r for r in _rows(ppl)}
    assert rows["lolcats"]["ppl_wiki / softmax"] == "1.100x" and rows["swa"]["ppl_wiki"] == "25"
    assert any("lower-is-better" in n for n in ppl.notes)


def test_commonsense_avg_and_avg_incl_mmlu_match_model_method_dtype(board):
    rows = {r["method"]: r for r in _rows(_table(board, "commonsense"))}
    # lolcats: five tasks 0.58..0.62 (mean 0.60); mmlu5 acc 0.27 -> (3.00 + 0.27) / 6
    assert rows["lolcats"]["avg"].startswith("60.0")
    assert rows["lolcats"]["avg incl. MMLU"].startswith(f"{100 * 3.27 / 6:.1f}")
    assert rows["softmax"]["avg incl. MMLU"].startswith(f"{100 * 3.4 / 6:.1f}")
    assert rows["gla"]["avg incl. MMLU"] == "-"  # no gla mmlu5 record
    bf16 = {r["method"]: r for r in _rows(_table(board, "commonsense", "bfloat16"))}
    # the bfloat16 mmlu5 record (0.31), never the float32 one (0.30)
    assert bf16["softmax"]["avg incl. MMLU"].startswith(f"{100 * (3.1 + 0.31) / 6:.1f}")


def test_state_bytes_recovery_budget_and_provenance(board):
    rows = {r["method"]: r for r in _rows(_table(board, "mmlu5"))}
    assert rows["lolcats"]["state bytes"] == "879 KiB @2048"  # 900_000 bytes
    budget = "recovery budget (tokens)"
    assert rows["lolcats"][budget] == "transfer 20M + lora 40M" and rows["softmax"][budget] == "-"
    prov = provenance(_table(board, "mmlu5"))
    assert len(prov) == 4 and prov[0]["git"] == "0123456789ab" and prov[0]["dtype"] == "float32"
    assert prov[0]["command"].startswith("linbench run --methods softmax")


def test_speed_rows_split_by_device_and_shape_and_compare_to_softmax():
    recs = [speed("softmax", "fwd", 4096), speed("gla", "fwd", 4096),
            speed("softmax", "fwd", 16384, "oom"), speed("gla", "fwd", 16384)]
    other = copy.deepcopy(speed("gla", "fwd", 4096))
    other["details"]["heads"] = 16
    gpu = copy.deepcopy(speed("gla", "fwd", 4096))
    gpu["details"].update(device="NVIDIA H100", tflops=12.5)
    tables = build_tables(recs + [other, gpu])
    assert len(tables) == 3
    main = {(r["method"], r["seqlen"]): r for r in _rows(tables[0])}
    assert main[("gla", "4096")]["tokens/s vs softmax"] == "2.50x"  # softmax costs 2x, gla 0.8x
    assert main[("gla", "16384")]["tokens/s vs softmax"] == "softmax oom"
    assert main[("softmax", "16384")]["status"] == "oom" and main[("softmax", "16384")]["tokens/s"] == "-"
    assert "H=16" in tables[1].title and "NVIDIA H100" in tables[2].title
    assert "TFLOP/s" in tables[2].columns and "TFLOP/s" not in tables[0].columns


def test_a_speed_table_whose_records_name_only_the_cpu_architecture_says_so():
    legacy = [speed("softmax", "fwd", 4096), speed("gla", "fwd", 4096)]  # "cpu: x86_64"
    named = copy.deepcopy(legacy)
    for r in named:
        r["details"]["device"] = "cpu: AMD EPYC (AVX2) x1 threads"
    gpu = copy.deepcopy(legacy)
    for r in gpu:
        r["details"]["device"] = "NVIDIA H100"
    old, new, cuda = (build_tables(recs)[0] for recs in (legacy, named, gpu))
    assert any(n.startswith("device: these records name only the CPU architecture")
               for n in old.notes)
    assert not [n for n in new.notes + cuda.notes if n.startswith("device:")]


def test_a_method_measured_under_two_configs_has_its_older_rows_named_by_the_difference():
    """A default that changed between sweeps (deltanet's feature map) must not give one row
    name to two configurations: the older rows are named as a --set variant would be."""
    old = [speed("gla", "fwd", 4096), speed("gla", "fwd", 16384)]
    new = copy.deepcopy(old)
    for r in old:
        r["config"] = {"method": {"name": "gla", "feature_map": "silu_l2", "lora_r": 8}}
    for r in new:
        r["config"] = {"method": {"name": "gla", "feature_map": "hedgehog", "lora_r": 8,
                                  "added_later": 1}}
        r["created"] = "2026-01-01T00:00:00Z"
    (table,) = build_tables([speed("softmax", "fwd", 4096), *old, *new])
    names = sorted({(row["method"], row["seqlen"]) for row in _rows(table)})
    assert names == [("gla", "16384"), ("gla", "4096"), ("gla[feature_map=silu_l2]", "16384"),
                     ("gla[feature_map=silu_l2]", "4096"), ("softmax", "4096")]
    (alone,) = build_tables([speed("softmax", "fwd", 4096), *new])
    assert {row["method"] for row in _rows(alone)} == {"softmax", "gla"}
    plots = speed_figure(table, {"gla": "C1", "softmax": "C0"}).axes[0].get_legend_handles_labels()
    assert "gla[feature_map=silu_l2] fwd" in plots[1] and "gla fwd" in plots[1]


def test_no_ok_parent_row_means_no_comparison_columns_and_a_note():
    (table,) = build_tables([record("lolcats", "mmlu5", {"acc": {"value": 0.3, "stderr": 0.01, "n": 9}}),
                             record("softmax", "mmlu5", {}, status="timeout")])
    assert not any("softmax" in c for c in table.columns)
    assert [r["status"] for r in _rows(table)] == ["timeout", "ok"]
    assert any('no row with method_role "parent"' in n for n in table.notes)


def test_cli_report_writes_the_leaderboard_and_prints_the_tables(invoke, tmp_path):
    from linbench.records.store import Store
    store = Store(tmp_path / "results")
    for i, rec in enumerate(synthetic_records()):
        store.write(store.path(rec["model"]["name"], rec["method"], rec["suite"], f"{i:03d}"), rec)
    code, out, err = invoke("report", "--results", str(tmp_path / "results"))
    board = tmp_path / "results" / "leaderboard"
    assert code == 0 and out.count("### ") == 6 and "| lolcats | ok | 100 | 27.0 ±1.0 | 90.0% |" in out
    assert {"leaderboard.md", "index.html", "speed-5.png", "recall-4-needle.png"} <= \
        {p.name for p in board.iterdir()}
    assert f"wrote {board / 'leaderboard.md'}, {board / 'index.html'} and 9 plots from 46 records" in err
    small = Store(tmp_path / "small")
    rec = record("softmax", "mmlu5", {"acc": {"value": 0.3, "stderr": 0.01, "n": 10}})
    small.write(small.path("m", "softmax", "mmlu5", "k"), rec)
    code, out, _ = invoke("report", "--results", str(tmp_path / "small"), "--out", str(tmp_path / "o"))
    assert code == 0 and "| softmax | ok | 10 | 30.0 ±1.0 | 100.0% |" in out
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "index.html", "leaderboard.md", "quality-0-mmlu5.png"]
    assert not (tmp_path / "small" / "leaderboard").exists()
