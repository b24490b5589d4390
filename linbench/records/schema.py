"""The run record: one JSON object per (model, method, suite[, shape]) measurement.

`build` is the one place a record is assembled (quality runs and speed sweeps alike);
`problems` checks a record read back from disk. Keys (schema version 1):

    schema_version, run_id, created          identity
    linbench, git {sha, dirty}, versions,    provenance (records.provenance.environment)
    device, command
    model {name, file_hash, ...}             the base model
    method, method_role                      label ("lolcats[window=32]") and role
                                             (parent | baseline | linearized)
    suite, suite_version, suite_meta         suite_meta: the suite's metric metadata
    config, config_hash                      the resolved, hashed configuration
    context, dtype, seeds                    run options
    recovery [stage dicts], state_bytes {seqlen, bytes}
    status (ok | oom | timeout | error), metrics {name: {value, stderr, n}}, details,
    seconds, and error/traceback when status is "error"
"""
from __future__ import annotations

import time
import uuid

SCHEMA_VERSION = 1
STATUSES = ("ok", "oom", "timeout", "error")
REQUIRED = ("schema_version", "run_id", "created", "model", "method", "suite", "config",
            "config_hash", "status", "metrics")


def method_label(method: str, overrides: dict) -> str:
    """The name a run with config overrides is stored and reported under:
    `lolcats[window=32]`, fields sorted, sequences joined with commas."""
    if not overrides:
        return method
    inner = ",".join(f"{k}={','.join(map(str, v)) if isinstance(v, (tuple, list)) else v}"
                     for k, v in sorted(overrides.items()))
    return f"{method}[{inner}]"


def build(*, env: dict, model: dict, method: str, suite: str, suite_version: str, config: dict,
          config_hash: str, dtype: str, seeds: dict, context: dict, recovery: list,
          state_bytes: dict, status: str, metrics: dict, details: dict, seconds: float,
          method_role: str | None = None, suite_meta: dict | None = None, **extra) -> dict:
    """Assemble a record; `extra` (error, traceback) is added as is."""
    record = {
        "schema_version": SCHEMA_VERSION,
        "run_id": uuid.uuid4().hex,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **env,
        "model": model, "method": method, "suite": suite, "suite_version": suite_version,
        "config": config, "config_hash": config_hash, "context": context, "dtype": dtype,
        "seeds": seeds, "recovery": recovery, "state_bytes": state_bytes,
        "status": status, "metrics": metrics, "details": details, "seconds": seconds,
        **extra,
    }
    if method_role is not None:
        record["method_role"] = method_role
    if suite_meta is not None:
        record["suite_meta"] = suite_meta
    return record


def problems(record) -> list[str]:
    """What is wrong with a record read back from disk ([] when it is well-formed)."""
    if not isinstance(record, dict):
        return [f"not a JSON object but {type(record).__name__}"]
    out = [f"missing key {k!r}" for k in REQUIRED if k not in record]
    if record.get("schema_version") not in (None, SCHEMA_VERSION) and not out:
        out.append(f"schema_version {record.get('schema_version')!r} (this linbench reads "
                   f"{SCHEMA_VERSION})")
    if "status" in record and record["status"] not in STATUSES:
        out.append(f"status {record['status']!r} (valid: {', '.join(STATUSES)})")
    if "metrics" in record and not isinstance(record["metrics"], dict):
        out.append("metrics is not an object")
    return out
