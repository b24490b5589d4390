"""Peak resident memory of attention transfer (stage 1) of lolcats on the embedded
SmolLM2-135M, joint (K=0) vs block-wise (transfer_blocks=K), above the loaded model.

    OMP_NUM_THREADS=1 python results/embedded/scripts/blockwise_memory.py K [BUDGET] [noppl]

BUDGET defaults to transfer=1024,lora=0,val=1024 (one step: peak memory per step does not
depend on the number of steps); `noppl` skips the held-out perplexity before and after the
stage (full-vocabulary logits), so the peak is stage 1's alone. A thread samples the RSS
(/proc/self/statm) every 5 ms: a high-water mark that includes memory the allocator keeps.
"""
import os
import sys
import tempfile
import threading
import time

import torch

from linbench import registry
from linbench.assets import models
from linbench.recovery import cache, stages

torch.set_num_threads(1)
K = int(sys.argv[1])
budget = next((a for a in sys.argv[2:] if a != "noppl"), "transfer=1024,lora=0,val=1024")
if "noppl" in sys.argv:
    stages._ppl = lambda *a, **k: None
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


method = registry.methods.get("lolcats")(transfer_blocks=K)
spec = models.resolve("smollm2-135m")
model, tok = models.load(spec)
model = method.linearize(model)
data = cache.corpus("sharegpt", 1024, 0)
data.tokenizer = tok
data.packed("train", 4), data.packed("val", 1)  # tokenized before measuring
base, peak, done = rss(), [0], threading.Event()


def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.005)


thread = threading.Thread(target=sample, daemon=True)
thread.start()
t0 = time.time()
with tempfile.TemporaryDirectory() as ckpt:
    model = stages.recover(method, model, data, budget, checkpoint_dir=ckpt)
done.set()
thread.join()
(stage,) = stages.stages_of(model)
print(f"K={K} peak above the loaded model {(peak[0] - base) / 2**20:.0f} MiB, "
      f"{time.time() - t0:.0f} s, steps {stage['steps']}, "
      f"cache {stage.get('cache_bytes', 0) / 2**20:.0f} MiB", flush=True)
