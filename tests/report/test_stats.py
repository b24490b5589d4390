"""report.stats: paired tests of a method against its parent on the same items, checked
against hand computations (McNemar as a binomial sum, perplexity ratios), and compare()'s
choice of test from the suite metadata in the records."""
from __future__ import annotations

import math

import numpy as np
import pytest

from linbench.report import stats
from linbench.report.stats import (APPROX, NO_ITEMS, Comparison, at_chance, compare,
                                   mcnemar_p, paired_accuracy, paired_bootstrap, ppl_bootstrap,
                                   suite_at_chance)


def _binom_two_sided(n01: int, n10: int) -> float:
    """By hand: 2 * P(X <= min(n01, n10)), X ~ Binomial(n01 + n10, 1/2), capped at 1."""
    m, k = n01 + n10, min(n01, n10)
    return min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m)


# ---------------------------------------------------------------- McNemar

def test_mcnemar_exact_on_small_tables():
    assert mcnemar_p(1, 6) == pytest.approx(2 * (1 + 7) / 2 ** 7)  # 0.125
    assert mcnemar_p(6, 1) == mcnemar_p(1, 6)
    assert mcnemar_p(0, 8) == pytest.approx(2 / 256)
    assert mcnemar_p(2, 2) == 1.0 and mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(0, 5) == pytest.approx(0.0625)  # 5 discordant pairs can never reach 5%
    for n01, n10 in [(3, 11), (10, 22), (40, 61), (7, 7), (0, 1)]:
        assert mcnemar_p(n01, n10) == pytest.approx(_binom_two_sided(n01, n10), rel=1e-12)
    # large counts stay exact and finite (full MMLU has 14k items)
    assert 0.0 < mcnemar_p(6900, 7100) < 0.1 and mcnemar_p(7000, 7000) == 1.0


def test_paired_accuracy_on_shared_items_only():
    # parent right on 0..7, wrong on 8, 9; method: 2 new wrongs (0, 1), 1 new right (8)
    a_ids = [f"anatomy/{i}" for i in range(10)] + ["anatomy/99"]
    a_vals = [1] * 8 + [0, 0] + [1]
    b = {f"anatomy/{i}": v for i, v in enumerate([0, 0, 1, 1, 1, 1, 1, 1, 1, 0])}
    b["virology/3"] = 0
    b_ids = list(reversed(list(b)))  # order does not matter
    b_vals = [b[i] for i in b_ids]
    c = paired_accuracy(a_ids, a_vals, b_ids, b_vals, metric="acc")
    assert isinstance(c, Comparison) and c.metric == "acc" and c.test == "mcnemar-exact"
    assert c.n_shared == 10
    assert c.diff == pytest.approx(0.7 - 0.8)
    assert c.p == pytest.approx(_binom_two_sided(1, 2)) == 1.0
    assert c.significant is False and c.mark == APPROX
    assert c.ci[0] < c.diff < c.ci[1]
    # se of a paired difference by hand: sqrt((b + c) - (b - c)^2 / n) / n
    se = math.sqrt(3 - 1 / 10) / 10
    assert c.ci[1] - c.ci[0] == pytest.approx(2 * 1.959964 * se, rel=1e-5)


def test_paired_accuracy_significant_and_not():
    n = 400
    a = np.zeros(n, int)
    a[:200] = 1
    b = a.copy()
    b[:10] = 0       # 10 lost
    b[200:240] = 1   # 40 gained
    c = paired_accuracy(range(n), a, range(n), b)
    assert c.diff == pytest.approx(30 / 400) and c.significant is True and c.mark == ""
    assert c.p == pytest.approx(_binom_two_sided(40, 10)) and c.p < 0.001
    b2 = a.copy()
    b2[:18] = 0
    b2[200:222] = 1  # 22 vs 18: noise
    c2 = paired_accuracy(range(n), a, range(n), b2)
    assert c2.significant is False and c2.p == pytest.approx(_binom_two_sided(22, 18))
    with pytest.raises(ValueError):
        paired_accuracy([1, 2], [0.5, 1], [1, 2], [1, 1])
    with pytest.raises(ValueError, match="twice"):
        paired_accuracy([1, 1], [0, 1], [1, 2], [1, 1])
    none = paired_accuracy(["x"], [1], ["y"], [1])
    assert none.n_shared == 0 and none.significant is None


# ---------------------------------------------------------------- bootstrap

