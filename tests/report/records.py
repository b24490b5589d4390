"""Synthetic run records in the shared schema, for the report / leaderboard tests: each
carries the method_role and suite_meta the runner copies in (the suites' own metadata)."""
from __future__ import annotations

import functools
import math

from linbench import registry

HASH = "a" * 64
VERSIONS = {"python": "3.11.2", "torch": "2.13.0", "triton": "3.9.0", "transformers": "4.57.0",
            "lm_eval": "0.4.13", "peft": "0.17.0"}
KV_BYTES = 2 * 30 * 3 * 64 * 2048 * 4   # softmax KV cache at T=2048 (layers 30, kv heads 3)
STATE = {"softmax": KV_BYTES, "swa": KV_BYTES // 32, "lolcats": 900_000, "liger": 600_000,
         "gla": 400_000, "hedgehog": 1_200_000}
WINDOW = {"softmax": None, "swa": 64, "lolcats": 64, "hedgehog": 0}
ROLES = {"softmax": "parent", "swa": "baseline"}  # every other method: "linearized"


@functools.cache
def suite_meta(suite: str) -> dict | None:
    """What the runner writes into a record of this registered suite (None for speed)."""
    return registry.suites.get(suite)().meta() if suite in registry.suites.names() else None


def metric(value, stderr=0.01, n=100):
    return {"value": value, "stderr": stderr, "n": n}


