"""Is a method's score different from its parent's on the same items? Paired tests.

Every quality suite stores its per-item outcomes in the record, under
`details["items"]` (ITEMS_KEY), one entry per metric:

    accuracy / value metrics   {"ids": [str, ...], "values": [0 | 1 | float, ...]}
    perplexity metrics         {"ids": [str, ...], "nll": [float, ...], "tokens": [int, ...]}

ids are stable across runs and methods (mmlu: "<subject>/<row of the full test split>";
commonsense: "<task>/<row of the validation split>"; ppl: "wiki/<article title>",
"lambada/<passage index>"; recall: "L<length>/d<depth>/s<sample>", "P<pairs>/s<sample>/q<k>",
"squad/<question id>"). An accuracy is the mean of its values; a perplexity is
exp(sum nll / sum tokens) over its documents. A derived metric (`mean_of` in the suite
meta, e.g. commonsense "avg") has no entry of its own: it is tested from its components.

The tests (two-sided, alpha 0.05 by default), always on the items both records share:

- accuracy (0/1 values): `paired_accuracy`, the difference of means and an exact McNemar
  test (a binomial test on the discordant pairs); CI: Wald interval of a paired difference;
- derived mean of accuracies (no `plus` from other suites): `paired_bootstrap` stratified by
  component, the statistic being the unweighted mean of the component means;
- any other per-item value: `paired_bootstrap` (percentile CI of the difference of means);
- perplexity: `ppl_bootstrap`, documents resampled, both perplexities recomputed from the
  summed NLL and tokens; diff is the ratio record ppl / parent ppl, significant when its
  CI excludes 1;
- no suite_meta in the record (kind unknown): a z-test on the two stderrs, treated as
  independent, said so in `test`;
- no per-item data in either record (records older than this module): significant None,
  test "no per-item data".

How tables call it (one call per cell beside the parent; the report imports only this):

    from linbench.report import stats
    parent_at_chance = stats.suite_at_chance(parent_record)        # True / False / None
    c = stats.compare(parent_record, record, metric)               # meta: record's suite_meta
    if c.significant is False: show the cell as "≈" (e.g. "≈ 41.2"), title=c.describe()
    if c.significant is True:  show the value as is (optionally title=c.describe())
    if c.significant is None:  show the value as is (c.test says why no test was made)
    if parent_at_chance: print stats.AT_CHANCE_NOTE under the suite's table and show no
                         "% of parent" in it

`compare` is deterministic (fixed bootstrap seed, items sorted by id), so a rebuilt report
shows the same marks. Pure python + numpy; imports nothing of linbench.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Mapping, Sequence

import numpy as np

ITEMS_KEY = "items"
ALPHA = 0.05
RESAMPLES = 2000
SEED = 1234
APPROX = "\u2248"  # the mark of a non-significant cell
AT_CHANCE_NOTE = "parent at chance: this suite cannot rank methods on this model"
NO_ITEMS = "no per-item data"
# what a reader of an accuracy's CI beside its mark needs to know (legend, ablation note)
ACCURACY_CI = ("for accuracies the mark and p are the exact McNemar test's and the CI is the "
               "normal (Wald) interval, as in Stata's mcc, so with few discordant items the CI "
               "can exclude 0 where the exact test does not")
_BLOCK = 4_000_000  # resampled entries materialized at once (32 MB of int64)


@dataclass(frozen=True)
class Comparison:
    """A record's metric against its parent's on their shared items.

    diff: record - parent (accuracy, value), or record / parent (perplexity: `ratio` True),
    both computed on the shared items only; ci: its (1 - alpha) interval; p: two-sided;
    significant: True / False, or None when no test could be made (`test` says why).
    """
    metric: str
    test: str
    significant: bool | None
    diff: float | None = None
    ci: tuple[float, float] | None = None
    p: float | None = None
    n_shared: int | None = None
    ratio: bool = False

    @property
    def mark(self) -> str:
        """"≈" when the difference is not significant, else ""."""
        return APPROX if self.significant is False else ""

    def describe(self) -> str:
        """One line for a tooltip, e.g. "-3.1 pts, 95% CI [-5.0, -1.2], p=0.001, n=1000,
        mcnemar-exact"."""
        if self.diff is None:
            return self.test
        if self.ratio:
            head = f"ratio {self.diff:.3f}"
            ci = f"[{self.ci[0]:.3f}, {self.ci[1]:.3f}]" if self.ci else None
        else:
            head = f"{100 * self.diff:+.1f} pts"
            ci = f"[{100 * self.ci[0]:+.1f}, {100 * self.ci[1]:+.1f}]" if self.ci else None
        parts = [head]
        if ci:
            parts.append(f"95% CI {ci}")
        if self.p is not None:
            parts.append(f"p={self.p:.3g}")
        if self.n_shared is not None:
            parts.append(f"n={self.n_shared}")
        parts.append(self.test)
        return ", ".join(parts)


