"""Recovery token budgets: how many tokens each stage trains on, and how it is checked.

    smoke                      seconds on a tiny model (a few steps at seqlen 128)
    cpu                        ~10 min per method on SmolLM2-135M on a 2-core CPU
    paper                      the papers' budgets (LoLCATs: 20M + 20M tokens; GPUs)
    50000 | 2M | 0.02B         both stages get this many tokens (k = 1e3, M = 1e6, B = 1e9)
    transfer=1M,lora=2M        per stage; also distill= (the optional distillation
                               stage; default: as many as lora), val=, eval=, batch=,
                               micro=, seqlen=, patience=, save=, lora_lr= (the LoRA
                               learning rate of every method; 0: each method's own)
    cpu,lora=0                 a preset, then overrides

Numbers are decimal (token budgets are quoted that way in the papers). A stage with 0
tokens is skipped. Fields missing from a bare token form come from the `cpu` preset.

The `quick` and `cpu` presets set the LoRA learning rate of every method to 1e-3: the
papers' 1e-4 (LoLCATs and most others) is tuned for ~20M tokens, and at the presets' 8
and 72 steps it leaves recovery far from converged (at `cpu`, lr 1e-3 gave 0.76-0.89x
the perplexity of 1e-4 for lolcats, lightning and deltanet, more than doubling the
tokens did). `paper` keeps each method's own. A `--set METHOD.lora_lr=...` wins over
the budget's; the effective lr is in each record's method config.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from linbench.errors import LinbenchError
from linbench.units import parse_count

FORMS = ("smoke", "quick", "cpu", "paper", "a token count like 50000 or 2M",
         "key=value pairs like transfer=1M,lora=2M (keys: transfer, lora, distill, val, eval, "
         "batch, micro, seqlen, patience, save, lora_lr)")


@dataclass(frozen=True)
class Budget:
    transfer_tokens: int           # stage 1 (attention transfer) training tokens
    lora_tokens: int               # stage 2 (LoRA) training tokens
    val_tokens: int                # held-out tokens per validation evaluation
    eval_every: int = 0            # training tokens between evaluations; 0 = an eighth of the stage
    batch_size: int = 1            # sequences per optimizer step
    micro_batch: int = 0           # sequences per forward (gradient accumulation); 0 = batch_size
    seqlen: int | None = None      # overrides the method's packed sequence length
    patience: int = 3              # evaluations without improvement before early stopping
    save_every: int = 25           # optimizer steps between resumable training-state saves
    # the optional distillation stage (a method's `distill` field); None: lora_tokens
    distill_tokens: int | None = None
    # the LoRA learning rate given to every recovering method (its config's lora_lr, unless
    # --set names one); None: each method's own
    lora_lr: float | None = None
    name: str = "custom"

    def identity(self) -> dict:
        """What changes the result (enters the checkpoint and record hashes). lora_lr is
        not here: it enters through the method configs it sets (`configure`)."""
        d = dataclasses.asdict(self)
        for k in ("name", "save_every", "lora_lr"):
            d.pop(k)
        if d["distill_tokens"] is None:  # budgets from before the stage hash as they did
            d.pop("distill_tokens")
        return d

    def stage_tokens(self, stage: str) -> int:
        distill = self.lora_tokens if self.distill_tokens is None else self.distill_tokens
        return {"transfer": self.transfer_tokens, "distill": distill, "lora": self.lora_tokens}[stage]

    def seqlen_for(self, method) -> int:
        return self.seqlen or getattr(method.config, "seqlen", 1024)

    def steps(self, stage: str, seqlen: int) -> int:
        """Optimizer steps for a stage: at least one when the stage has any tokens."""
        tokens = self.stage_tokens(stage)
        return 0 if tokens <= 0 else max(1, tokens // (self.batch_size * seqlen))

    def eval_steps(self, stage: str, seqlen: int) -> int:
        total = self.steps(stage, seqlen)
        if self.eval_every:
            return max(1, self.eval_every // (self.batch_size * seqlen))
        return max(1, round(total / 8))

    def micro(self) -> int:
        return self.micro_batch or self.batch_size

    def configure(self, cls, chosen: dict | None = None):
        """Method class `cls` as a recovery at this budget builds it: its defaults, then the
        fields this budget sets when the method recovers (the CPU presets' LoRA lr), then
        `chosen` (--set values, which win). The config is what recovery trains and what
        the checkpoint and record hashes see, so every caller builds methods here."""
        chosen = dict(chosen or {})
        method = cls(**chosen)
        if self.lora_lr is None or not method.needs_recovery() or \
                "lora_lr" not in {f.name for f in dataclasses.fields(cls.config_cls)}:
            return method
        return cls(**{"lora_lr": self.lora_lr, **chosen})


# LoRA lr of the CPU presets (see the module docstring)
CPU_LORA_LR = 1e-3
# smoke: a handful of steps (tests). quick: the README's first command, a couple of
# minutes per method on 2 cores (16 transfer + 8 LoRA steps of 1 x 1024). cpu: ~10 min per method on an idle 2-core CPU with the
# embedded SmolLM2-135M in fp32 at 1 x 1024: 120 transfer steps at ~490 tokens/s (~4.2 min)
# + 72 LoRA steps at ~300 tokens/s (~4.1 min) + 18 evaluations of 4 held-out sequences
# (~1.5 min). Measured on a shared, loaded CPU (1 thread): 98 and 63 tokens/s; with two
# recoveries side by side at 1 thread each, 13 s per lolcats transfer step and 38 s per
# liger LoRA step -- there `cpu` takes ~45 min per method, so pass a token budget instead.
# paper: LoLCATs (arXiv 2410.10254, reference configs): 1024-token packed sequences,
# batch 1 x 8 gradient accumulation, eval every 100 steps, best weights kept; ~20M tokens
# per stage (0.04B in total). Liger (arXiv 2503.01496): ~0.02B tokens of LoRA.
PRESETS = {
    "smoke": Budget(transfer_tokens=512, lora_tokens=512, val_tokens=256, eval_every=256,
                    batch_size=1, seqlen=128, patience=2, save_every=2, name="smoke"),
    "quick": Budget(transfer_tokens=16_384, lora_tokens=8_192, val_tokens=2048, eval_every=4096,
                    batch_size=1, seqlen=None, patience=3, save_every=8, lora_lr=CPU_LORA_LR,
                    name="quick"),
    "cpu": Budget(transfer_tokens=122_880, lora_tokens=73_728, val_tokens=4096, eval_every=0,
                  batch_size=1, seqlen=None, patience=3, save_every=16, lora_lr=CPU_LORA_LR,
                  name="cpu"),
    "paper": Budget(transfer_tokens=20_000_000, lora_tokens=20_000_000, val_tokens=262_144,
                    eval_every=819_200, batch_size=8, micro_batch=1, seqlen=None, patience=5,
                    save_every=100, name="paper"),
}

_KEYS = {"transfer": "transfer_tokens", "lora": "lora_tokens", "distill": "distill_tokens",
         "val": "val_tokens",
         "eval": "eval_every", "batch": "batch_size", "micro": "micro_batch", "seqlen": "seqlen",
         "patience": "patience", "save": "save_every"}


def parse(text: str | Budget) -> Budget:
    """`smoke|quick|cpu|paper`, a token count, or `key=value,...` -> Budget (LinbenchError if bad)."""
    if isinstance(text, Budget):
        return text
    spec = str(text).strip()
    items = [s.strip() for s in spec.split(",")]
    if not spec or not all(items):
        raise _bad(spec)
    base, rest = PRESETS["cpu"], items
    if items[0].lower() in PRESETS:
        base, rest = PRESETS[items[0].lower()], items[1:]
    changes: dict = {}
    for item in rest:
        key, eq, value = item.partition("=")
        try:
            if not eq:
                changes["transfer_tokens"] = changes["lora_tokens"] = parse_count(key)
            elif key.strip().lower() == "lora_lr":
                lr = float(value)
                if not lr >= 0 or lr == float("inf"):
                    raise ValueError(item)
                changes["lora_lr"] = lr or None  # 0: each method's own
            elif key.strip().lower() in _KEYS:
                changes[_KEYS[key.strip().lower()]] = parse_count(value)
            else:
                raise ValueError(item)
        except ValueError:
            raise _bad(spec) from None
    if changes.get("seqlen") == 0:
        changes["seqlen"] = None  # seqlen=0: the method's own
    if changes:
        base = dataclasses.replace(base, name=spec, **changes)
    b = base
    if b.batch_size < 1 or (b.seqlen is not None and b.seqlen < 2) or b.val_tokens < 1 \
            or b.patience < 1 or b.save_every < 1 or (b.micro_batch and b.batch_size % b.micro_batch):
        raise LinbenchError(f"budget {spec!r}: needs batch >= 1, seqlen >= 2, val >= 1, "
                            f"patience >= 1, save >= 1 and micro dividing batch")
    return base


def _bad(spec: str) -> LinbenchError:
    return LinbenchError(f"unknown budget {spec!r} (valid forms: {'; '.join(FORMS)})")
