"""How much of a hybrid layer's attention stays inside its window at the recall prompts:
the diagnostic behind lolcats' in-window needle misses (methods/README.md, lolcats).

For each recovered checkpoint given (a directory saved by linbench: a recovery's
`<cache>/checkpoints/<key>/model`) and each recall needle prompt at depth 1 (the needle
inside the last 64 tokens; lengths 256..4096, the suite's seed and sample 0), at the last
prompt token of every HybridWindow layer:

  teacher  M = share of softmax(q.k / sqrt(d)) over all earlier keys that falls on the
               window (the layer's own q, k: what exact attention would put there)
  hybrid   S = gamma E / (gamma E + L), E = sum over the window of exp(s - max),
               L = sum over older keys of phi(q).phi(k): the window's share of the hybrid's
               one shared normalizer

averaged over heads and layers, and over the "window heads" (teacher share M > 0.9).
A hybrid that keeps what its window holds has S close to M on those heads.

    OMP_NUM_THREADS=1 python results/embedded/scripts/window_share.py CKPT [CKPT ...]

CKPT is printed by the run that reuses it: `linbench run --methods lolcats --suite ppl
--limit 50 --budget cpu` says "reusing recovered checkpoint CKPT" (the run that trains it
says "recovering ... in DIR"; then CKPT is DIR/model).
"""
import sys

import torch

import linbench  # noqa: F401  (registers the Auto classes of linearized checkpoints)
from linbench.assets import models
from linbench.methods.mixers import HybridWindow
from linbench.suites.recall import needle_prompt

torch.set_num_threads(1)
LENGTHS, SEED = (256, 512, 1024, 2048, 4096), 1234


def shares(model, ids):
    """[(M, S) per (layer, head)] at the last token of ids."""
    out = []

    def hook(mixer, args):
        h = args[0]
        q, k = h.q[0, -1].float(), h.k[0].float()  # (H, D), (T, H, D)
        W, T = mixer.window, k.shape[0]
        if T <= W:
            return
        scale = q.shape[-1] ** -0.5 if mixer.scale is None else mixer.scale
        s = torch.einsum("hd,thd->ht", q * scale, k)  # (H, T)
        teacher = s.softmax(-1)[:, -W:].sum(-1)
        e = torch.exp(s[:, -W:] - s[:, -W:].amax(-1, keepdim=True)).sum(-1)
        fq, fk = mixer.fq(h.q[:, -1:]).float()[0, 0], mixer.fk(h.k).float()[0]  # (H, F), (T, H, F)
        lin = torch.einsum("hf,thf->h", fq, fk[:-W])
        g = mixer.gamma().float() * e
        out.extend(zip(teacher.tolist(), (g / (g + lin)).tolist()))

    hooks = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, HybridWindow)]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for handle in hooks:
        handle.remove()
    return out


def main(ckpts):
    from transformers import AutoModelForCausalLM
    tokenizer = models.load_tokenizer("smollm2-135m")
    print("checkpoint | length | distance | M all | S all | window heads | M | S")
    for ckpt in ckpts:
        model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
        for length in LENGTHS:
            p = needle_prompt(tokenizer, SEED, length, 1.0, 0)
            pairs = torch.tensor(shares(model, p.ids))  # (layers * heads, 2)
            top = pairs[pairs[:, 0] > 0.9]
            m_top, s_top = (top.mean(0).tolist() if len(top) else (float("nan"),) * 2)
            print(f"{ckpt} | {len(p.ids)} | {p.distance} | {pairs[:, 0].mean():.3f} | "
                  f"{pairs[:, 1].mean():.3f} | {len(top)}/{len(pairs)} | {m_top:.3f} | {s_top:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
