"""Provenance: what produced a number — code version, environment, config hash."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path

_PACKAGES = ("torch", "triton", "transformers", "lm_eval", "peft")


def config_hash(config: dict) -> str:
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def git_info() -> dict:
    """git sha and dirty flag of the linbench checkout (None when installed from a wheel)."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
        if sha.returncode != 0:
            return {"sha": None, "dirty": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10)
        return {"sha": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) ...") from /proc/cpuinfo, else
    what `platform` knows (on Linux that is only the architecture)."""
    try:
        for line in Path(cpuinfo).read_text(errors="replace").splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name" and value.strip():
                return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    """The device a record was measured on. For a CPU: its model name and the vector ISA
    torch's kernels use on it, then the thread count ("cpu: AMD EPYC (AVX2) x1 threads"),
    so that two machines of one architecture are told apart (speed tables, resumed sweeps
    and time estimates key on this string); records made before it name only the
    architecture ("cpu: x86_64 x1 threads")."""
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    isa = torch.backends.cpu.get_cpu_capability()
    return f"cpu: {cpu_model()} ({isa}) x{torch.get_num_threads()} threads"


def names_cpu_model(device: str) -> bool:
    """False for a CPU device string made before `device_name` named the model and ISA
    ("cpu: x86_64 x1 threads"): such records may come from different machines."""
    return not device.startswith("cpu:") or "(" in device


def environment(device: str) -> dict:
    from linbench import __version__
    return {"linbench": __version__, "git": git_info(), "versions": versions(),
            "device": device_name(device), "command": sys.argv[:] and
            ["linbench", *sys.argv[1:]]}
