"""Calibrated initialization of a linearized model's new parameters (before transfer).

The new per-head output RMSNorm of gla, deltanet and lightning starts as the identity, so
every head emits RMS ~1 where the softmax teacher's heads emit far less (0.03-0.87 on
SmolLM2-135M): every layer starts many times too loud. One no-grad pass over a small batch
of the recovery corpus, in which each layer sees the teacher's input (as in attention
transfer), measures per (head, channel) the teacher output's second moment and the
normalized student output's, and sets the norm weight to their ratio's square root
(LinearizedAttention.calibrate). Methods without an output norm are left unchanged.
"""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def calibrate(model, train: torch.Tensor, tokens: int, micro: int = 1) -> dict:
    """Calibrate every linearized layer on the first rows of `train` (rows, seqlen) that
    hold at least `tokens` tokens; returns what was done (for the record)."""
    from linbench.methods.attention import linearized_layers
    layers = linearized_layers(model)
    rows = train[: max(1, min(len(train), math.ceil(tokens / train.shape[1])))]
    body = model.get_decoder() if hasattr(model, "get_decoder") else model
    device = next(model.parameters()).device
    for layer in layers:
        layer.transfer = "calibrate"
    try:
        for i in range(0, len(rows), micro):
            body(input_ids=rows[i:i + micro].to(device), use_cache=False)
    finally:
        for layer in layers:
            layer.transfer = None
    done = sum(layer.calibrate() for layer in layers)
    return {"init": "calibrated", "layers": int(done), "tokens": int(rows.numel())}