def test_bootstrap_on_identical_inputs_is_never_significant():
    rng = np.random.default_rng(0)
    for values in (rng.normal(size=300), rng.integers(0, 2, size=300)):
        ids = [f"q{i}" for i in range(300)]
        c = paired_bootstrap(ids, values, ids[::-1], values[::-1])
        assert c.diff == 0.0 and c.ci == (0.0, 0.0) and c.p == 1.0
        assert c.significant is False and c.n_shared == 300


def test_bootstrap_finds_a_large_real_difference_and_not_a_small_one():
    rng = np.random.default_rng(1)
    a = rng.normal(size=500)
    b = a + 0.5 + rng.normal(scale=0.5, size=500)  # > 20 standard errors apart
    c = paired_bootstrap(range(500), a, range(500), b)
    assert c.diff == pytest.approx(float(np.mean(b - a)))
    assert c.significant is True and c.ci[0] > 0.4 and c.p < 0.01
    assert c.ci[0] < c.diff < c.ci[1]
    # a true difference of 0: the 95% interval covers 0 in most of 40 draws
    covered = 0
    for seed in range(40):
        r = np.random.default_rng(100 + seed)
        x = r.normal(size=200)
        covered += not paired_bootstrap(range(200), x, range(200),
                                        x + r.normal(size=200), resamples=400).significant
    assert covered >= 34


def test_bootstrap_agrees_with_mcnemar_on_binary_outcomes():
    n = 400
    a = np.zeros(n, int)
    a[:200] = 1
    for lost, gained, want in ((10, 40, True), (18, 22, False)):
        b = a.copy()
        b[:lost] = 0
        b[200:200 + gained] = 1
        boot = paired_bootstrap(range(n), a, range(n), b)
        exact = paired_accuracy(range(n), a, range(n), b)
        assert boot.significant is exact.significant is want
        assert boot.diff == pytest.approx(exact.diff)
        assert boot.ci[0] == pytest.approx(exact.ci[0], abs=0.01)
        assert boot.ci[1] == pytest.approx(exact.ci[1], abs=0.01)


def test_stratified_bootstrap_is_the_mean_of_group_means():
    # group x: 2 items, diff +1 on both; group y: 8 items, diff 0 -> unweighted mean 0.5
    ids = [f"x/{i}" for i in range(2)] + [f"y/{i}" for i in range(8)]
    a = [0, 0] + [1] * 8
    b = [1, 1] + [1] * 8
    c = paired_bootstrap(ids, a, ids, b, strata=lambda k: k.split("/")[0])
    assert c.diff == pytest.approx(0.5) and "stratified, 2 groups" in c.test
    assert c.ci == (pytest.approx(0.5), pytest.approx(0.5))  # no variation within groups
    plain = paired_bootstrap(ids, a, ids, b)
    assert plain.diff == pytest.approx(0.2)


def test_bootstrap_is_deterministic_in_its_seed():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=100), rng.normal(size=100)
    one = paired_bootstrap(range(100), a, range(100), b, seed=7)
    assert one == paired_bootstrap(range(100), a, range(100), b, seed=7)
    assert one.ci != paired_bootstrap(range(100), a, range(100), b, seed=8).ci
    docs = {"ids": list(range(50)), "nll": list(rng.uniform(10, 20, 50)),
            "tokens": [10] * 50}
    other = {**docs, "nll": list(rng.uniform(10, 20, 50))}
    assert ppl_bootstrap(docs, other, seed=3) == ppl_bootstrap(docs, other, seed=3)


# ---------------------------------------------------------------- perplexity

def _docs(ids, nll, tokens):
    return {"ids": list(ids), "nll": list(nll), "tokens": list(tokens)}


def test_ppl_bootstrap_ratio_and_interval():
    rng = np.random.default_rng(3)
    n = 120
    tokens = rng.integers(20, 200, size=n)
    a_nll = tokens * rng.uniform(2.0, 3.0, size=n)
    b_nll = a_nll * 1.1  # 10% more NLL on every document
    a = _docs(range(n), a_nll, tokens)
    b = _docs(list(range(n))[::-1] + ["extra"], list(b_nll[::-1]) + [99.0],
              list(tokens[::-1]) + [3])
    c = ppl_bootstrap(a, b, metric="ppl_wiki")
    ppl_a = math.exp(a_nll.sum() / tokens.sum())
    ppl_b = math.exp(b_nll.sum() / tokens.sum())
    assert c.ratio and c.n_shared == n and c.test == "document bootstrap"
    assert c.diff == pytest.approx(ppl_b / ppl_a, rel=1e-12)
    assert c.ci[0] <= c.diff <= c.ci[1]
    assert c.significant is True and c.ci[0] > 1.0 and c.p < 0.01
    same = ppl_bootstrap(a, a)
    assert same.diff == pytest.approx(1.0) and same.significant is False and same.p == 1.0
    # noise around the same perplexity: the interval contains the point and 1
    noisy = _docs(range(n), a_nll * rng.normal(1.0, 0.02, size=n), tokens)
    c2 = ppl_bootstrap(a, noisy)
    assert c2.ci[0] <= c2.diff <= c2.ci[1] and c2.significant is False
    assert "ratio" in c.describe() and "document bootstrap" in c.describe()


