"""The results store: one JSON record per (model, method, suite) run, written atomically.

Layout: <results_dir>/runs/<model>/<method>/<suite>-<config hash>.json. A record whose
file exists with status "ok" is reused by the next identical run instead of recomputed.

Records are strict JSON (no NaN/Infinity tokens). A record file that does not parse, holds
a non-finite number, or fails records.schema.problems is never trusted: the run names it
in one line, keeps it as <file>.corrupt and recomputes it; `records()` skips it and
`scan()` says which files were skipped and why. Writers of the same record serialize on a
file lock under <results_dir>/.locks (filelock).
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from linbench.records.schema import problems


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "x"


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def nonfinite(obj, where: str = "") -> list[str]:
    """Dotted paths of every NaN/Infinity float inside obj (dicts, lists, numbers)."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [where or "<value>"]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in nonfinite(v, f"{where}.{k}" if where else str(k))]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in nonfinite(v, f"{where}[{i}]")]
    return []


def _finite_only(obj):
    """obj with every non-finite float replaced by None (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_only(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_only(v) for v in obj]
    return obj


def _reject_constant(name: str):
    raise ValueError(f"non-finite number {name} (not strict JSON)")


def parse(text: str) -> tuple[dict | None, str | None]:
    """(record, None) for a well-formed record; (None, why) otherwise (one line)."""
    try:
        record = json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:  # JSONDecodeError is a ValueError
        return None, f"not valid JSON: {str(e).splitlines()[0]}"
    bad = problems(record)
    if not bad and record.get("status") == "ok":
        bad = [f"status ok with a missing or non-finite metric {k!r}"
               for k, m in record["metrics"].items()
               if not isinstance(m, dict) or not isinstance(m.get("value"), (int, float))]
    return (None, "; ".join(bad)) if bad else (record, None)


def writable_dir(path, option: str) -> None:
    """`path` is, or can be created as, a writable directory (probed with a temporary file
    in its nearest existing ancestor, removed again); LinbenchError naming it otherwise."""
    from linbench.errors import LinbenchError
    p = Path(path).expanduser().absolute()
    for a in (p, *p.parents):
        if not a.exists() and not a.is_symlink():
            continue
        if not a.is_dir():
            what = "is" if a == p else f"is under {a}, which is"
            raise LinbenchError(f"{option} {path} {what} a file, not a directory "
                                f"(give a directory path)")
        try:
            with tempfile.TemporaryFile(dir=a):
                pass
        except OSError as e:
            raise LinbenchError(f"{option} {path}: cannot write in {a} ({e.strerror or e})") from None
        return


class Store:
    def __init__(self, root: str | os.PathLike, warn=_stderr):
        self.root = Path(root)
        self.warn = warn

    def path(self, model: str, method: str, suite: str, key: str) -> Path:
        return self.root / "runs" / _slug(model) / _slug(method) / f"{_slug(suite)}-{key}.json"

    def lock(self, path: Path, timeout: float = -1):
        """An exclusive inter-process lock on one record (held while it is computed)."""
        from filelock import FileLock
        rel = Path(path).resolve().relative_to(self.root.resolve()) \
            if Path(path).resolve().is_relative_to(self.root.resolve()) else Path(_slug(str(path)))
        lock = self.root / ".locks" / (str(rel).replace(os.sep, "__") + ".lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        ignore = self.root / ".locks" / ".gitignore"
        if not ignore.exists():  # lock files never show up as results to commit
            ignore.write_text("*\n")
        return FileLock(str(lock), timeout=timeout)

    def load(self, path: Path) -> dict | None:
        """The record at path, or None when there is none or it is bad (then it is moved
        aside to <path>.corrupt and named in one line)."""
        path = Path(path)
        if not path.exists():
            return None
        try:
            text = path.read_text()
        except FileNotFoundError:  # another process just moved it aside
            return None
        except (OSError, UnicodeDecodeError) as e:
            record, why = None, f"unreadable: {e}"
        else:
            record, why = parse(text)
        if record is not None:
            return record
        aside, n = path.with_name(path.name + ".corrupt"), 1
        while aside.exists():  # never overwrite an earlier bad copy
            aside = path.with_name(f"{path.name}.{time.strftime('%Y%m%dT%H%M%S')}-{n}.corrupt")
            n += 1
        try:
            os.replace(path, aside)
        except FileNotFoundError:  # another process set it aside first (and said so)
            return None
        self.warn(f"linbench: bad record {path} ({why}); kept as {aside.name}, recomputing")
        return None

    def finished(self, path: Path) -> dict | None:
        record = self.load(path)
        return record if record and record.get("status") == "ok" else None

    def write(self, path: Path, record: dict) -> None:
        """Write strict JSON through a temporary file and rename: a reader never sees half a
        record. A non-finite number turns an "ok" record into an "error" one."""
        bad = nonfinite(record)
        if bad:
            record = _finite_only(record)
            if record.get("status") == "ok":
                record.update(status="error",
                              error=f"non-finite value at {', '.join(bad[:5])}")
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(record, indent=1, sort_keys=True, default=str, allow_nan=False)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp",
                                         delete=False) as f:
            f.write(text)
        os.replace(f.name, path)

    def scan(self) -> tuple[list[dict], list[tuple[str, str]]]:
        """(every good record with its "_path", [(file, why skipped)]): read-only."""
        out, skipped = [], []
        runs = self.root / "runs"
        for p in sorted(runs.rglob("*.json")) if runs.is_dir() else []:
            try:
                rec, why = parse(p.read_text())
            except (OSError, UnicodeDecodeError) as e:
                rec, why = None, f"unreadable: {e}"
            if rec is None:
                skipped.append((str(p), why))
                continue
            rec["_path"] = str(p)
            out.append(rec)
        for p in sorted(runs.rglob("*.corrupt")) if runs.is_dir() else []:
            skipped.append((str(p), "set aside as corrupt by an earlier run"))
        return out, skipped

    def records(self) -> list[dict]:
        return self.scan()[0]
