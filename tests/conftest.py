"""Shared fixtures: a tiny random Llama (seconds) and the embedded SmolLM2 tokenizer."""
from __future__ import annotations

import os
import socket
from pathlib import Path

# Triton kernels run in the CPU interpreter when no GPU is present. Must be set before
# any Triton kernel module is imported.
try:
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The embedded SmolLM2 tokenizer (needs `linbench fetch`)."""
    from linbench.assets.models import load_tokenizer
    return load_tokenizer("smollm2-135m")


def make_tiny_llama(vocab_size: int = 49152, seed: int = 0, **overrides):
    """A 2-layer random Llama with GQA (4 heads, 2 kv heads), built in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=2048, tie_word_embeddings=True)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def no_network(monkeypatch):
    """Refuse and record every connection attempt, even ones the caller swallows."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access refused by the test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield
    assert attempts == [], f"network access attempted: {attempts}"

PLUGIN_DIR = Path(__file__).parent / "core" / "plugin_dist"


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
