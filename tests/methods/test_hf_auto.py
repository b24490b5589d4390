"""Linearized checkpoints load with transformers' own AutoModelForCausalLM (after `import
linbench`), with the logits of the model that was saved; linbench's loader reads both
the current format and the one of linbench 0.1.0.

fixtures/lolcats_v010: a lolcats-linearized tiny Llama (hidden 32, vocab 128, every
parameter perturbed off its init) written by linbench 0.1.0's io.save_pretrained
(config.json: model_type "llama" beside `linbench`), with the logits that model gave for
80 fixed token ids (expected_logits.safetensors; longer than lolcats' 64-token window).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import linbench  # noqa: F401  (registers the Auto classes)
from linbench import registry
from linbench.methods import io
from tests.conftest import make_tiny_llama

FIXTURE = Path(__file__).parent / "fixtures" / "lolcats_v010"
VOCAB = 128


def _linearized(name, seed=0):
    torch.manual_seed(seed)
    base = make_tiny_llama(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, seed=seed)
    model = registry.methods.get(name)().linearize(base)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # off the init, so a parameter left out of the load shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _ids(T=80):
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(3))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", ["lolcats", "lightning", "gla"])
def test_auto_model_loads_a_saved_linearized_model(tmp_path, name):
    from transformers import AutoConfig, AutoModelForCausalLM
    model, ids = _linearized(name), _ids()
    io.save_pretrained(model, tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "linbench_llama"
    assert data["architectures"] == ["LinbenchLlamaForCausalLM"]
    assert data["linbench"]["method"] == name
    assert type(AutoConfig.from_pretrained(tmp_path)).__name__ == "LinbenchLlamaConfig"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "LlamaForCausalLM"  # the family's class, linearized
    assert io.method_of(loaded.config).config_dict() == io.method_of(model.config).config_dict()
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=1e-6)
    ours = io.from_pretrained(tmp_path)  # linbench's own loader reads the same files
    torch.testing.assert_close(_logits(ours, ids), _logits(model, ids), rtol=0, atol=1e-6)


def test_auto_model_dtype_and_from_config(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM
    io.save_pretrained(_linearized("lolcats"), tmp_path)
    assert next(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
                .parameters()).dtype == torch.float64
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path))
    assert io.method_of(fresh.config).name == "lolcats"
    assert _logits(fresh, _ids(8)).shape == (2, 8, VOCAB)


def test_a_linbench_010_checkpoint_loads_with_its_logits(tmp_path):
    """The committed 0.1.0 checkpoint: same logits through io.from_pretrained, and once
    re-saved, through AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM
    assert json.loads((FIXTURE / "config.json").read_text())["model_type"] == "llama"
    want = load_file(FIXTURE / "expected_logits.safetensors")
    model = io.from_pretrained(FIXTURE)
    torch.testing.assert_close(_logits(model, want["input_ids"]), want["logits"], rtol=0, atol=1e-6)
    io.save_pretrained(model, tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(again, want["input_ids"]), want["logits"], rtol=0, atol=1e-6)


def test_fields_added_after_a_checkpoint_take_the_value_it_was_trained_with(monkeypatch):
    """A field missing from a saved config takes its config class's ADDED value (the form
    the checkpoint was trained in), not the current default; a saved value always wins."""
    from linbench.methods.lolcats import LolcatsConfig
    assert "affine" not in json.loads((FIXTURE / "config.json").read_text())["linbench"]["config"]
    assert io.method_of(io.base_config(FIXTURE)).config.affine is False
    monkeypatch.setattr(LolcatsConfig, "ADDED", {"affine": True})  # as if it had been trained so
    assert io.method_of(io.base_config(FIXTURE)).config.affine is True
    assert registry.methods.get("lolcats")().config.affine is False  # the default is not it
    monkeypatch.setattr(LolcatsConfig, "ADDED", {})
    saved = io.base_config(FIXTURE)
    saved.linbench = {**saved.linbench, "config": {**saved.linbench["config"], "affine": True}}
    assert io.method_of(saved).config.affine is True


# Import orders of a new process, each followed by `from transformers import AutoConfig,
# AutoModelForCausalLM` and the loads. "names" is the worst: transformers imports its auto
# modules from inside LlamaConfig's own import, so LlamaConfig does not exist yet when they
# complete (linbench once warned and registered nothing).
ORDERS = {
    "names": "import linbench\nfrom transformers import LlamaConfig, LlamaForCausalLM",
    "auto": "import linbench\nfrom transformers import AutoConfig",
    "transformers_first": "from transformers import LlamaForCausalLM\nimport linbench\n"
                          "from linbench.methods import io",
}


@pytest.mark.parametrize("order", ORDERS)
def test_fresh_process_any_import_order(tmp_path, order):
    """`import linbench` (which imports neither torch nor transformers) and transformers in
    either order: AutoConfig and AutoModelForCausalLM load the checkpoint, with its logits,
    and no warning is emitted (-W error::UserWarning)."""
    io.save_pretrained(_linearized("lolcats"), tmp_path)
    ids = _ids(16)
    torch.save({"ids": ids, "logits": _logits(io.from_pretrained(tmp_path), ids)}, tmp_path / "want.pt")
    first, _, rest = ORDERS[order].partition("\n")
    script = textwrap.dedent(f"""
        import sys
        {first}
        if {order!r} != "transformers_first":
            assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")]
        """) + rest + textwrap.dedent(f"""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        assert type(AutoConfig.from_pretrained({str(tmp_path)!r})).__name__ == "LinbenchLlamaConfig"
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
        want = torch.load({str(tmp_path / 'want.pt')!r})
        with torch.no_grad():
            err = (model(want["ids"]).logits - want["logits"]).abs().max().item()
        assert err <= 1e-6, err
        print("ok")
        """)
    run = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", script],
                         capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=300)
    assert run.stdout.strip().endswith("ok"), run.stderr[-2000:]
    assert "could not register" not in run.stderr, run.stderr[-2000:]
