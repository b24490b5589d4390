from __future__ import annotations

import pytest

from linbench import registry
from linbench.errors import LinbenchError


def test_builtins_are_listed_without_importing_them():
    import subprocess
    import sys
    code = ("import sys; from linbench import registry; registry.suites.check('mmlu5');"
            "print(sorted(registry.methods.names()), 'linbench.suites.mmlu5' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "'softmax'" in out.stdout and out.stdout.strip().endswith("False")


def test_unknown_name_lists_choices():
    with pytest.raises(LinbenchError, match=r"unknown method 'x' \(choose from: .*softmax"):
        registry.methods.get("x")


def test_entry_point_plugins_are_found(plugin_path):
    assert "plugin-identity" in registry.methods.names()
    assert "plugin-nll" in registry.suites.names()
    cls = registry.suites.get("plugin-nll")
    assert cls.__name__ == "TextNLL" and cls.name == "plugin-nll"


def test_register_in_process():
    class M:
        name = "m-test"
    registry.methods.register("m-test", M)
    try:
        assert registry.methods.get("m-test") is M
    finally:
        registry.methods.unregister("m-test")
    assert "m-test" not in registry.methods.names()
