"""Save and load linearized models as standard transformers checkpoints.

`save_pretrained` writes config.json (with `linbench`: the method and its resolved
config, and `layer_types`) and model.safetensors. `from_pretrained` rebuilds the base
architecture from that config, linearizes it with the recorded method, and loads every
tensor strictly -- new parameters included -- so a reload is exact.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def save_pretrained(model, path) -> None:
    """Write a linearized model (LoRA, if any, must be merged first)."""
    if hasattr(model, "peft_config"):
        raise ValueError("merge the LoRA adapters first (model.merge_and_unload())")
    model.save_pretrained(path)


def method_of(config):
    """The Method instance recorded in a linearized model's config."""
    from linbench import registry
    rec = config.linbench if isinstance(config.linbench, dict) else json.loads(config.linbench)
    cls = registry.methods.get(rec["method"])
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in rec["config"].items()}
    return cls(cls.config_cls(**fields))


def from_pretrained(path, dtype=torch.float32, device="cpu"):
    """Load a model written by `save_pretrained` (a linearized one or a plain one)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    import linbench.methods.attention  # noqa: F401  (registers the recurrent cache layer)

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
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
    return model.to(device=device, dtype=dtype).eval()


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
