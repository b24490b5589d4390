"""Speed tables: one row per speed record (method, mode, sequence length), the one renderer
`linbench speed` and `linbench report` both print.

Speed rows are comparable only on the same device, package versions, level (kernel or
model) and shape (batch, heads, head dim, dtype; the base model too at model level):
linbench.records.keys. Throughput is compared with the parent row (method_role "parent")
of the same mode and sequence length. Rows measured over several processes
(`linbench speed --nproc N`, LASP-2 sequence parallelism; details["nproc"]) sit beside the
one-process rows in a "procs" column, shown when a table has any; their peak memory is the
largest rank's. A method whose rows were measured under different configurations (its
default changed between sweeps) has them told apart by `row_names`.
"""
from __future__ import annotations

from linbench.report import meta as plugin_meta
from linbench.records.schema import method_label
from linbench.report.cells import Cell, state_bytes_of
from linbench.units import fmt_bytes, fmt_count

GPU_COLUMNS = (("tflops", "TFLOP/s", "{:.3g}"), ("gbps", "GB/s", "{:.4g}"),
               ("pct_peak", "% of peak", "{:.1f}%"))


def _details(rec: dict) -> dict:
    return rec.get("details") or {}


def _value(rec: dict, name: str):
    m = (rec.get("metrics") or {}).get(name)
    return m.get("value") if m else None


def setup_notes(recs: list[dict]) -> list[str]:
    """How model-level inputs were built (details["setup"] of linbench speed): one note per
    distinct prefill chunk and decode set-up, with the methods that share it. A decode row
    times one-token steps (its ms is ms per token) from a cache at position T, which may
    come from fewer real tokens than T: the step costs the same for any cache of that shape."""
    groups: dict[str, list[str]] = {}
    for r in recs:
        d, setup = _details(r), _details(r).get("setup")
        if not isinstance(setup, dict):
            continue
        if d.get("mode") == "prefill":
            text = f"prefill in chunks of {setup.get('prefill_chunk')} tokens, state or KV cache carried"
        else:
            how = str(setup.get("decode_cache", "?"))
            how = how.replace(f"position {d.get('seqlen')}", "position T")
            text = f"decode: ms per token; cache at T: {how}"
        who = groups.setdefault(text, [])
        if r.get("method") not in who:
            who.append(r.get("method"))
    return [f"{text} ({', '.join(map(str, who))})" for text, who in groups.items()]


def row_names(recs: list[dict]) -> list[str]:
    """Each record's row name: its method, and, where the table holds that method's rows
    under more than one method configuration (a default changed between sweeps, e.g. a
    feature map), the fields in which the row's configuration differs from the method's
    newest row's, named as --set variants are: `deltanet[feature_map=silu_l2]`. Fields
    that one of the two configurations lacks (added to the method later) are not
    compared."""
    newest: dict = {}
    for r in recs:
        m = r.get("method")
        if m not in newest or str(r.get("created")) > str(newest[m].get("created")):
            newest[m] = r
    names = []
    for r in recs:
        ref = ((newest[r.get("method")].get("config") or {}).get("method")) or {}
        mine = ((r.get("config") or {}).get("method")) or {}
        differ = {k: v for k, v in mine.items() if k != "name" and k in ref and ref[k] != v}
        names.append(method_label(str(r.get("method") or "?"), differ))
    return names


def _nproc(rec: dict) -> int:
    """Processes the row ran on (records without details["nproc"]: 1)."""
    return _details(rec).get("nproc") or 1


def speed_table(recs: list[dict]):
    """(columns, rows, notes, title) for the records of one speed key, in row order."""
    parents = {(_details(r).get("mode"), _details(r).get("seqlen")): r
               for r in recs if r.get("method_role") == "parent" and _nproc(r) == 1}
    procs = any(_nproc(r) > 1 for r in recs)
    who = next(iter(parents.values())).get("method") if parents else "parent"
    gpu = [c for c in GPU_COLUMNS if any(_details(r).get(c[0]) is not None for r in recs)]
    columns = ["method", "mode", "seqlen", *["procs"] * procs, "status", "ms (median)",
               "ms q20-q80", "tokens/s",
               f"tokens/s vs {who}", "peak mem", "state bytes", "backend", *[c[1] for c in gpu]]
    rows, notes = [], []
    for r, name in zip(recs, row_names(recs)):
        d = _details(r)
        ms, tps = _value(r, "ms"), _value(r, "tokens_per_s")
        q20, q80 = d.get("ms_q20"), d.get("ms_q80")
        base = parents.get((d.get("mode"), d.get("seqlen")))
        if base is None or tps is None:
            vs = Cell("-")
        elif base.get("status") != "ok" or not _value(base, "tokens_per_s"):
            vs = Cell(f"{base.get('method')} {base.get('status')}")
        else:
            ratio = tps / _value(base, "tokens_per_s")
            vs = Cell(f"{ratio:.2f}x", ratio)
        sb = d.get("state_bytes")
        if sb is None:
            sb = state_bytes_of(r)[0]
        row = [Cell(name, f"{plugin_meta.row_rank(r)[0]} {name}"),
               Cell(d.get("mode") or "-"), Cell(str(d.get("seqlen", "-")), d.get("seqlen")),
               *[Cell(str(_nproc(r)), _nproc(r))] * procs, Cell(r.get("status") or "?"),
               Cell("-" if ms is None else f"{ms:.4g}", ms),
               Cell(f"{q20:.4g}-{q80:.4g}" if q20 is not None and q80 is not None else "-", q20),
               Cell(fmt_count(tps), tps), vs,
               Cell(fmt_bytes(d.get("peak_mem_bytes")), d.get("peak_mem_bytes")),
               Cell(fmt_bytes(sb), sb), Cell(d.get("backend") or "-")]
        row += [Cell("-" if d.get(k) is None else f.format(d[k]), d.get(k)) for k, _, f in gpu]
        rows.append(row)
        if r.get("status") != "ok":
            where = f" nproc={_nproc(r)}" if _nproc(r) > 1 else ""
            notes.append(f"{name}{where} {d.get('mode')} T={d.get('seqlen')}: "
                         f"{r.get('status')}"
                         + (f": {why}" if (why := r.get("error") or d.get("note")) else ""))
    if procs:
        n = sorted({_nproc(r) for r in recs if _nproc(r) > 1})
        notes.append(f"procs {', '.join(map(str, n))}: LASP-2 sequence parallelism over that many "
                     "processes on this machine (linbench speed --nproc); tokens/s of the whole "
                     "sequence, peak mem of the largest rank")
    notes += setup_notes(recs)
    first, d0 = recs[0], _details(recs[0])
    v = first.get("versions") or {}
    model = first.get("model") or {}
    where = (f" · model {model.get('name')} ({(model.get('file_hash') or '')[:12]})"
             if d0.get("level") == "model" else "")
    title = (f"{first.get('suite')} · {d0.get('level')} level · "
             f"{d0.get('device') or first.get('device')} · "
             f"B={d0.get('batch')} H={d0.get('heads')} D={d0.get('dim')} · "
             f"{d0.get('dtype') or first.get('dtype')}{where} · torch {v.get('torch')} "
             f"triton {v.get('triton')}")
    return columns, rows, notes, title
