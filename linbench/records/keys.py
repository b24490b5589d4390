"""Comparability keys: which records may share a table, as named fields.

A quality record's key is its suite and suite version, the evaluator (lm-eval) version,
the base model (name and file hash) and the dtype. A speed record (suite "speed", written
by `linbench speed`) is keyed by its level (kernel | model), device, package versions,
shape (batch, heads, head dim), dtype and base model ("kernel" at kernel level); its mode,
sequence length, backend and process count (nproc: `linbench speed --nproc`, LASP-2
sequence parallelism; a record without it ran in one process, nproc 1) and, at model
level, the prefill chunk (`--prefill-chunk`) tell its rows apart inside one table.

`fields(record)` flattens every one of these into a dict (the key columns of the report's
frame); `key(record)` is the tuple of the fields that make up the record's key.
"""
from __future__ import annotations

SPEED = "speed"  # the suite of the records `linbench speed` writes

QUALITY_KEY = ("suite", "suite_version", "lm_eval", "model", "model_hash", "dtype")
SPEED_KEY = ("suite", "suite_version", "level", "device", "versions", "batch", "heads", "dim",
             "dtype", "model", "model_hash")
SPEED_ROW = ("mode", "seqlen", "backend", "nproc", "prefill_chunk")  # within one speed key
FIELDS = ("kind", "suite", "suite_version", "lm_eval", "model", "model_hash", "dtype", "device",
          "versions", "level", "mode", "seqlen", "batch", "heads", "dim", "backend", "nproc",
          "prefill_chunk")


def kind(record: dict) -> str:
    """"speed" for a speed-sweep record, else "quality"."""
    return "speed" if record.get("suite") == SPEED else "quality"


def versions_text(versions: dict | None) -> str:
    """{"torch": "2.13.0", "lm_eval": "0.4.13"} -> "lm_eval 0.4.13, torch 2.13.0"."""
    return ", ".join(f"{k} {v}" for k, v in sorted((versions or {}).items()))


def fields(record: dict) -> dict:
    """Every comparability field of the record, by name (FIELDS); None where it has none."""
    speed = kind(record) == "speed"
    details = (record.get("details") or {}) if speed else {}
    model = record.get("model") or {}
    versions = record.get("versions") or {}
    return {
        "kind": kind(record), "suite": record.get("suite"),
        "suite_version": record.get("suite_version"), "lm_eval": versions.get("lm_eval"),
        "model": model.get("name"), "model_hash": model.get("file_hash"),
        "dtype": details.get("dtype") or record.get("dtype"),
        "device": details.get("device") or record.get("device"),
        "versions": versions_text(versions),
        **{f: details.get(f) for f in ("level", *SPEED_ROW, "batch", "heads", "dim")},
        "nproc": (details.get("nproc") or 1) if speed else None,
    }


def key_fields(record: dict) -> tuple[str, ...]:
    return SPEED_KEY if kind(record) == "speed" else QUALITY_KEY


def key(record: dict) -> tuple:
    """The comparability key: records share a table only when theirs are equal."""
    f = fields(record)
    return tuple(f[name] for name in key_fields(record))
