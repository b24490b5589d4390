"""The unmodified model's perplexity on the held-out ShareGPT sequences the recovery stages
report (`ppl_before` / `ppl_after`): same corpus, seed 1234, 2 x 1024 tokens.

    OMP_NUM_THREADS=1 python results/embedded/scripts/softmax_val_ppl.py     # -> 10.29
"""
import math

import torch

from linbench.assets import models
from linbench.recovery.corpus import Corpus

spec = models.resolve("smollm2-135m")
model, tok = models.load(spec, "float32", "cpu")
val = Corpus("sharegpt", tokenizer=tok, seqlen=1024, seed=1234).packed("val", 2)
with torch.no_grad():
    ce = sum(model(input_ids=v[None], labels=v[None]).loss.item() for v in val) / len(val)
print(f"softmax held-out ShareGPT ppl {math.exp(ce):.2f} over {val.numel()} tokens")
