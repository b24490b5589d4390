"""Peak memory of one fwd+bwd call of a method's kernel-level mixer (what `linbench speed
--mode fwdbwd` times) at length T, bf16, B 1, H 8, D 64, optionally with another
autograd segment size (token-heads):

    OMP_NUM_THREADS=1 python results/embedded/scripts/stream_memory.py hedgehog 65536
    OMP_NUM_THREADS=1 python results/embedded/scripts/stream_memory.py hedgehog 131072

The slope between two lengths is the memory per token beyond the inputs (the inputs are
allocated before the start mark); the floor is 5 kB/token in bf16 (input gradients,
output, output gradient). Resident high-water mark over the start (/proc/self/status).
"""
import sys
import time

import torch

import linbench.methods.mixers as M
from linbench.speed.targets import method_kernel_target

torch.set_num_threads(1)
name, T = sys.argv[1], int(sys.argv[2])
if len(sys.argv) > 3:
    M.STREAM_GRAD_TOKEN_HEADS = int(sys.argv[3])


def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


target = method_kernel_target(name, 1, 8, 64, torch.bfloat16, "cpu", "auto")
call, _ = target.prepare("fwdbwd", T)
start, t0 = status("VmRSS"), time.time()
call()
peak = status("VmHWM") - start
print(f"{name} T={T}: peak {peak / 2**30:.2f} GiB over the inputs ({peak / T / 1024:.1f} "
      f"kB/token), {time.time() - t0:.1f} s")
