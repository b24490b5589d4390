"""Per-layer RMS of the softmax teacher's per-head outputs (before o_proj) vs the RMS a
freshly linearized layer with an identity-initialized RMSNorm emits, on one held-out
ShareGPT sequence: why gla / deltanet / lightning start 1.2-37x too loud.

    OMP_NUM_THREADS=1 python results/embedded/scripts/teacher_rms.py [method]   # default deltanet
"""
import sys

import torch

from linbench import registry
from linbench.assets import models
from linbench.recovery.corpus import Corpus
from linbench.methods.attention import linearized_layers, softmax_attention

name = sys.argv[1] if len(sys.argv) > 1 else "deltanet"
spec = models.resolve("smollm2-135m")
model, tok = models.load(spec, "float32", "cpu")
model = registry.methods.get(name)().linearize(model)
x = Corpus("sharegpt", tokenizer=tok, seqlen=1024, seed=1234).packed("val", 1)
teacher, student = [], []


def hook(mod, args, kwargs, out):
    h = mod.heads_from(args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])
    teacher.append(softmax_attention(h.q, h.k, h.v, mod.scaling).pow(2).mean().sqrt().item())
    student.append(mod._post(mod.mixer(h, None, False)[0], h.x).pow(2).mean().sqrt().item())


for layer in linearized_layers(model):
    layer.transfer = "mse"  # pass the teacher downstream: every layer sees the original states
    layer.register_forward_hook(hook, with_kwargs=True)
with torch.no_grad():
    model.model(input_ids=x)
print("teacher RMS by layer:", [round(v, 3) for v in teacher])
print("student RMS by layer:", [round(v, 3) for v in student])
print(f"teacher mean {sum(teacher) / len(teacher):.3f}; ratio student/teacher "
      f"{min(s / t for s, t in zip(student, teacher)):.1f}..{max(s / t for s, t in zip(student, teacher)):.1f}")
