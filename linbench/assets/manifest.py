"""Checkpoint manifests: every cached model directory lists its files' sizes and sha256 in
manifest.json, written last and atomically; a directory is trusted only if it matches.

    write(dir)   after every other file is in place
    problem(dir) None when the directory matches its manifest, else one line saying why
    set_aside(dir) rename a bad directory to <name>.corrupt-<time> (kept for inspection)
    lock(dir, echo, waiting) the inter-process lock beside a directory (<dir>.lock)
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

NAME = "manifest.json"
VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and p.name != NAME and not p.name.endswith(".tmp"))


def write(directory) -> dict:
    directory = Path(directory)
    files = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in _files(directory)}
    manifest = {"manifest_version": VERSION, "files": files}
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, directory / NAME)
    return manifest


def problem(directory) -> str | None:
    """Why `directory` must not be used (None when every file matches the manifest)."""
    directory = Path(directory)
    path = directory / NAME
    if not path.is_file():
        return "no manifest.json (unfinished or written by an older linbench)"
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        assert manifest.get("manifest_version") == VERSION and isinstance(files, dict) and files
    except (ValueError, KeyError, TypeError, AssertionError, OSError):
        return "manifest.json is unreadable"
    present = {str(p.relative_to(directory)) for p in _files(directory)}
    extra = sorted(present - set(files))
    if extra:
        return f"{extra[0]} is not in the manifest"
    for name, want in sorted(files.items()):
        f = directory / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != want.get("bytes"):
            return f"{name} has {size} bytes, the manifest says {want.get('bytes')}"
        if sha256_file(f) != want.get("sha256"):
            return f"{name} does not match its sha256 in the manifest"
    return None


def set_aside(directory) -> Path:
    directory = Path(directory)
    aside = directory.with_name(f"{directory.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    n = 1
    while aside.exists():
        aside = aside.with_name(f"{aside.name}.{n}")
        n += 1
    os.replace(directory, aside)
    return aside


def lock(directory, echo, waiting: str):
    """Acquire the inter-process file lock beside `directory` (<name>.lock, filelock); when
    another process holds it, say `waiting` through echo once, then block until it is free.
    Returns the held lock (release() it)."""
    from filelock import FileLock, Timeout
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    lk = FileLock(str(directory.with_name(directory.name + ".lock")))
    try:
        lk.acquire(timeout=0)
    except Timeout:
        echo(waiting)
        lk.acquire()
    return lk
