"""Ablation tables: a variant row (label `method[field=value]`) beside its method's default,
with the paired test on the items both share."""
from __future__ import annotations

import math
import random

from linbench.report import ablations, leaderboard
from linbench.report.build import build_tables
from tests.report.records import record, with_docs, with_items


def _outcomes(n: int, right: int, seed: int) -> list[int]:
    out = [1] * right + [0] * (n - right)
    random.Random(seed).shuffle(out)
    return out


def _rows(table) -> dict[tuple[str, str], dict[str, str]]:
    return {(row[0].text, row[2].text): {c: cell.text for c, cell in zip(table.columns, row)}
            for row in table.rows}


def test_label_forms():
    assert ablations.base_of("lolcats[window=0]") == ("lolcats", "window=0")
    assert ablations.base_of("liger[linear_weight=1.0,window=32]") == \
        ("liger", "linear_weight=1.0,window=32")
    assert ablations.base_of("lolcats") is None
    assert ablations.base_of("weird[") is None


def test_variants_are_tested_against_their_default_not_the_parent():
    base = _outcomes(400, 240, 1)
    same = list(base)
    worse = [v if i % 2 else 0 for i, v in enumerate(base)]
    recs = [with_items(record("softmax", "mmlu5", {}), "acc", _outcomes(400, 300, 2)),
            with_items(record("lolcats", "mmlu5", {}), "acc", base),
            with_items(record("lolcats[window=0]", "mmlu5", {}), "acc", worse),
            with_items(record("lolcats[transfer=None]", "mmlu5", {}), "acc", same),
            with_items(record("gla[feature_map=hedgehog]", "mmlu5", {}), "acc", worse)]  # no default
    (table,) = build_tables(recs)
    (abl,) = ablations.ablation_tables([table])
    rows = _rows(abl)
    assert {k[0] for k in rows} == {"lolcats[window=0]", "lolcats[transfer=None]"}
    w = rows[("lolcats[window=0]", "acc")]
    assert w["default"] == "lolcats" and w["significant"] == "yes"
    assert w["difference"] == f"{100 * (sum(worse) - sum(base)) / 400:+.1f} pts"
    t = rows[("lolcats[transfer=None]", "acc")]
    assert t["difference"] == "+0.0 pts" and t["significant"].startswith("no")
    assert "mcnemar" in abl.rows[0][5].title


def test_perplexity_variants_get_the_document_bootstrap_ratio():
    rng = random.Random(3)
    tokens = [rng.randint(200, 400) for _ in range(40)]
    nll = [t * 2.0 for t in tokens]
    worse = [x * 1.3 for x in nll]
    recs = [with_docs(record("softmax", "ppl", {}), "ppl_wiki", nll, tokens),
            with_docs(record("liger", "ppl", {}), "ppl_wiki", [x * 1.1 for x in nll], tokens),
            with_docs(record("liger[linear_weight=1.0]", "ppl", {}), "ppl_wiki", worse, tokens)]
    (table,) = build_tables(recs)
    (abl,) = ablations.ablation_tables([table])
    row = _rows(abl)[("liger[linear_weight=1.0]", table.meta and
                      {m["name"]: m for m in table.meta["metrics"]}["ppl_wiki"]["label"])]
    ratio = float(row["difference"].rstrip("x"))
    assert abs(ratio - math.exp(2.0 * (1.3 - 1.1))) < 0.002  # ppl = exp(nll / tokens)
    assert row["significant"] == "yes"


def test_no_variants_no_table_and_the_leaderboard_renders_them(tmp_path):
    plain = [record("softmax", "mmlu5", {"acc": {"value": 0.3, "stderr": 0.02, "n": 100}})]
    assert ablations.ablation_tables(build_tables(plain)) == []
    base = _outcomes(200, 120, 4)
    recs = [with_items(record("softmax", "mmlu5", {}), "acc", base),
            with_items(record("lolcats", "mmlu5", {}), "acc", base),
            with_items(record("lolcats[window=0]", "mmlu5", {}), "acc", _outcomes(200, 60, 5))]
    board = leaderboard.write(recs, tmp_path)
    md = board.markdown.read_text()
    assert "### Ablations: mmlu5" in md and "| lolcats[window=0] | lolcats | acc |" in md
    assert "Ablations: mmlu5" in board.html.read_text()


def test_state_bytes_and_budget_sit_beside_the_quality_of_each_variant():
    """A hybrid variant keeps softmax layers (more state); a variant recovered at another
    budget than its default says so, since the difference is then not the variant's alone."""
    base = _outcomes(200, 120, 6)
    hybrid = with_items(record("lolcats[keep_softmax_layers=('auto:2',)]", "mmlu5", {}), "acc", base)
    hybrid["state_bytes"] = {"seqlen": 2048, "bytes": 5_000_000}
    short = with_items(record("lolcats[adapter=pissa]", "mmlu5", {}), "acc", base)
    short["recovery"] = [dict(s, tokens=s["tokens"] // 2) for s in short["recovery"]]
    recs = [with_items(record("softmax", "mmlu5", {}), "acc", base),
            with_items(record("lolcats", "mmlu5", {}), "acc", base), hybrid, short]
    (table,) = build_tables(recs)
    rows = _rows(ablations.ablation_table(table))
    h = rows[("lolcats[keep_softmax_layers=('auto:2',)]", "acc")]
    assert h["state bytes (variant / default)"] == "4.77 MiB / 879 KiB @2048"
    assert "default" not in h["budget"] and h["budget"].startswith("transfer 20M")
    p = rows[("lolcats[adapter=pissa]", "acc")]
    assert p["budget"].startswith("transfer 10M") and "(default: transfer 20M" in p["budget"]


def test_a_variant_is_tested_against_the_row_that_differs_only_in_its_fields():
    """The default moved after the variant ran (a preset's LoRA lr): the variant is paired
    with the row whose config is the variant's except for the variant's own fields."""
    def cfg(rec, **method):
        rec["config"] = {"method": {"name": "lolcats", "window": 64, "adapter": "lora",
                                    "lora_lr": 1e-3, **method}}
        return rec
    base, old, worse = _outcomes(400, 240, 1), _outcomes(400, 200, 6), _outcomes(400, 100, 7)
    recs = [with_items(record("softmax", "mmlu5", {}), "acc", _outcomes(400, 300, 2)),
            cfg(with_items(record("lolcats", "mmlu5", {}), "acc", base)),
            cfg(with_items(record("lolcats[lora_lr=0.0001]", "mmlu5", {}), "acc", old),
                lora_lr=1e-4),
            cfg(with_items(record("lolcats[adapter=eva]", "mmlu5", {}), "acc", old),
                lora_lr=1e-4, adapter="eva"),  # a sibling: not the pissa row's default
            cfg(with_items(record("lolcats[adapter=pissa]", "mmlu5", {}), "acc", worse),
                lora_lr=1e-4, adapter="pissa"),
            cfg(with_items(record("lolcats[window=0]", "mmlu5", {}), "acc", worse), window=0)]
    (table,) = build_tables(recs)
    rows = _rows(ablations.ablation_tables([table])[0])
    assert rows[("lolcats[adapter=pissa]", "acc")]["default"] == "lolcats[lora_lr=0.0001]"
    assert rows[("lolcats[adapter=pissa]", "acc")]["difference"] == \
        f"{100 * (sum(worse) - sum(old)) / 400:+.1f} pts"
    assert rows[("lolcats[lora_lr=0.0001]", "acc")]["default"] == "lolcats"
    assert rows[("lolcats[window=0]", "acc")]["default"] == "lolcats"  # the default still fits