# ---------------------------------------------------------------- chance

def test_at_chance_edges():
    assert at_chance(0.25, 0.01, 0.25)
    assert at_chance(0.27, 0.01, 0.25) and at_chance(0.23, 0.01, 0.25)    # exactly 2 stderr
    assert not at_chance(0.2701, 0.01, 0.25) and not at_chance(0.2299, 0.01, 0.25)
    assert at_chance(0.35, 0.05, 0.25) and at_chance(0.15, 0.05, 0.25)
    assert at_chance(0.5, 0.0, 0.5) and not at_chance(0.5001, 0.0, 0.5)
    assert not at_chance(0.25, None, 0.25) and not at_chance(0.25, 0.01, None)
    assert not at_chance(float("nan"), 0.01, 0.25) and not at_chance(None, 0.1, 0.25)
    assert at_chance(0.28, 0.01, 0.25, k=3) and not at_chance(0.28, 0.01, 0.25)


# ---------------------------------------------------------------- compare on records

def _meta(*specs, primary=None):
    return {"metrics": [{"name": n, "label": n, "higher_is_better": k != "perplexity",
                         "chance": ch, "kind": k, "note": None, "derived": d}
                        for n, k, ch, d in specs],
            "primary": primary or specs[0][0], "order": None, "heatmaps": []}


MMLU_META = _meta(("acc", "accuracy", 0.25, None))
CS_META = _meta(("piqa", "accuracy", 0.5, None), ("hellaswag", "accuracy", 0.25, None),
                ("avg", "accuracy", 0.375, {"mean_of": ["piqa", "hellaswag"], "plus": []}),
                ("avg_incl_mmlu", "accuracy", 1 / 3,
                 {"mean_of": ["piqa", "hellaswag"], "plus": [{"suite": "mmlu5", "metric": "acc"}]}),
                primary="avg")
PPL_META = _meta(("ppl_wiki", "perplexity", None, None), ("lambada_acc", "accuracy", None, None))


def _record(metrics: dict, items: dict | None, meta: dict | None = None):
    rec = {"method": "m", "metrics": {k: {"value": v, "stderr": s, "n": 100}
                                      for k, (v, s) in metrics.items()},
           "details": {} if items is None else {"items": items}}
    if meta is not None:
        rec["suite_meta"] = meta
    return rec


def _acc_items(values, prefix="anatomy"):
    return {"ids": [f"{prefix}/{i}" for i in range(len(values))], "values": list(values)}


def test_compare_accuracy_uses_exact_mcnemar():
    a = [1] * 60 + [0] * 40
    b = [0] * 25 + [1] * 35 + [0] * 40  # 25 lost, none gained
    parent = _record({"acc": (0.6, 0.049)}, {"acc": _acc_items(a)}, MMLU_META)
    rec = _record({"acc": (0.35, 0.048)}, {"acc": _acc_items(b)}, MMLU_META)
    c = compare(parent, rec, "acc")
    assert c.test == "mcnemar-exact" and c.n_shared == 100
    assert c.diff == pytest.approx(-0.25) and c.p == pytest.approx(2 / 2 ** 25)
    assert c.significant is True and "pts" in c.describe()
    assert compare(parent, parent, "acc").significant is False


