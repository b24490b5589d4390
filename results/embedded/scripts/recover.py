"""Recover methods into the checkpoint cache exactly as `linbench run` does before its suites
(runner._recovered), so later suite runs reuse the checkpoints. Two of these ran side by side:

    OMP_NUM_THREADS=1 python recover.py lolcats,hedgehog,gla transfer=32768,lora=16384,val=2048,eval=8192
    OMP_NUM_THREADS=1 python recover.py liger,deltanet,lightning transfer=32768,lora=16384,val=2048,eval=8192

Each prints the recovery stages (tokens, seconds, held-out ppl before/after)."""
import sys, time
from linbench.assets import models
from linbench import run as runner
from linbench.records.store import Store
from linbench.suites.base import RunContext

methods = sys.argv[1].split(",")
ctx = RunContext(limit=1, batch_size=1, seed=1234, device="cpu", dtype="float32", progress=False)
plan = runner.RunPlan("smollm2-135m", methods, ["mmlu5"], ctx, "results", budget=sys.argv[2])
spec = models.resolve(plan.model)
for job in runner.plan_jobs(plan, spec, Store(plan.results_dir)):
    t0 = time.time()
    model, _ = runner._recovered(job, spec, plan, echo=lambda s: print(s, flush=True))
    print(f"{job.method}: {time.time() - t0:.0f} s", runner._stages_of(model), flush=True)
