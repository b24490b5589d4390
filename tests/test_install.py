"""The package installs both ways: a regular wheel and an editable install.

Each runs in a fresh virtual environment whose only view of the dependencies is a .pth
line pointing at this interpreter's site-packages (so torch is not reinstalled), from a
working directory outside the checkout.
"""
from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import importlib.util, json, sys
from importlib import resources
import linbench.kernels.linear.reference, linbench.kernels.triton, linbench.methods.softmax
import linbench.suites.base, linbench.cli
import linbench.records.schema, linbench.assets.models, linbench.recovery.budget, linbench.speed.sweep, linbench.report.build
from importlib import metadata
from pathlib import Path
top = {f.parts[0] for f in metadata.files("linbench")}
for generic in ("kernels", "methods", "suites"):  # another package may own the name (the Hub's kernels)
    spec = importlib.util.find_spec(generic)
    mine = spec is not None and Path(spec.origin or "").resolve().is_relative_to(Path(sys.argv[1], generic))
    assert generic not in top and not mine, generic + " leaked as a top-level name"
assert json.loads(resources.files("linbench.assets").joinpath("data_lock.json").read_text())["wheels"]
yamls = [p.name for p in resources.files("linbench.suites").joinpath("tasks").iterdir()]
assert any(n.endswith(".yaml") for n in yamls), yamls
print("OK", linbench.kernels.linear.reference.__file__)
"""


def _fresh_env(tmp_path: Path) -> Path:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return py


def _pip(py: Path, *args):
    cmd = [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
           "--no-build-isolation", "-q", *args]
    subprocess.run(cmd, check=True, cwd=py.parent)


@pytest.mark.install
@pytest.mark.parametrize("mode", ["wheel", "editable"])
def test_install(tmp_path, mode):
    py = _fresh_env(tmp_path)
    if mode == "wheel":
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path / "dist"), str(ROOT)], check=True, cwd=tmp_path)
        _pip(py, *map(str, (tmp_path / "dist").glob("linbench-*.whl")))
    else:
        _pip(py, "-e", str(ROOT))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(py), "-c", CHECK, str(ROOT)], capture_output=True, text=True,
                         cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    where = out.stdout.split()[-1]
    if mode == "wheel":
        assert str(tmp_path / "venv") in where  # the installed copy, not the checkout
    else:
        assert where == str(ROOT / "kernels" / "linear" / "reference.py")
    cli = subprocess.run([str(py.parent / "linbench"), "ls", "methods"], capture_output=True,
                         text=True, cwd=tmp_path, env=env)
    assert cli.returncode == 0 and "softmax" in cli.stdout.split(), cli.stderr