def test_compare_perplexity_uses_the_document_bootstrap():
    meta = PPL_META
    docs = _docs(["wiki/A", "wiki/B", "wiki/C"], [30.0, 40.0, 50.0], [10, 10, 10])
    worse = _docs(["wiki/A", "wiki/B", "wiki/C"], [60.0, 70.0, 80.0], [10, 10, 10])
    parent = _record({"ppl_wiki": (math.exp(4.0), None)}, {"ppl_wiki": docs}, meta)
    rec = _record({"ppl_wiki": (math.exp(7.0), None)}, {"ppl_wiki": worse}, meta)
    c = compare(parent, rec, "ppl_wiki")
    assert c.ratio and c.test == "document bootstrap"
    assert c.diff == pytest.approx(math.exp(7.0) / math.exp(4.0))
    assert c.significant is True
    assert compare(parent, parent, "ppl_wiki").significant is False
    # an accuracy metric of the same records (0/1 items) takes the exact McNemar test
    lam = {"ids": ["lambada/1", "lambada/2"], "values": [1, 0]}
    parent["details"]["items"]["lambada_acc"] = lam
    rec["details"]["items"]["lambada_acc"] = lam
    parent["metrics"]["lambada_acc"] = rec["metrics"]["lambada_acc"] = {"value": 0.5,
                                                                       "stderr": 0.5, "n": 2}
    assert compare(parent, rec, "lambada_acc").test == "mcnemar-exact"


def test_compare_derived_average_is_stratified_and_cross_suite_is_not_tested():
    rng = np.random.default_rng(4)
    pa, ha = rng.integers(0, 2, 200), rng.integers(0, 2, 400)
    items_a = {"piqa": _acc_items(pa, "piqa"), "hellaswag": _acc_items(ha, "hellaswag")}
    pb, hb = pa.copy(), ha.copy()
    pb[pa == 1] = 0  # the method loses every piqa item the parent had
    items_b = {"piqa": _acc_items(pb, "piqa"), "hellaswag": _acc_items(hb, "hellaswag")}
    m = lambda p, h: {"piqa": (p.mean(), 0.03), "hellaswag": (h.mean(), 0.02),
                      "avg": ((p.mean() + h.mean()) / 2, None)}
    parent = _record(m(pa, ha), items_a, CS_META)
    rec = _record(m(pb, hb), items_b, CS_META)
    c = compare(parent, rec, "avg")
    assert "stratified, 2 groups" in c.test and c.n_shared == 600
    assert c.diff == pytest.approx(((pb.mean() - pa.mean()) + 0) / 2)
    assert c.significant is True
    assert compare(parent, parent, "avg").significant is False
    x = compare(parent, rec, "avg_incl_mmlu")
    assert x.significant is None and "other suites" in x.test
    # a component without items on one side: no test
    del rec["details"]["items"]["hellaswag"]
    assert compare(parent, rec, "avg").significant is None


def test_compare_without_items_or_meta():
    parent = _record({"acc": (0.6, 0.01)}, None, MMLU_META)
    rec = _record({"acc": (0.5, 0.01)}, None, MMLU_META)
    c = compare(parent, rec, "acc")
    assert c.significant is None and c.test == NO_ITEMS and c.mark == ""
    assert compare(parent, rec, "missing").significant is None
    # no suite_meta: a z-test on the stderrs, and it says so
    old_p = _record({"acc": (0.6, 0.01)}, None)
    old_r = _record({"acc": (0.5, 0.01)}, None)
    z = compare(old_p, old_r, "acc")
    assert z.test.startswith("z-test") and "no suite_meta" in z.test
    assert z.diff == pytest.approx(-0.1) and z.significant is True
    assert z.p == pytest.approx(math.erfc(0.1 / math.sqrt(2e-4) / math.sqrt(2)))
    close = compare(old_p, _record({"acc": (0.59, 0.01)}, None), "acc")
    assert close.significant is False
    assert compare(old_p, _record({"acc": (0.59, None)}, None), "acc").significant is None


def test_suite_at_chance_uses_the_primary_metric():
    assert suite_at_chance(_record({"acc": (0.26, 0.012)}, None, MMLU_META)) is True
    assert suite_at_chance(_record({"acc": (0.40, 0.012)}, None, MMLU_META)) is False
    assert suite_at_chance(_record({"ppl_wiki": (20.0, None)}, None, PPL_META)) is None
    # a derived average without stderr: sqrt(0.03^2 + 0.04^2) / 2 = 0.025
    near = _record({"piqa": (0.5, 0.03), "hellaswag": (0.3, 0.04), "avg": (0.42, None)},
                   None, CS_META)
    assert suite_at_chance(near) is True  # |0.42 - 0.375| = 0.045 <= 0.05
    far = _record({"piqa": (0.6, 0.03), "hellaswag": (0.3, 0.04), "avg": (0.45, None)},
                  None, CS_META)
    assert suite_at_chance(far) is False  # 0.075 > 0.05
    assert stats.AT_CHANCE_NOTE.startswith("parent at chance")
