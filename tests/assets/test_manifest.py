"""Checkpoint manifests: sizes and sha256 of every file, written last; any mismatch is
named in one line."""
from __future__ import annotations

import json

import pytest

from linbench.assets import manifest


@pytest.fixture
def ckpt(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (d / "config.json").write_text('{"a": 1}')
    (d / "sub").mkdir()
    (d / "sub" / "extra.bin").write_bytes(b"x" * 10)
    m = manifest.write(d)
    assert set(m["files"]) == {"model.safetensors", "config.json", "sub/extra.bin"}
    assert m["files"]["config.json"]["bytes"] == 8
    return d


def test_an_intact_directory_passes(ckpt):
    assert manifest.problem(ckpt) is None
    assert not list(ckpt.glob("*.tmp"))  # written through a temporary file


@pytest.mark.parametrize("damage, why", [
    (lambda d: (d / "config.json").write_text('{"a": 2}'), "config.json does not match its sha256"),
    (lambda d: (d / "config.json").write_text('{"a": 22}'), "config.json has 9 bytes, the manifest says 8"),
    (lambda d: (d / "sub" / "extra.bin").unlink(), "sub/extra.bin is missing"),
    (lambda d: (d / "other.safetensors").write_bytes(b"1"), "other.safetensors is not in the manifest"),
    (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
    (lambda d: (d / "manifest.json").write_text("{"), "manifest.json is unreadable"),
    (lambda d: (d / "manifest.json").write_text(json.dumps({"manifest_version": 1, "files": {}})),
     "manifest.json is unreadable"),
])
def test_every_mismatch_is_named(ckpt, damage, why):
    damage(ckpt)
    got = manifest.problem(ckpt)
    assert got is not None and got.startswith(why) and "\n" not in got


def test_set_aside_keeps_the_bad_directory_under_a_new_name(ckpt):
    first = manifest.set_aside(ckpt)
    assert not ckpt.exists() and first.name.startswith("model.corrupt-")
    ckpt.mkdir()
    second = manifest.set_aside(ckpt)
    assert second != first and first.exists() and second.exists()
