"""Model resolution: local directories are checked (config.json, architecture) before any
weight is read; hub ids pass --revision through and record the commit."""
from __future__ import annotations

import json
import shutil

import pytest

from linbench.assets import models
from linbench.errors import LinbenchError


def test_a_local_directory_resolves_with_its_weights_hash(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LINBENCH_CACHE", str(tmp_path / "cache"))
    spec = models.resolve(str(tiny_model_dir))
    assert spec.source == "local" and spec.path == str(tiny_model_dir.resolve())
    assert spec.file_hash != models.sha256_file(tiny_model_dir / "model.safetensors")  # hash of hashes
    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir, copy)
    assert models.resolve(str(copy)).file_hash == spec.file_hash  # content, not place
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x01" * 8)
    assert models.resolve(str(copy)).file_hash != spec.file_hash


@pytest.mark.parametrize("config, needle", [
    ({"hidden_size": 8}, "has no model_type (supported: llama, mistral, qwen2)"),
    ({"model_type": "gpt2"}, "unsupported architecture 'gpt2' (supported: Llama, Mistral, Qwen2 families"),
    ([1, 2], "is not a JSON object"),
    ("{not json", "is not valid JSON"),
])
def test_bad_local_configs_are_one_line(tmp_path, config, needle):
    (tmp_path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    with pytest.raises(LinbenchError) as e:
        models.resolve(str(tmp_path))
    msg = str(e.value)
    assert needle in msg and str(tmp_path / "config.json") in msg and "\n" not in msg


def test_hub_ids_pass_the_revision_and_record_the_commit(monkeypatch):
    from transformers import AutoConfig, LlamaConfig
    seen = []

    def fake(name, revision=None, **k):
        seen.append((name, revision))
        cfg = LlamaConfig()
        cfg._commit_hash = "c0ffee"
        return cfg
    monkeypatch.setattr(AutoConfig, "from_pretrained", fake)
    spec = models.resolve("org/some-llama", "v1.0")
    assert seen == [("org/some-llama", "v1.0")]
    assert (spec.source, spec.file_hash, spec.revision) == ("hub", "hub:c0ffee", "c0ffee")


def test_an_unreachable_hub_id_is_one_line(monkeypatch):
    from transformers import AutoConfig

    def fail(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore detail")
    monkeypatch.setattr(AutoConfig, "from_pretrained", fail)
    with pytest.raises(LinbenchError) as e:
        models.resolve("org/missing")
    assert "'org/missing'" in str(e.value) and "\n" not in str(e.value)


def test_a_bad_converted_embedded_model_is_set_aside_and_converted_again(tmp_path, monkeypatch, capsys):
    """The embedded GGUF's safetensors cache carries a manifest like any checkpoint."""
    from linbench.assets import manifest
    monkeypatch.setenv("LINBENCH_CACHE", str(tmp_path))
    conversions = []

    def fake_convert(gguf, target, gguf_hash, hf_id):  # the real one takes ~18 s
        target.mkdir(parents=True)
        (target / "model.safetensors").write_bytes(b"w" * 4096)
        (target / "linbench.json").write_text("{}")
        manifest.write(target)
        conversions.append(target)
    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    spec = models.resolve("smollm2-135m")
    target = tmp_path / "models" / f"smollm2-135m-{spec.file_hash[:12]}"
    assert conversions == [target] and spec.path == str(target)
    models.resolve("smollm2-135m")
    assert len(conversions) == 1  # a good cache is reused
    with open(target / "model.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"garbage")
    capsys.readouterr()
    models.resolve("smollm2-135m")
    assert len(conversions) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"linbench: converted model {target} is bad (model.safetensors does "
                           f"not match its sha256")
    (aside,) = target.parent.glob(f"{target.name}.corrupt-*")
    assert (aside / "model.safetensors").read_bytes()[100:107] == b"garbage"
    assert manifest.problem(target) is None
