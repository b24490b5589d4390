"""Measured hybrid layer selection: `keep_softmax_layers="auto:N"` (or "auto_kl:N").

After stage 1 (attention transfer) every layer is still linearized. This module measures,
on the held-out split, how much linearizing each layer hurts, reverts the N worst layers
to the model's own softmax attention (methods.linearize.restore_softmax) and records the
choice, before stage 2 (LoRA) trains the hybrid model.

    transfer_mse (auto:N)     each layer's attention-transfer MSE: its linearized output
                              (before o_proj) vs the softmax teacher's on the same q, k, v,
                              every layer fed the teacher's hidden states (stage 1's loss
                              without its weight)
    kl (auto_kl:N)            KL(parent || model) of the next-token distribution, averaged
                              over tokens, with only that layer linearized (every other
                              candidate temporarily softmax): one forward per layer per batch

Layers kept softmax by `softmax_every` or explicit indices are not candidates.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from linbench.methods.attention import LinearizedAttention
from linbench.methods.base import AUTO_CRITERIA, auto_softmax
from linbench.methods.linearize import (decoder_layers, restore_softmax, set_attention_implementation,
                                        softmax_twin)
from linbench.recovery.train import autocast


def pending(method, model) -> tuple[str, int] | None:
    """(criterion, N) when `method` asks for auto selection and `model` has not had it yet
    (a model reloaded from a stage checkpoint after selection has)."""
    auto = auto_softmax(method.config) if hasattr(method.config, "keep_softmax_layers") else None
    rec = getattr(model.config, "linbench", None)
    return None if auto is None or "layer_selection" in (rec or {}) else auto


def candidates(model) -> dict[int, LinearizedAttention]:
    return {i: layer.self_attn for i, layer in enumerate(decoder_layers(model))
            if isinstance(layer.self_attn, LinearizedAttention)}


@torch.no_grad()
def transfer_mse(model, val: torch.Tensor, micro: int = 1) -> dict[int, float]:
    """Held-out attention-transfer MSE of each linearized layer, row-weighted."""
    layers = candidates(model)
    body = model.get_decoder() if hasattr(model, "get_decoder") else model
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    sums = dict.fromkeys(layers, 0.0)
    for layer in layers.values():
        layer.transfer = "mse"
    try:
        with autocast(device, dtype):
            for r in range(0, len(val), micro):
                rows = val[r:r + micro].to(device)
                body(input_ids=rows, use_cache=False)
                for i, layer in layers.items():
                    sums[i] += float(layer.transfer_loss) * len(rows)
    finally:
        for layer in layers.values():
            layer.transfer, layer.transfer_loss = None, None
    return {i: s / max(len(val), 1) for i, s in sums.items()}


@torch.no_grad()
def single_layer_kl(model, val: torch.Tensor, micro: int = 1) -> dict[int, float]:
    """Per linearized layer i: mean over held-out tokens of KL(parent || model with only
    layer i linearized). The parent is the model with every candidate reverted to its
    softmax twin; the modules are put back as they were afterwards."""
    lin = candidates(model)
    twins = {i: softmax_twin(a) for i, a in lin.items()}
    blocks = decoder_layers(model)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    sums, tokens = dict.fromkeys(lin, 0.0), 0

    def logp(ids):
        return model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1).flatten(0, 1)

    try:
        for i in lin:
            blocks[i].self_attn = twins[i]
        set_attention_implementation(model)  # the twins need the softmax implementation
        with autocast(device, dtype):
            for r in range(0, len(val), micro):
                ids = val[r:r + micro].to(device)
                parent = logp(ids)
                for i in lin:
                    blocks[i].self_attn = lin[i]
                    sums[i] += float(F.kl_div(logp(ids), parent, log_target=True, reduction="sum"))
                    blocks[i].self_attn = twins[i]
                tokens += parent.shape[0]
    finally:
        for i, a in lin.items():
            blocks[i].self_attn = a
        set_attention_implementation(model)
    return {i: s / max(tokens, 1) for i, s in sums.items()}


MEASURES = {"transfer_mse": transfer_mse, "kl": single_layer_kl}


def select(model, criterion: str, n: int, val: torch.Tensor, micro: int = 1) -> dict:
    """Measure every linearized layer by `criterion`, revert the `n` highest to softmax
    (a non-finite score counts as the highest; ties: the lower index), record the choice
    in model.config.linbench["layer_selection"] and return it (for the record too)."""
    t0 = time.time()
    scores = {i: s if math.isfinite(s) else None
              for i, s in MEASURES[criterion](model, val, micro).items()}
    chosen = sorted(sorted(scores, key=lambda i: (-(math.inf if scores[i] is None else scores[i]), i))[:n])
    restore_softmax(model, chosen)
    spec = next(k for k, v in AUTO_CRITERIA.items() if v == criterion)
    info = {"spec": f"{spec}:{n}", "criterion": criterion, "n": n, "kept_softmax": chosen,
            "scores": {str(i): s for i, s in sorted(scores.items())},
            "tokens": int(val.numel()), "seconds": round(time.time() - t0, 2)}
    model.config.linbench = {**model.config.linbench, "layer_selection": info}
    return info
