"""Add `suite_meta` and `method_role` to run records written before the runner copied them
in, from the plugins registered now (linbench.registry), so the report can read them.

    python results/embedded/scripts/add_meta.py results/embedded/runs           # rewrite
    python results/embedded/scripts/add_meta.py results/embedded/runs --check   # list only

- method_role: the registered method's `role` (the method name is the record's
  config.method.name, else its label without "[overrides]"); "peer" for a speed record of
  an unregistered name (the sweep's fla chunk ops);
- suite_meta: `Suite().meta()` of the registered suite (speed records have none: `speed`
  is the sweep, not a suite plugin).

A key already present is kept. Files are rewritten in the store's own format (sorted keys,
indent 1), so the diff shows the added keys only. Exits 1 when a record names a method
that is not registered (and a suite nobody registered gets no suite_meta).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from linbench import registry
from linbench.records import keys


def method_name(rec: dict) -> str:
    configured = ((rec.get("config") or {}).get("method") or {}).get("name")
    return configured or str(rec.get("method")).partition("[")[0]


def role(rec: dict) -> str:
    name = method_name(rec)
    if name not in registry.methods.names() and rec.get("suite") == keys.SPEED:
        return "peer"  # the sweep times registered methods and fla's chunk ops, its peers
    return registry.methods.get(name).role  # an unknown name: the registry's one-line error


def suite_meta(rec: dict) -> dict | None:
    suite = rec.get("suite")
    return registry.suites.get(suite)().meta() if suite in registry.suites.names() else None


def migrate(rec: dict) -> dict:
    """The keys to add to rec (none when it already has them)."""
    add = {}
    if "method_role" not in rec:
        add["method_role"] = role(rec)
    if "suite_meta" not in rec and (meta := suite_meta(rec)) is not None:
        add["suite_meta"] = meta
    return add


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, help="a results/<...>/runs folder")
    ap.add_argument("--check", action="store_true", help="list what would change; write nothing")
    args = ap.parse_args(argv)
    changed, failed = 0, 0
    for path in sorted(args.runs.rglob("*.json")):
        rec = json.loads(path.read_text())
        try:
            add = migrate(rec)
        except Exception as e:  # noqa: BLE001 - an unregistered plugin: named, then go on
            print(f"{path}: {e}", file=sys.stderr)
            failed += 1
            continue
        if not add:
            continue
        changed += 1
        print(f"{path}: + {', '.join(sorted(add))}")
        if not args.check:
            path.write_text(json.dumps({**rec, **add}, indent=1, sort_keys=True, default=str))
    print(f"{changed} records {'to update' if args.check else 'updated'}, {failed} failed",
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
