"""A third-party plugin, as a user would ship it: one method and one suite.

The tests put this folder on sys.path together with a .dist-info carrying the
entry points, so linbench finds both through `importlib.metadata` like any plugin.
"""
from __future__ import annotations

import math

import torch

from linbench.methods.base import Method
from linbench.suites.base import Metric, Record, Suite

TEXT = "The quick brown fox jumps over the lazy dog. " * 4


class Identity(Method):
    name = "plugin-identity"

    def linearize(self, model):
        return model

    def state_bytes(self, model, seqlen):
        return 0


class TextNLL(Suite):
    """Mean next-token negative log-likelihood of a fixed text (a real measurement)."""
    name = "plugin-nll"

    def run(self, model, tokenizer, ctx):
        ids = tokenizer(TEXT, return_tensors="pt").input_ids.to(ctx.device)
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        n = nll.numel()
        se = float(nll.std() / math.sqrt(n))
        return [Record(self.name, {"nll": Metric(float(nll.mean()), se, n)})]
