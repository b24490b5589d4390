"""transformers 5.25+ imports the Hugging Face Hub package `kernels`; this checkout's own
kernels/ folder has the same top-level name. Run from the checkout's root (as pytest and
`python -m linbench` are), importing linbench must leave the installed package in place
so that transformers can load models."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _installed(), reason="the Hub's kernels package is not installed "
                                             "(transformers < 5.25 does not need it)")
def test_linbench_keeps_the_hub_kernels_package_importable_from_the_checkout_root():
    code = ("import linbench, kernels, sys; from transformers import modeling_utils; "
            "from linbench import kernels as ours; "
            "print(kernels.__file__); print(ours.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    hub, ours = out.stdout.split()
    assert "site-packages" in hub and Path(hub).resolve() != ROOT / "kernels" / "__init__.py"
    assert Path(ours).resolve() == ROOT / "kernels" / "__init__.py"