# ---------------------------------------------------------------- items

def items(record: Mapping, metric: str) -> dict | None:
    """The per-item entry of one metric of a record, or None when it has none."""
    found = ((record.get("details") or {}).get(ITEMS_KEY) or {}).get(metric)
    return found if isinstance(found, dict) and "ids" in found else None


def _index(ids: Sequence, columns: Sequence[Sequence]) -> dict:
    if any(len(c) != len(ids) for c in columns):
        raise ValueError(f"per-item lists of different lengths ({len(ids)} ids)")
    table = {}
    for i, key in enumerate(ids):
        if key in table:
            raise ValueError(f"item id {key!r} appears twice")
        table[key] = tuple(c[i] for c in columns)
    return table


def shared(a_ids: Sequence, a_cols: Sequence[Sequence], b_ids: Sequence,
           b_cols: Sequence[Sequence]) -> tuple[list, np.ndarray, np.ndarray]:
    """The ids both sides have (sorted) and their columns: arrays (n, len(cols))."""
    a, b = _index(a_ids, a_cols), _index(b_ids, b_cols)
    keys = sorted(set(a) & set(b), key=str)
    av = np.array([a[k] for k in keys], dtype=float).reshape(len(keys), len(a_cols))
    bv = np.array([b[k] for k in keys], dtype=float).reshape(len(keys), len(b_cols))
    return keys, av, bv


# ---------------------------------------------------------------- tests

def mcnemar_p(n01: int, n10: int) -> float:
    """Exact two-sided McNemar p: P(X <= min) doubled, X ~ Binomial(n01 + n10, 1/2)."""
    m, k = int(n01) + int(n10), min(int(n01), int(n10))
    if m == 0:
        return 1.0
    total, c = 0, 1
    for i in range(k + 1):  # sum of C(m, i), i = 0..k, in exact integers
        total += c
        c = c * (m - i) // (i + 1)
    return min(1.0, float(Fraction(2 * total, 2 ** m)))


def paired_accuracy(a_ids: Sequence, a_vals: Sequence, b_ids: Sequence, b_vals: Sequence,
                    alpha: float = ALPHA, metric: str = "") -> Comparison:
    """b against a on their shared items (0/1 outcomes): diff = mean(b) - mean(a), the
    exact McNemar p on the discordant pairs, the Wald CI of a paired difference."""
    keys, a, b = shared(a_ids, [a_vals], b_ids, [b_vals])
    n = len(keys)
    if n == 0:
        return Comparison(metric, "mcnemar-exact: no shared items", None, n_shared=0)
    a, b = a[:, 0], b[:, 0]
    if not (np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all()):
        raise ValueError("paired_accuracy needs 0/1 outcomes (use paired_bootstrap)")
    n01 = int(((a == 0) & (b == 1)).sum())  # b right where a was wrong
    n10 = int(((a == 1) & (b == 0)).sum())
    diff = (n01 - n10) / n
    se = math.sqrt(max((n01 + n10) - (n01 - n10) ** 2 / n, 0.0)) / n
    z = _z(alpha)
    p = mcnemar_p(n01, n10)
    return Comparison(metric, "mcnemar-exact", p < alpha, diff, (diff - z * se, diff + z * se),
                      p, n)


