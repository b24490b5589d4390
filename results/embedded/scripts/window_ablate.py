"""Is it the linear part that loses lolcats' in-window needle? Greedy answers to the recall
suite's in-window needle prompts (depth 1, lengths 256..4096, its seed and sample 0) from a
recovered HybridWindow checkpoint with the linear part of chosen heads switched off
(their query features set to 0, so those heads are the window softmax alone):

  asis       nothing switched off (what the recall record scores)
  none       every head: the recovered model as a pure sliding-window model
  oracle:X   the heads whose exact softmax puts more than X of the last prompt token's
             attention inside the window (the teacher's choice, measured on this prompt)

    OMP_NUM_THREADS=1 python results/embedded/scripts/window_ablate.py CKPT asis none oracle:0.9

CKPT as in window_share.py (`<cache>/checkpoints/<key>/model`).
"""
import sys

import torch
from torch import nn

import linbench  # noqa: F401  (registers the Auto classes of linearized checkpoints)
from linbench.assets import models
from linbench.methods.mixers import HybridWindow
from linbench.suites.generate import greedy_text
from linbench.suites.recall import needle_prompt, score

torch.set_num_threads(1)
LENGTHS, SEED = (256, 512, 1024, 2048, 4096), 1234


class Gated(nn.Module):
    """A feature map whose output is zeroed on the heads where `keep` is False."""

    def __init__(self, f):
        super().__init__()
        self.f, self.keep = f, None

    def forward(self, x):
        y = self.f(x)
        return y if self.keep is None else y * self.keep.to(y.dtype)[:, None]


def window_heads(model, mixers, ids, threshold):
    """Per mixer, the heads whose softmax over all keys puts > threshold on the window."""
    found = {}

    def hook(mixer, args):
        q, k = args[0].q[0, -1].float(), args[0].k[0].float()
        s = torch.einsum("hd,thd->ht", q * q.shape[-1] ** -0.5, k)
        found[mixer] = s.softmax(-1)[:, -mixer.window:].sum(-1) > threshold

    hooks = [m.register_forward_pre_hook(hook) for m in mixers]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for handle in hooks:
        handle.remove()
    return found


def main(ckpt, modes):
    from transformers import AutoModelForCausalLM
    tokenizer = models.load_tokenizer("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    mixers = [m for m in model.modules() if isinstance(m, HybridWindow)]
    for m in mixers:
        m.fq = Gated(m.fq)
    print("mode | prompt tokens | needle distance | heads off | answer | output | hit")
    for mode in modes:
        hits = 0
        for length in LENGTHS:
            p = needle_prompt(tokenizer, SEED, length, 1.0, 0)
            off = {m: torch.zeros_like(m.gamma_logit, dtype=torch.bool) for m in mixers}
            if mode == "none":
                off = {m: torch.ones_like(v) for m, v in off.items()}
            elif mode.startswith("oracle:"):
                for m in mixers:  # the heads of the unchanged model
                    m.fq.keep = None
                off = window_heads(model, mixers, p.ids, float(mode.split(":")[1]))
            elif mode != "asis":
                sys.exit(f"window_ablate: unknown mode {mode!r}; valid: asis, none, oracle:X")
            for m in mixers:
                m.fq.keep = ~off[m]
            out = greedy_text(model, tokenizer, p.ids, 12)
            hit = score("needle", p, out)
            hits += hit
            n_off = sum(int(v.sum()) for v in off.values())
            print(f"{mode} | {len(p.ids)} | {p.distance} | {n_off}/{len(mixers) * len(off[mixers[0]])}"
                  f" | {p.answer} | {out.strip()[:24]!r} | {int(hit)}", flush=True)
        print(f"{mode}: {hits}/{len(LENGTHS)} in window")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["asis"])
