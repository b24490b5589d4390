"""The embedded SmolLM2 model end to end (needs `linbench fetch`; about two minutes)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from linbench.assets import models
from linbench.assets.data import data_file

pytestmark = pytest.mark.integration


def test_cached_safetensors_equal_the_gguf():
    spec = models.resolve("smollm2-135m")
    cached, tok = models.load(spec)
    entry = models.EMBEDDED["smollm2-135m"]
    gguf = data_file(entry["dist"], entry["gguf"])
    original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    ids = tok("Linear attention keeps a fixed-size state.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(cached(ids).logits, original(ids).logits)
    assert spec.file_hash == models.sha256_file(gguf)


def test_mmlu5_softmax_on_embedded_model(tmp_path):
    cmd = [sys.executable, "-m", "linbench.cli", "run", "--methods", "softmax", "--suite", "mmlu5",
           "--limit", "1", "--results", str(tmp_path), "--quiet"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = (tmp_path / "runs").rglob("*.json")
    rec = json.loads(path.read_text())
    acc = rec["metrics"]["acc"]
    assert rec["status"] == "ok" and acc["n"] == 57  # one question per subject
    assert 0.0 <= acc["value"] <= 1.0 and acc["stderr"] > 0
    cats = [rec["metrics"][f"acc_{c}"] for c in ("stem", "humanities", "social_sciences", "other")]
    assert sum(c["n"] for c in cats) == 57
    assert abs(sum(c["value"] * c["n"] for c in cats) / 57 - acc["value"]) < 1e-9
    assert rec["model"]["source"] == "embedded" and len(rec["model"]["file_hash"]) == 64
    assert "| softmax |" in out.stdout
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0 and "reusing finished record" in again.stderr
