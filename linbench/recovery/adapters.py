"""The adapters of recovery stage 2, all built by peft (methods/README.md, "Adapters").

    lora    LoRA (Hu et al., arXiv 2106.09685): W + (alpha/r) B A, B = 0 at the start.
    pissa   PiSSA (Meng et al., arXiv 2404.02948): A, B from the top-r singular triplets of
            W, the frozen base becomes the residual W - (alpha/r) B A (peft
            init_lora_weights="pissa", the exact SVD).
    eva     EVA (Paischer et al., arXiv 2410.07170): A from the top right-singular vectors
            of each layer's input activations on calibration batches, ranks redistributed
            by explained variance (rho = 2), B = 0 (init_lora_weights="eva",
            peft.initialize_lora_eva_weights).
    corda   CorDA (Yang et al., arXiv 2406.05223), instruction-previewed mode (IPM): SVD of
            W C, C the covariance of the layer's inputs on calibration batches; the top-r
            components become the adapter, the base the residual (init_lora_weights="corda",
            peft.tuners.lora.corda.preprocess_corda).
    bone    peft's MiSS (Kang, arXiv 2409.15371), the successor of Bone in peft (this peft
            has no BoneConfig): a shared zero-initialized (r, out) block added to every
            r-column slice of W; r = lora_r, init_weights=True ("balance").

All start as the model's own function (PiSSA and CorDA move the adapted part out of the
base weight), and all merge back with peft's merge_and_unload. EVA and CorDA read the
calibration rows the caller passes: the first `calibration_tokens` tokens of the LoRA
stage's own training tensor, never held-out data.
"""
from __future__ import annotations

import math
import warnings

import torch

from linbench.methods.base import ADAPTERS

CALIBRATING = ("eva", "corda")


def calibration_rows(cfg, train: torch.Tensor) -> torch.Tensor | None:
    """The first rows of `train` (n, T) holding cfg.calibration_tokens tokens, for the
    adapters that calibrate; None for the others."""
    if cfg.adapter not in CALIBRATING:
        return None
    return train[: max(1, min(len(train), math.ceil(cfg.calibration_tokens / train.shape[1])))]


def build(cfg, model, calibration: torch.Tensor | None = None, micro: int = 1):
    """peft model with cfg.adapter on cfg.lora_targets of `model` (whose own parameters the
    caller has frozen). `calibration`: rows (n, T) of token ids, needed by eva and corda."""
    from peft import LoraConfig, MissConfig, get_peft_model
    if cfg.adapter not in ADAPTERS:
        raise ValueError(f"unknown adapter {cfg.adapter!r}; valid: {', '.join(ADAPTERS)}")
    if cfg.adapter in CALIBRATING and (calibration is None or not len(calibration)):
        raise ValueError(f"adapter {cfg.adapter!r} needs calibration rows of the training split")
    device = next(model.parameters()).device
    targets = list(cfg.lora_targets)
    if cfg.adapter == "bone":
        pcfg = MissConfig(r=cfg.lora_r, miss_dropout=cfg.lora_dropout, target_modules=targets,
                          init_weights=True)
    else:
        extra = {}
        if cfg.adapter == "eva":
            from peft import EvaConfig
            extra["eva_config"] = EvaConfig()
        elif cfg.adapter == "corda":
            from peft.tuners.lora.config import CordaConfig
            extra["corda_config"] = CordaConfig(corda_method="ipm")
        init = {"lora": True, "pissa": "pissa"}.get(cfg.adapter, cfg.adapter)
        pcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets, bias="none", init_lora_weights=init, **extra)
    if cfg.adapter == "corda":  # covariances of the targets' inputs, one row per forward
        from peft.tuners.lora.corda import preprocess_corda

        def run_model():
            for row in calibration:
                model(input_ids=row[None].to(device), use_cache=False)
        preprocess_corda(model, pcfg, run_model=run_model)
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
        warnings.simplefilter("ignore", FutureWarning)
        # EVA: adapter weights are made by its init below, not allocated twice (peft's advice)
        peft_model = get_peft_model(model, pcfg, low_cpu_mem_usage=cfg.adapter == "eva")
    if cfg.adapter == "eva":  # incremental SVD over the batches, cycled until it converges
        from peft import initialize_lora_eva_weights
        batches = [{"input_ids": calibration[i:i + micro].to(device)}
                   for i in range(0, len(calibration), micro)]
        initialize_lora_eva_weights(peft_model, dataloader=batches, show_progress_bar=False,
                                    forward_fn=lambda m, inputs: m(**inputs, use_cache=False))
    return peft_model
