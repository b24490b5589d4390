"""Peak memory and time of one attention-transfer step of METHOD on the embedded
SmolLM2-135M, as recovery runs it (base frozen, every layer in its transfer mode):

    OMP_NUM_THREADS=1 python results/embedded/scripts/transfer_memory.py hedgehog 1024

Prints the loss, the gradient norm of the new parameters (equal before and after a
memory change means the same step) and the process's resident high-water mark over the
loaded model (VmHWM - VmRSS at start, /proc/self/status). Run it alone: a second large
process on the machine can get either one killed.
"""
import sys
import time

import torch

from linbench import registry
from linbench.assets.models import load, resolve
from linbench.methods.attention import linearized_layers

torch.set_num_threads(1)
name, T = sys.argv[1], int(sys.argv[2])
method = registry.methods.get(name)()
model = method.linearize(load(resolve("smollm2-135m"), "float32", "cpu")[0])
layers = linearized_layers(model)
new = {id(p) for layer in layers for p in layer.new_parameters()}
for p in model.parameters():
    p.requires_grad_(id(p) in new)
for layer in layers:
    layer.transfer = method.config.transfer
torch.manual_seed(0)
ids = torch.randint(0, 1000, (1, T))


def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


start, t0 = status("VmRSS"), time.time()
model(ids)
loss = sum(layer.transfer_loss for layer in layers) / len(layers)
loss.backward()
grad = torch.cat([p.grad.flatten() for layer in layers for p in layer.new_parameters()
                  if p.grad is not None])
print(f"{name} T={T}: loss {loss.item():.6f}, grad norm {grad.norm().item():.6f}, "
      f"peak {(status('VmHWM') - start) / 2**30:.2f} GiB over the loaded model, "
      f"{time.time() - t0:.1f} s")
