from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import make_tiny_llama

PLUGIN_DIR = Path(__file__).parent / "plugin_dist"


@pytest.fixture
def plugin_path(monkeypatch):
    """Make the test plugin distribution discoverable through entry points."""
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(PLUGIN_DIR), os.environ.get("PYTHONPATH", "")]))
    return PLUGIN_DIR


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    """A tiny random Llama saved as a local Hugging Face directory, with a real tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama().save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def invoke(capsys):
    """Run the CLI in-process: returns (exit code, stdout, stderr)."""
    from linbench.cli import main

    def _invoke(*args):
        with pytest.raises(SystemExit) as exc:
            main(list(args))
        out = capsys.readouterr()
        return exc.value.code, out.out, out.err
    return _invoke
