"""CPU seconds per MMLU question with and without prefix reuse, one thread, on the
embedded SmolLM2-135M (METHOD linearized without recovery: the timing, not the scores):

    OMP_NUM_THREADS=1 python results/embedded/scripts/prefix_speed.py softmax 5 1   # reuse on
    OMP_NUM_THREADS=1 python results/embedded/scripts/prefix_speed.py softmax 5 0   # lm-eval's path

Arguments: METHOD, --limit (questions per subject), REUSE (1 | 0). Eight subjects; prints
CPU and wall seconds per question, and every question's log-likelihoods (`lls`) so the two
runs can be compared.
"""
import json
import sys
import time

import torch

from linbench import registry
from linbench.assets.models import load, resolve
from linbench.suites.base import RunContext
from linbench.suites.mmlu5 import MMLU5

torch.set_num_threads(1)
method, limit, reuse = sys.argv[1], int(sys.argv[2]), bool(int(sys.argv[3]))
SUBJECTS = ["anatomy", "astronomy", "college_biology", "high_school_us_history",
            "marketing", "moral_scenarios", "philosophy", "virology"]
model, tok = load(resolve("smollm2-135m"), "float32", "cpu")
model = registry.methods.get(method)().linearize(model)
ctx = RunContext(limit=limit, batch_size=1, progress=False, prefix_reuse=reuse)
wall, cpu = time.perf_counter(), time.process_time()
questions = MMLU5(subjects=SUBJECTS).evaluate(model, tok, ctx)
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
print(json.dumps({"method": method, "limit": limit, "reuse": reuse, "questions": len(questions),
                  "cpu_s_per_q": round(cpu / len(questions), 3),
                  "wall_s_per_q": round(wall / len(questions), 3),
                  "lls": [q.loglikelihoods for q in questions]}))