def recovery(method: str) -> list[dict]:
    if method in ("softmax", "swa"):
        return []
    out, floor = [], 0.2 + 0.1 * len(method)  # a different curve per method
    for stage, tokens, start in (("transfer", 20_000_000, 3.0), ("lora", 40_000_000, 2.6)):
        curve = [[t, start * math.exp(-t / tokens) + floor] for t in range(0, tokens + 1, tokens // 10)]
        val = [[t, y + 0.05] for t, y in curve[::2]]
        out.append({"stage": stage, "tokens": tokens, "steps": 100, "seconds": 12.5,
                    "final_loss": curve[-1][1], "curve": curve, "val_curve": val,
                    "ppl_before": None, "ppl_after": None, "stopped": "budget"})
    return out


def record(method, suite, metrics, status="ok", dtype="float32", details=None, model_hash=HASH,
           **extra):
    return {"schema_version": 1, "run_id": f"{method}-{suite}-{dtype}", "created": "2025-01-01T00:00:00Z",
            "linbench": "0.1.0", "git": {"sha": "0123456789abcdef" * 2 + "01234567", "dirty": False},
            "command": ["linbench", "run", "--methods", method, "--suite", suite],
            "device": "cpu: x86_64 x2 threads", "versions": dict(VERSIONS),
            "model": {"name": "smollm2-135m", "file_hash": model_hash}, "method": method,
            "suite": suite, "suite_version": "1", "config": {}, "config_hash": "c" * 16,
            "context": {}, "dtype": dtype, "seeds": {"suite": 1234}, "recovery": recovery(method),
            "state_bytes": {"seqlen": 2048, "bytes": STATE.get(method)}, "status": status,
            "metrics": metrics if status == "ok" else {}, "details": details or {},
            "seconds": 1.0, "method_role": ROLES.get(method, "linearized"),
           **({"suite_meta": suite_meta(suite)} if suite_meta(suite) is not None else {}),
           **extra}


def recall_cells(method: str) -> dict:
    window = WINDOW[method]
    out = {}
    for task in ("passkey", "needle"):
        cells = []
        for length in (128, 256, 512, 1024):
            for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
                inside = window is None or (1 - depth) * length < window
                acc = 1.0 if inside else max(0.0, 0.9 - length / 1200 - (0.5 if window == 0 else 0))
                cells.append({"length": length, "depth": depth, "acc": acc, "n": 10,
                              "in_window": inside})
        out[task] = cells
    return {**out, "kv": [{"pairs": 8, "acc": 0.5, "n": 10}], "squad": {"acc": 0.4, "n": 10},
            "window": window}


def speed(method, mode, seqlen, status="ok"):
    cost = {"softmax": seqlen / 2048, "gla": 0.8, "lolcats": 1.2}[method]  # per-token cost
    ms = seqlen / 1000 * max(cost, 0.5) * (2.5 if mode == "fwdbwd" else 1)
    details = {"level": "kernel", "mode": mode, "seqlen": seqlen, "batch": 1, "heads": 8,
               "dim": 64, "dtype": "float32", "backend": "torch", "device": "cpu: x86_64",
               "ms_q20": ms * 0.95, "ms_q80": ms * 1.05,
               "peak_mem_bytes": None if status != "ok" else int(seqlen * 8 * 64 * 4 * max(1, cost * 4)),
               "state_bytes": 8 * 64 * 64 * 4}
    metrics = {"ms": metric(ms, None, 5), "tokens_per_s": metric(seqlen / ms * 1000, None, 5)}
    rec = record(method, "speed", metrics, status, details=details)
    rec["recovery"] = []
    return rec


def synthetic_records() -> list[dict]:
    """Every suite and status the report handles; two comparability keys for mmlu5."""
    cs = {"softmax": 0.60, "swa": 0.55, "lolcats": 0.58, "gla": 0.50}
    recs = [
        record("lolcats", "mmlu5", {"acc": metric(0.27), "acc_stem": metric(0.25, n=30)}),
        record("softmax", "mmlu5", {"acc": metric(0.30), "acc_stem": metric(0.28, n=30)}),
        record("swa", "mmlu5", {"acc": metric(0.24), "acc_stem": metric(0.22, n=30)}),
        record("liger", "mmlu5", {}, status="error", error="RuntimeError: boom"),
        record("softmax", "mmlu5", {"acc": metric(0.31)}, dtype="bfloat16"),
    ]
    for m, base in cs.items():
        tasks = {t: metric(base + 0.01 * k, 0.02, 50) for k, t in enumerate(
            ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande"))}
        recs.append(record(m, "commonsense", tasks))
    for m, ppl in (("softmax", 20.0), ("swa", 25.0), ("lolcats", 22.0)):
        recs.append(record(m, "ppl", {"ppl_wiki": metric(ppl, None, 4096),
                                      "lambada_acc": metric(0.4, 0.02, 500)}))
    for m in ("hedgehog", "lolcats", "swa", "softmax"):
        recs.append(record(m, "recall", {"passkey": metric(0.9), "needle": metric(0.8)},
                           details=recall_cells(m)))
    for m in ("gla", "softmax", "lolcats"):
        for mode in ("fwd", "fwdbwd"):
            for t in (1024, 2048, 4096, 8192, 16384):
                failed = (m == "softmax" and t == 16384) or (m == "gla" and mode == "fwdbwd" and t == 16384)
                recs.append(speed(m, mode, t, ("oom" if m == "softmax" else "timeout") if failed else "ok"))
    return recs


def with_items(rec: dict, metric_name: str, values, prefix: str = "q", stderr: float | None = None
               ) -> dict:
    """rec with per-item 0/1 (or value) outcomes of one metric (ids prefix/0..n-1) in
    details["items"], and the metric's value, stderr and n as those outcomes give them."""
    values = list(values)
    n, mean = len(values), sum(values) / len(values)
    se = math.sqrt(mean * (1 - mean) / (n - 1)) if stderr is None else stderr
    details = {**(rec.get("details") or {})}
    details["items"] = {**details.get("items", {}),
                        metric_name: {"ids": [f"{prefix}/{i}" for i in range(n)], "values": values}}
    return {**rec, "details": details,
            "metrics": {**rec["metrics"], metric_name: metric(mean, se, n)}}


def with_docs(rec: dict, metric_name: str, nll, tokens) -> dict:
    """rec with per-document summed NLL and token counts of a perplexity metric."""
    nll, tokens = list(nll), list(tokens)
    details = {**(rec.get("details") or {})}
    details["items"] = {**details.get("items", {}), metric_name: {
        "ids": [f"doc/{i}" for i in range(len(nll))], "nll": nll, "tokens": tokens}}
    ppl = math.exp(sum(nll) / sum(tokens))
    return {**rec, "details": details,
            "metrics": {**rec["metrics"], metric_name: metric(ppl, None, sum(tokens))}}
