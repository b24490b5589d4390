"""Held-out perplexity of linearized models at initialization (no training): the paper's
init against the calibrated one, across feature maps. One JSON line per configuration.

    OMP_NUM_THREADS=1 python results/embedded/scripts/init_study.py OUT.jsonl \
        gla gla:init=paper gla:feature_map=softmax_head deltanet lightning ...

Each argument is a method with optional `field=value` overrides after ':' (joined by ',').
Same data as recovery: ShareGPT, seed 1234, 1024-token packed sequences; calibration on
the first `calibration_tokens` training tokens, perplexity on 2 held-out sequences.
"""
import json
import math
import sys
import time

import torch

from linbench import overrides, registry
from linbench.assets import models
from linbench.recovery.calibrate import calibrate
from linbench.recovery.corpus import Corpus

out_path, specs = sys.argv[1], sys.argv[2:]
spec = models.resolve("smollm2-135m")
_, tok = models.load(spec, "float32", "cpu")
corpus = Corpus("sharegpt", tokenizer=tok, seqlen=1024, seed=1234)
val = corpus.packed("val", 2)
train = corpus.packed("train", 8)


def ppl(model) -> float:
    with torch.no_grad():
        ce = sum(model(input_ids=v[None], labels=v[None]).loss.item() for v in val) / len(val)
    return math.exp(min(ce, 700.0))


for item in specs:
    name, _, sets = item.partition(":")
    chosen = overrides.resolve([name], [f"{name}.{s}" for s in sets.split(",") if s])[name]
    method = registry.methods.get(name)(**chosen)
    t0 = time.time()
    model = method.linearize(models.load(spec, "float32", "cpu")[0]).eval()
    info = {}
    if getattr(method.config, "init", None) == "calibrated" and method.calibrates():
        info = calibrate(model, train, method.config.calibration_tokens)
    row = {"method": name, "overrides": chosen, "init": getattr(method.config, "init", None),
           "ppl": ppl(model), "calibration": info, "seconds": round(time.time() - t0, 1)}
    print(json.dumps(row), flush=True)
    with open(out_path, "a") as f:
        f.write(json.dumps(row) + "\n")
