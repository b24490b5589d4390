"""Per-token decode latency of METHOD at context T on the embedded model (unrecovered: the
timing, not the scores), and where a step's CPU time goes:

    OMP_NUM_THREADS=1 python results/embedded/scripts/decode_profile.py lolcats 1024 [profile]

Builds the cache exactly as `linbench speed --mode decode` does (speed.targets.model_target),
prints the median and minimum of 15 steps and, with `profile`, torch.profiler's table of
5 steps and the share of aten::mm (the linear layers) in them.
"""
import sys
import time

import torch

from linbench import registry
from linbench.assets import models
from linbench.speed.targets import model_target

torch.set_num_threads(1)
name, T = sys.argv[1], int(sys.argv[2])
model, _ = models.load(models.resolve("smollm2-135m"), "float32", "cpu")
method = registry.methods.get(name)()
model = method.linearize(model).eval()
step, _ = model_target(name, method, model, "cpu").prepare("decode", T)
for _ in range(3):
    step()
times = []
for _ in range(15):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
times.sort()
print(f"{name} T={T}: median {times[7] * 1e3:.1f} ms, min {times[0] * 1e3:.1f} ms per token")
if len(sys.argv) > 3:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key == "aten::mm")
    calls = sum(e.count for e in events if e.key == "aten::mm") // 5
    print(events.table(sort_by="self_cpu_time_total", row_limit=12))
    print(f"aten::mm: {100 * mm / total:.0f}% of self CPU time, {calls} calls per token")