def _z(alpha: float) -> float:
    """The two-sided normal quantile for alpha (1.959964 at 0.05), by bisection on erf."""
    lo, hi = 0.0, 10.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if math.erfc(mid / math.sqrt(2)) > alpha:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _resampled_means(d: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `resamples` bootstrap resamples of d (n,). Few distinct values (0/1
    differences): multinomial counts of them, the same distribution as index draws."""
    n = len(d)
    values, counts = np.unique(d, return_counts=True)
    if len(values) <= 16:
        draws = rng.multinomial(n, counts / n, size=resamples)  # (R, distinct)
        return draws @ values / n
    out = np.empty(resamples)
    block = max(1, _BLOCK // n)
    for s in range(0, resamples, block):
        r = min(block, resamples - s)
        out[s:s + r] = d[rng.integers(0, n, size=(r, n))].mean(axis=1)
    return out


def _percentile_result(metric: str, test: str, point: float, boot: np.ndarray, null: float,
                       alpha: float, n: int, ratio: bool = False) -> Comparison:
    lo, hi = (float(x) for x in np.quantile(boot, [alpha / 2, 1 - alpha / 2]))
    below, above = int((boot <= null).sum()), int((boot >= null).sum())
    p = min(1.0, 2 * (min(below, above) + 1) / (len(boot) + 1))
    significant = bool(lo > null or hi < null)
    return Comparison(metric, test, significant, float(point), (lo, hi), p, n, ratio)


def paired_bootstrap(a_ids: Sequence, a_vals: Sequence, b_ids: Sequence, b_vals: Sequence,
                     strata: Callable[[str], str] | None = None, resamples: int = RESAMPLES,
                     seed: int = SEED, alpha: float = ALPHA, metric: str = "") -> Comparison:
    """b against a on their shared items by a paired bootstrap over items.

    Statistic: mean(b) - mean(a); with `strata` (id -> group), the unweighted mean over
    groups of the group means, items resampled within their group (commonsense "avg").
    CI: percentiles of the resampled statistic; significant when it excludes 0; p: twice
    the smaller share of resamples on either side of 0 (add-one smoothed).
    """
    keys, a, b = shared(a_ids, [a_vals], b_ids, [b_vals])
    if not keys:
        return Comparison(metric, "paired bootstrap: no shared items", None, n_shared=0)
    d = b[:, 0] - a[:, 0]
    rng = np.random.default_rng(seed)
    groups: dict = {}
    for k, x in zip(keys, d):
        groups.setdefault(strata(k) if strata else None, []).append(x)
    point, boot = 0.0, np.zeros(resamples)
    for g in sorted(groups, key=str):
        x = np.array(groups[g])
        point += x.mean() / len(groups)
        boot += _resampled_means(x, resamples, rng) / len(groups)
    test = "paired bootstrap" + (f" (stratified, {len(groups)} groups)" if strata else "")
    return _percentile_result(metric, test, point, boot, 0.0, alpha, len(keys))


def ppl_bootstrap(a_docs: Mapping, b_docs: Mapping, resamples: int = RESAMPLES,
                  seed: int = SEED, alpha: float = ALPHA, metric: str = "") -> Comparison:
    """b's perplexity against a's over their shared documents.

    a_docs, b_docs: {"ids": [...], "nll": [summed NLL per doc], "tokens": [per doc]}.
    Documents are resampled (the same ones for both), each side's perplexity recomputed as
    exp(sum nll / sum tokens); diff: the ratio ppl_b / ppl_a on the shared documents, CI
    its percentile interval, significant when the CI excludes 1.
    """
    keys, a, b = shared(a_docs["ids"], [a_docs["nll"], a_docs["tokens"]],
                        b_docs["ids"], [b_docs["nll"], b_docs["tokens"]])
    n = len(keys)
    if n == 0:
        return Comparison(metric, "document bootstrap: no shared documents", None, n_shared=0,
                          ratio=True)

    def log_ratio(s):  # s (..., n, 4) summed over documents -> log(ppl_b / ppl_a)
        return s[..., 2] / s[..., 3] - s[..., 0] / s[..., 1]

    cols = np.concatenate([a, b], axis=1)  # (n, 4): nll_a, tok_a, nll_b, tok_b
    point = float(np.exp(log_ratio(cols.sum(axis=0))))
    rng = np.random.default_rng(seed)
    boot = np.empty(resamples)
    block = max(1, _BLOCK // (4 * n))
    for s in range(0, resamples, block):
        r = min(block, resamples - s)
        boot[s:s + r] = np.exp(log_ratio(cols[rng.integers(0, n, size=(r, n))].sum(axis=1)))
    return _percentile_result(metric, "document bootstrap", point, boot, 1.0, alpha, n,
                              ratio=True)


def z_test(a_value: float, a_stderr: float | None, b_value: float, b_stderr: float | None,
           alpha: float = ALPHA, metric: str = "", test: str = "z-test on stderr") -> Comparison:
    """b - a against 0 with se = sqrt(se_a^2 + se_b^2) (independent samples: conservative
    for positively correlated paired scores)."""
    if a_stderr is None or b_stderr is None:
        return Comparison(metric, f"{test}: no stderr", None, diff=b_value - a_value)
    se = math.sqrt(a_stderr ** 2 + b_stderr ** 2)
    diff = b_value - a_value
    if se == 0:
        return Comparison(metric, test, diff != 0, diff, (diff, diff), 1.0 if diff == 0 else 0.0)
    z = _z(alpha)
    p = math.erfc(abs(diff) / se / math.sqrt(2))
    return Comparison(metric, test, p < alpha, diff, (diff - z * se, diff + z * se), p)


def at_chance(value: float | None, stderr: float | None, chance: float | None,
              k: float = 2.0) -> bool:
    """True when |value - chance| <= k stderr (k = 2: within noise of guessing). False
    when there is no chance level, no value or no stderr to judge by."""
    if value is None or chance is None or stderr is None:
        return False
    if any(isinstance(x, float) and math.isnan(x) for x in (value, stderr, chance)):
        return False
    return abs(value - chance) <= k * stderr + 1e-12


# ---------------------------------------------------------------- the table's entry points

def _spec(meta: Mapping | None, metric: str) -> dict | None:
    for m in (meta or {}).get("metrics") or []:
        if m.get("name") == metric:
            return m
    return None


def _metric(record: Mapping, metric: str) -> dict | None:
    m = (record.get("metrics") or {}).get(metric)
    return m if isinstance(m, dict) and m.get("value") is not None else None


def _is_binary(*vals: Sequence) -> bool:
    return all(v in (0, 1) for vs in vals for v in vs)


def compare(parent_record: Mapping, record: Mapping, metric: str,
            meta: Mapping | None = None, alpha: float = ALPHA, seed: int = SEED,
            resamples: int = RESAMPLES) -> Comparison:
    """`record`'s `metric` against `parent_record`'s, on the items both share.

    meta: the suite's metadata (default: record["suite_meta"], else the parent's); the
    metric's `kind` there picks the test (see the module docstring).
    """
    meta = meta if meta is not None else (record.get("suite_meta")
                                          or parent_record.get("suite_meta"))
    if not meta:
        pm, rm = _metric(parent_record, metric), _metric(record, metric)
        if pm is None or rm is None:
            return Comparison(metric, "metric missing", None)
        return z_test(pm["value"], pm.get("stderr"), rm["value"], rm.get("stderr"), alpha,
                      metric, "z-test on stderr (no suite_meta: metric kind unknown, unpaired)")
    spec = _spec(meta, metric) or {"name": metric, "kind": "value"}
    kind = spec.get("kind") or "value"
    derived = spec.get("derived") or {}
    if derived.get("plus"):
        return Comparison(metric, "derived from other suites: no paired test", None)
    if not derived.get("mean_of") and (_metric(parent_record, metric) is None
                                       or _metric(record, metric) is None):
        return Comparison(metric, "metric missing", None)
    if derived.get("mean_of"):
        # the components either record has (a suite run on a subset averages fewer)
        parts = [m for m in derived["mean_of"]
                 if _metric(parent_record, m) or _metric(record, m)]
        found = [(m, items(parent_record, m), items(record, m)) for m in parts]
        missing = [m for m, a, b in found if not (a and b)]
        if not parts or len(missing) == len(parts):
            return Comparison(metric, NO_ITEMS, None)
        if missing:
            return Comparison(metric, f"{NO_ITEMS} for {', '.join(missing)}", None)
        a_ids = [f"{m}\x00{i}" for m, a, _ in found for i in a["ids"]]
        b_ids = [f"{m}\x00{i}" for m, _, b in found for i in b["ids"]]
        a_vals = [v for _, a, _ in found for v in a["values"]]
        b_vals = [v for _, _, b in found for v in b["values"]]
        return paired_bootstrap(a_ids, a_vals, b_ids, b_vals,
                                strata=lambda k: k.split("\x00", 1)[0], resamples=resamples,
                                seed=seed, alpha=alpha, metric=metric)
    a, b = items(parent_record, metric), items(record, metric)
    if a is None or b is None:
        return Comparison(metric, NO_ITEMS, None)
    if kind == "perplexity":
        if not all(k in x for x in (a, b) for k in ("nll", "tokens")):
            return Comparison(metric, f"{NO_ITEMS} (no nll/tokens)", None, ratio=True)
        return ppl_bootstrap(a, b, resamples=resamples, seed=seed, alpha=alpha, metric=metric)
    if kind == "accuracy" and _is_binary(a["values"], b["values"]):
        return paired_accuracy(a["ids"], a["values"], b["ids"], b["values"], alpha, metric)
    return paired_bootstrap(a["ids"], a["values"], b["ids"], b["values"], resamples=resamples,
                            seed=seed, alpha=alpha, metric=metric)


def suite_at_chance(parent_record: Mapping, metric: str | None = None,
                    meta: Mapping | None = None, k: float = 2.0) -> bool | None:
    """Is the parent within k stderr of chance on the suite's primary metric (or `metric`)?

    None when the metric declares no chance level or is missing. A derived mean without a
    stderr of its own (commonsense "avg") takes sqrt(sum of its components' stderr^2) / count.
    """
    meta = meta if meta is not None else (parent_record.get("suite_meta") or {})
    name = metric or meta.get("primary")
    spec = _spec(meta, name) if name else None
    m = _metric(parent_record, name) if name else None
    if spec is None or m is None or spec.get("chance") is None:
        return None
    stderr = m.get("stderr")
    derived = spec.get("derived") or {}
    if stderr is None and derived.get("mean_of") and not derived.get("plus"):
        parts = [_metric(parent_record, p) for p in derived["mean_of"]]
        if parts and all(p and p.get("stderr") is not None for p in parts):
            stderr = math.sqrt(sum(p["stderr"] ** 2 for p in parts)) / len(parts)
    if stderr is None:
        return None
    return at_chance(m["value"], stderr, spec["chance"], k)
