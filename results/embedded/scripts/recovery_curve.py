"""Recover one method on the embedded model and write its stages (held-out curves) as a JSON
line: how far a budget gets a method, without the suites.

    OMP_NUM_THREADS=1 python results/embedded/scripts/recovery_curve.py OUT.jsonl \
        gla cpu [field=value ...]

Same corpus, seed and code path as `linbench run` (linbench.recovery.stages.recover).
"""
import json
import sys
import time

from linbench import overrides, registry
from linbench.assets import models
from linbench.recovery import budget as budgets
from linbench.recovery import stages
from linbench.recovery.corpus import Corpus

out_path, name, budget = sys.argv[1], sys.argv[2], sys.argv[3]
chosen = overrides.resolve([name], [f"{name}.{s}" for s in sys.argv[4:]])[name]
b = budgets.parse(budget)
method = b.configure(registry.methods.get(name), chosen)  # as `linbench run` builds it
spec = models.resolve("smollm2-135m")
model, tok = models.load(spec, "float32", "cpu")
corpus = Corpus("sharegpt", tokenizer=tok, seqlen=b.seqlen_for(method), seed=1234)
t0 = time.time()
model = stages.recover(method, method.linearize(model), corpus, b, seed=1234,
                       echo=lambda s: print(s, flush=True))
row = {"method": name, "overrides": chosen, "budget": budget, "budget_identity": b.identity(),
       "lora_lr": method.config.lora_lr,
       "calibration": model.config.linbench.get("calibration"),
       "stages": stages.stages_of(model), "seconds": round(time.time() - t0, 1)}
print(json.dumps(row), flush=True)
with open(out_path, "a") as f:
    f.write(json.dumps(row) + "\n")
