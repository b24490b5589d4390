"""Keep a method's default records after its default moved, under the label a `--set` run
of their configuration gets today.

    python results/embedded/scripts/relabel_default.py results/embedded lolcats lora_lr=0.0001
    python ... --check      # list what would move, change nothing

When a preset or a default changes (the cpu preset's LoRA lr went from each method's own,
1e-4, to 1e-3), the records made as `lolcats` before it are still exact results of one
configuration: lolcats with lora_lr=0.0001. `linbench run --methods lolcats --set
lolcats.lora_lr=0.0001 --budget cpu` today hashes that configuration to the same
config_hash and stores it as `lolcats[lora_lr=0.0001]`. This script gives each matching
record that label and path, and adds `relabeled` (its label before, and why), so the
variants run against that default (adapters, layer selection, ...) still have their
like-for-like row in the ablation tables. Only records whose method config has the given
value and a recovery are moved (speed rows, which time the unrecovered method, stay); the
config hash is recomputed and must be unchanged (else it stops).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from linbench.overrides import label, resolve
from linbench.records import provenance
from linbench.records.store import Store


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("method")
    ap.add_argument("setting", help="FIELD=VALUE, the value the records' config holds")
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args(argv)
    (field, value), = resolve([a.method], [f"{a.method}.{a.setting}"])[a.method].items()
    store, new_label = Store(a.results), label(a.method, {field: value})
    moved = 0
    for path in sorted(Path(a.results, "runs").glob(f"*/{a.method}/*.json")):
        rec = json.loads(path.read_text())
        cfg = rec.get("config") or {}
        if rec.get("method") != a.method or (cfg.get("method") or {}).get(field) != value \
                or "recovery" not in cfg:  # speed rows: no recovery the setting could change
            continue
        if provenance.config_hash(cfg) != rec["config_hash"]:
            print(f"{path}: its config no longer hashes to its config_hash; stopped")
            return 1
        target = store.path(rec["model"]["name"], new_label, rec["suite"], rec["config_hash"])
        print(f"{path} -> {target}")
        moved += 1
        if a.check:
            continue
        rec["method"] = new_label
        rec["relabeled"] = {"from": a.method, "why": f"made as {a.method}'s default, whose "
                            f"{field} was {value} then; the same configuration is "
                            f"{new_label} now"}
        store.write(target, rec)
        path.unlink()
    print(f"{moved} record(s) {'would move' if a.check else 'moved'} to {new_label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
