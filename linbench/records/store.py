"""The results store: one JSON record per (model, method, suite) run, written atomically.

Layout: <results_dir>/runs/<model>/<method>/<suite>-<config hash>.json. A record whose
file exists with status "ok" is reused by the next identical run instead of recomputed.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from linbench.records.schema import SCHEMA_VERSION


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "x"


class Store:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, model: str, method: str, suite: str, key: str) -> Path:
        return self.root / "runs" / _slug(model) / _slug(method) / f"{_slug(suite)}-{key}.json"

    def load(self, path: Path) -> dict | None:
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        return record if record.get("schema_version") == SCHEMA_VERSION else None

    def finished(self, path: Path) -> dict | None:
        record = self.load(path)
        return record if record and record.get("status") == "ok" else None

    def write(self, path: Path, record: dict) -> None:
        """Write through a temporary file and rename: a reader never sees half a record."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp",
                                         delete=False) as f:
            json.dump(record, f, indent=1, sort_keys=True, default=str)
        os.replace(f.name, path)

    def records(self) -> list[dict]:
        out = []
        for p in sorted((self.root / "runs").rglob("*.json")):
            try:
                rec = json.loads(p.read_text())
            except json.JSONDecodeError:
                continue
            if rec.get("schema_version") == SCHEMA_VERSION:
                rec["_path"] = str(p)
                out.append(rec)
        return out
