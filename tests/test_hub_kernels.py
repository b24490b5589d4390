"""This checkout's kernels/ folder (installed as linbench.kernels) is found as the top-level
name `kernels` wherever the checkout's root is on sys.path (pytest, `python -c` and
`python -m` run from it). That is the name of the Hugging Face Hub package that
transformers 5.25+ imports; the folder hands such an import over to the installed package,
in any import order."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


OURS = ROOT / "kernels" / "__init__.py"


def _from_root(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def _files_of_kernels_and_ours(code: str) -> Path:
    """Run `code` from the root, then print the files of `kernels` and `linbench.kernels`:
    assert the second is this folder and return the first."""
    out = _from_root(code + "\nimport kernels, linbench.kernels as ours\n"
                            "print(kernels.__file__, ours.__file__)")
    assert out.returncode == 0, out.stderr[-2000:]
    theirs, ours = map(Path, out.stdout.split())
    assert ours.resolve() == OURS
    return theirs


def test_a_top_level_kernels_import_gets_the_installed_package(tmp_path):
    """A stand-in Hub package right after the root on sys.path: `import kernels` returns it
    (its own module object, its submodules importable), and linbench.kernels stays ours."""
    hub = tmp_path / "site" / "kernels"
    hub.mkdir(parents=True)
    (hub / "__init__.py").write_text("WHO = 'hub'\n")
    (hub / "layer.py").write_text("X = 1\n")
    code = (f"import sys; sys.path.insert(1, {str(tmp_path / 'site')!r})\n"
            "import kernels, kernels.layer, linbench.kernels\n"
            "assert kernels.WHO == 'hub' and kernels.layer.X == 1, kernels.__file__\n"
            "assert sys.modules['kernels'] is kernels and linbench.kernels.linear_attention")
    assert _files_of_kernels_and_ours(code) == hub / "__init__.py"


def test_without_an_installed_package_import_kernels_fails_as_if_the_folder_were_absent():
    out = _from_root("import kernels", "-S")  # -S: no site-packages, so no Hub package
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == "ModuleNotFoundError: No module named 'kernels'"


def _installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _installed(), reason="the Hub's kernels package is not installed "
                                             "(transformers < 5.25 does not need it)")
@pytest.mark.parametrize("first", ["transformers", "linbench"])
def test_transformers_loads_its_modeling_code_from_the_checkout_root(first):
    other = "linbench" if first == "transformers" else "transformers"
    hub = _files_of_kernels_and_ours(f"import {first}, {other}\n"
                                     "from transformers import modeling_utils, LlamaForCausalLM")
    assert "site-packages" in hub.parts and hub.resolve() != OURS
