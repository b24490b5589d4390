"""Save and load linearized models as standard transformers checkpoints.

`save_pretrained` writes model.safetensors (the whole state dict, new parameters
included) and config.json: the base architecture's config with model_type
"linbench_<arch>" (linbench_llama, linbench_mistral, linbench_qwen2), architectures
["Linbench<Family>ForCausalLM"] and `linbench` (the method, its resolved config, window
and kept softmax layers). After `import linbench`, transformers' AutoConfig and
AutoModelForCausalLM know these model types (linbench.methods.hf), so
`AutoModelForCausalLM.from_pretrained(dir)` loads the model.

`from_pretrained` (the loader behind both) rebuilds the base architecture from that
config, linearizes it with the recorded method, and loads every tensor strictly, so a
reload is exact. It also reads checkpoints of linbench 0.1.0, whose config.json kept the
base model_type ("llama") beside `linbench`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from linbench.assets.archs import SUPPORTED_ARCHS


PREFIX = "linbench_"  # model_type of a linearized checkpoint: PREFIX + the base model_type


def linearized_type(base_type: str) -> str:
    """'llama' -> 'linbench_llama': the model_type a linearized checkpoint is saved under."""
    return PREFIX + base_type


def loader_name(base_type: str) -> str:
    """'llama' -> 'LinbenchLlamaForCausalLM' (the `architectures` entry of the checkpoint)."""
    return f"Linbench{SUPPORTED_ARCHS[base_type]}ForCausalLM"


def base_type(model_type: str) -> str:
    """The base architecture's model_type: 'linbench_llama' -> 'llama', 'llama' -> 'llama'."""
    return model_type[len(PREFIX):] if model_type.startswith(PREFIX) else model_type


def save_pretrained(model, path) -> None:
    """Write a linearized model (LoRA, if any, must be merged first), or a plain one."""
    if hasattr(model, "peft_config"):
        raise ValueError("merge the LoRA adapters first (model.merge_and_unload())")
    model.save_pretrained(path)
    if hasattr(model.config, "linbench"):  # the model keeps its own config; the file is retyped
        cfg = Path(path) / "config.json"
        data = json.loads(cfg.read_text())
        base = base_type(data["model_type"])
        data.update(model_type=linearized_type(base), architectures=[loader_name(base)])
        cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def base_config_class(base: str):
    """transformers' config class of a base model_type ('llama' -> LlamaConfig)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    if base not in CONFIG_MAPPING:
        raise ValueError(f"unknown model_type {base!r}")
    return CONFIG_MAPPING[base]


def base_config(path):
    """The base architecture's config (a LlamaConfig, ...) of a checkpoint directory, with
    its `linbench` record, whichever model_type config.json carries."""
    data = json.loads((Path(path) / "config.json").read_text())
    data["model_type"] = base_type(data.get("model_type", ""))
    if data.get("architectures") and data["architectures"][0].startswith("Linbench"):
        data["architectures"] = [data["architectures"][0][len("Linbench"):]]
    return base_config_class(data["model_type"]).from_dict(data)


def method_of(config):
    """The Method instance recorded in a linearized model's config."""
    from linbench import registry
    rec = config.linbench if isinstance(config.linbench, dict) else json.loads(config.linbench)
    cls = registry.methods.get(rec["method"])
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in rec["config"].items()}
    fields = {**cls.config_cls.ADDED, **fields}  # saved before those fields existed
    return cls(cls.config_cls(**fields))


def from_pretrained(path, dtype=torch.float32, device="cpu"):
    """Load a model written by `save_pretrained` (a linearized one or a plain one)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    import linbench.methods.attention  # noqa: F401  (registers the recurrent cache layer)

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{str(path)!r} is not a directory: linearized checkpoints load from "
                         "a local directory written by linbench.methods.io.save_pretrained")
    config = base_config(path)
    if not hasattr(config, "linbench"):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    method = method_of(config)
    saved = dict(config.linbench)  # recovery stages and any other provenance it carries
    with torch.device("meta"):
        model = method.linearize(AutoModelForCausalLM.from_config(config, dtype=dtype))
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [k for k, v in model.state_dict().items() if v.is_meta]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    _rebuild_buffers(model, method)
    model.config.linbench = {**saved, **model.config.linbench}  # rebuilt keys win
    # parameters in `dtype`; buffers keep the dtype their modules build them in (rotary
    # inverse frequencies stay fp32, as transformers' own loader keeps them), so the loaded
    # model computes exactly what the saved one did
    model = model.to(device=device)
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model.eval()


def _rebuild_buffers(model, method):
    """Non-persistent buffers (rotary inverse frequencies, fixed decays) were created on the
    meta device: recompute them by rebuilding those modules on the CPU."""
    cfg = model.config
    rotary = type(model.model.rotary_emb)
    model.model.rotary_emb = rotary(config=cfg)
    from linbench.methods.attention import linearized_layers
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    for layer in linearized_layers(model):
        fresh = method.build_mixer(heads, head_dim, cfg.hidden_size, layer.layer_idx, cfg.num_hidden_layers)
        for name, buf in fresh.named_buffers():
            owner = layer.mixer.get_submodule(name.rpartition(".")[0]) if "." in name else layer.mixer
            owner._buffers[name.rpartition(".")[2]] = buf
