"""Every record's metrics as one pandas DataFrame: one row per (record, metric).

Columns, in order:
- the comparability fields of linbench.records.keys.FIELDS: kind (quality | speed), suite,
  suite_version, lm_eval, model, model_hash, dtype, device, versions, and for speed
  records level, mode, seqlen, batch, heads, dim, backend, nproc, prefill_chunk;
- method, method_role;
- metric, with what the suite declares of it (label, higher_is_better, chance,
  metric_kind) and derived (True for a metric the report computed from the suite's
  declared derived metrics, e.g. an average), value, stderr, n;
- status, config_hash, created, git_sha, git_dirty, run_id, path, and record (the
  record's index in the list the frame was built from).

A record without metrics (a failed run) is one row with an empty metric, so every record
is in the frame. `linbench report --csv PATH` writes this frame.
"""
from __future__ import annotations

import json

import pandas as pd

from linbench.records import keys
from linbench.report import meta as plugin_meta

RECORD_COLUMNS = ("method", "method_role")
METRIC_COLUMNS = ("metric", "label", "higher_is_better", "chance", "metric_kind", "derived",
                  "value", "stderr", "n")
TAIL_COLUMNS = ("status", "config_hash", "created", "git_sha", "git_dirty", "run_id", "path",
                "record")
COLUMNS = [*keys.FIELDS, *RECORD_COLUMNS, *METRIC_COLUMNS, *TAIL_COLUMNS]
INTEGER = ("seqlen", "batch", "heads", "dim", "nproc", "prefill_chunk", "n", "record")  # Int64
FLOAT = ("chance", "value", "stderr")
BOOLEAN = ("higher_is_better", "derived", "git_dirty")          # nullable boolean
TEXT = tuple(c for c in COLUMNS if c not in (*INTEGER, *FLOAT, *BOOLEAN))
JOIN = ["method", "dtype", "model_hash"]  # a derived metric's other-suite inputs match on these


def frame(results_dir) -> pd.DataFrame:
    """The frame of every record under results_dir/runs (see the module docstring)."""
    from linbench.records.store import Store
    return frame_of(Store(results_dir).records())


def read_csv(path) -> pd.DataFrame:
    """A frame written with `to_csv(path, index=False)` (`linbench report --csv`), with the
    frame's column types back."""
    return _typed(pd.read_csv(path, dtype={c: str for c in TEXT}, keep_default_na=False,
                              na_values=[""]))


def _metric(meta: dict, name: str | None, m: dict | None, derived: bool = False) -> dict:
    spec = plugin_meta.spec(meta, name) if name is not None else {}
    m = m or {}
    return {"metric": name, "label": spec.get("label"),
            "higher_is_better": spec.get("higher_is_better"), "chance": spec.get("chance"),
            "metric_kind": spec.get("kind"), "derived": derived, "value": m.get("value"),
            "stderr": m.get("stderr"), "n": m.get("n")}


def _base(i: int, rec: dict) -> dict:
    """The record's columns of every one of its rows."""
    git = rec.get("git") or {}
    return {**keys.fields(rec), "method": rec.get("method"), "method_role": rec.get("method_role"),
            "status": rec.get("status"), "config_hash": rec.get("config_hash"),
            "created": rec.get("created"), "git_sha": git.get("sha"), "git_dirty": git.get("dirty"),
            "run_id": rec.get("run_id"), "path": rec.get("_path"), "record": i}


def _rows(i: int, rec: dict) -> list[dict]:
    base = _base(i, rec)
    meta = plugin_meta.suite_meta(rec)
    metrics = rec.get("metrics") or {}
    if not metrics:
        return [{**base, **_metric(meta, None, None)}]
    return [{**base, **_metric(meta, name, m)} for name, m in metrics.items()]


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    for c in TEXT:  # missing text is NaN, as read_csv gives it
        df[c] = df[c].where(df[c].notna(), float("nan"))
    for c in FLOAT:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    for c in INTEGER:
        df[c] = pd.to_numeric(df[c], errors="coerce").round().astype("Int64")
    for c in BOOLEAN:
        df[c] = df[c].astype("boolean")
    return df


def _newest(df: pd.DataFrame, suite: str, metric: str) -> pd.DataFrame:
    """Per (method, dtype, model hash): value and n of `metric` in the newest ok record of
    `suite` that has it."""
    rows = df[(df.suite == suite) & (df.status == "ok") & (df.metric == metric)]
    rows = rows.assign(created=rows.created.fillna("")).sort_values("created", kind="stable")
    return rows.drop_duplicates(JOIN, keep="last")[[*JOIN, "value", "n"]]


def _derive(df: pd.DataFrame, records: list[dict], ids, spec: dict) -> list[dict]:
    """Rows of the derived metric `spec` for the ok records `ids` that declare it and do not
    carry it themselves: mean of spec["mean_of"] (same record) and spec["plus"] (another
    suite's metric, same model hash, method and dtype); n summed; stderr none."""
    mine = df[df.record.isin(ids) & (df.status == "ok") & df.metric.notna()]
    values = mine.pivot(index="record", columns="metric", values="value")
    ns = mine.pivot(index="record", columns="metric", values="n")
    parts = list(spec["mean_of"])
    if not set(parts) <= set(values.columns):
        return []
    carried = mine.record[mine.metric == spec["name"]]
    rows = values.index[values[parts].notna().all(axis=1) & ~values.index.isin(carried)]
    total = values.loc[rows, parts].sum(axis=1)
    count = ns.loc[rows, parts].fillna(0).sum(axis=1)
    base = mine.drop_duplicates("record").set_index("record").loc[rows]
    for other in spec.get("plus") or []:
        found = base[JOIN].merge(_newest(df, other["suite"], other["metric"]), how="left",
                                 on=JOIN).set_index(base.index)
        total, count = total + found.value, count + found.n.fillna(0)
    value = (total / (len(parts) + len(spec.get("plus") or []))).dropna()
    return [{**_base(i, records[i]), **_metric(plugin_meta.suite_meta(records[i]), spec["name"],
                                               {"value": v, "n": count[i]}, derived=True)}
            for i, v in value.items()]


def frame_of(records: list[dict]) -> pd.DataFrame:
    """The frame of these records (see the module docstring), derived metrics included."""
    rows = [r for i, rec in enumerate(records) for r in _rows(i, rec)]
    df = _typed(pd.DataFrame(rows, columns=COLUMNS))
    declared: dict[str, list[int]] = {}  # each distinct derived spec -> the records declaring it
    for i, rec in enumerate(records):
        for spec in plugin_meta.derived(plugin_meta.suite_meta(rec)):
            declared.setdefault(json.dumps(spec, sort_keys=True), []).append(i)
    extra = [r for s, ids in declared.items() for r in _derive(df, records, ids, json.loads(s))]
    if not extra:
        return df
    return _typed(pd.DataFrame(rows + extra, columns=COLUMNS)).sort_values(
        "record", kind="stable", ignore_index=True)
