"""recall: in-context retrieval, the ability linear attention loses first.

- passkey (Mohtashami & Jaggi 2023, "Landmark Attention"): "The pass key is {k}. Remember
  it. {k} is the pass key." hidden at depth d (0 = right after the instruction, 1 = right
  before the question) in the repeated filler, prompt of about L tokens ending "What is
  the pass key? The pass key is"; a hit when the 5-digit key is in the greedy
  continuation (8 new tokens).
- needle (after RULER's single needle, Hsieh et al. 2024): "The special magic number of
  {city} is {n}." in natural filler (Wikipedia sentences), same grid, hit when the
  number is in the greedy continuation.
- kv (multi-query associative recall, Arora et al. 2023 "Zoology", in text): P lines
  "key: value" (made-up words, 3-4 digit values), then queries asked one at a time
  (earlier queries shown answered); a hit when the first number generated is the value.
- squad (Rajpurkar et al. 2016): "Title/Background/Question/Answer:" zero-shot; a hit
  when a gold answer is contained in the first line of the output (SQuAD-normalized).

Every cell records `in_window`: whether the needle's first token lies inside the model's
exact-attention window seen from the last prompt token (distance < window; window None =
full attention: always; 0 = no exact attention: never), from `model.config.linbench`.

Grid lengths above `config.max_position_embeddings` are dropped. `ctx.limit` = examples
per point (grid cell, pair count; squad questions); None uses the CPU-sized defaults
`samples=2` per cell / pair count and `squad_questions=50` (SmolLM2-135M on one busy CPU
core: ~140 prompt tokens/s, ~5 s for a 256-token prompt; the default grid is 40K prompt
tokens per sample per task, about 10 min per task at samples=2). Prompts are
seeded by (ctx.seed, task, cell, sample): a cell's prompts do not depend on the rest of
the grid. Each cell also records `in_window_frac`, mean prompt `tokens` and the first
sample's output (`example`); kv and squad cells carry the same fields.

Distributed (torch.distributed, N ranks): each task's prompts are shared out round-robin
(base.shared_map) and the outputs gathered; every prompt is decoded alone, so the record
is the one-process record.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from linbench.suites import text
from linbench.suites.base import Record, RunContext, Suite, accuracy, shared_map
from linbench.suites.generate import greedy_text
from linbench.suites.lmeval import binomial_metric

TASKS = ("passkey", "needle", "kv", "squad")
MAX_NEW = {"passkey": 8, "needle": 10, "kv": 6, "squad": 16}
PASSKEY = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
           "memorize it. I will quiz you about the important information there.\n\n",
           "The pass key is {answer}. Remember it. {answer} is the pass key.",
           "\n\nWhat is the pass key? The pass key is")
NEEDLE = ("Below are some paragraphs from an encyclopedia. One sentence among them states a "
          "special magic number. Memorize it: you will be asked about it.\n\n",
          "The special magic number of {subject} is {answer}.",
          "\n\nWhat is the special magic number of {subject}? "
          "The special magic number of {subject} is")
KV_HEADER = "Memorize the value of each key.\n\n"
KV_RECALL = "\n\nNow recall the values.\n"
SQUAD = "Title: {title}\nBackground: {context}\nQuestion: {question}\nAnswer:"


@dataclass
class Prompt:
    text: str
    ids: list[int]
    answer: str            # the string a correct output contains
    needle_tok: int | None  # index in ids of the needle's first token (None: not located)

    @property
    def distance(self) -> int | None:
        """Tokens from the last prompt token back to the needle's first token."""
        return None if self.needle_tok is None else len(self.ids) - 1 - self.needle_tok


def model_window(model) -> int | None:
    """The method's exact-attention window: None = full attention, 0 = none."""
    info = getattr(model.config, "linbench", None) or {}
    window = info.get("window") if isinstance(info, dict) else getattr(info, "window", None)
    return None if window is None else int(window)


def in_window(distance: int | None, window: int | None) -> bool | None:
    """Query i sees keys j in (i - window, i]: inside iff distance < window.

    None when the needle could not be located (a SQuAD answer not found verbatim) under
    a finite window; full attention (window None) sees everything.
    """
    if window is None:
        return True
    return None if distance is None else distance < window


def encode(tokenizer, prompt_text: str, needle_char: int | None) -> tuple[list[int], int | None]:
    """Token ids of the prompt, and the index of the token holding char `needle_char`."""
    if needle_char is None:
        return tokenizer(prompt_text).input_ids, None
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(prompt_text, return_offsets_mapping=True)
        for i, (a, b) in enumerate(enc["offset_mapping"]):
            if b > a and b > needle_char:
                return enc["input_ids"], i
        return enc["input_ids"], None
    ids = tokenizer(prompt_text).input_ids
    return ids, len(tokenizer(prompt_text[:needle_char].rstrip()).input_ids)


def haystack(tokenizer, parts: tuple[str, str, str], filler: Iterator[str],
             length: int, depth: float, answer: str, **fields) -> Prompt:
    """header + filler sentences with the needle at `depth` + question, ~`length` tokens.

    The filler fills the token budget left by header, needle and question; the last
    sentence is cut at a token boundary so the prompt lands within a few tokens of length.
    The needle goes between sentences, after round(depth * sentences) of them.
    """
    header, needle, question = (p.format(answer=answer, **fields) for p in parts)
    budget = length - len(tokenizer(header + needle + question).input_ids)
    units: list[str] = []
    used = 0
    for sentence in filler:
        ids = tokenizer(" " + sentence, add_special_tokens=False).input_ids
        if used + len(ids) <= budget:
            units.append(sentence)
            used += len(ids)
            continue
        if budget - used > 1:
            part = tokenizer.decode(ids[:budget - used]).strip()
            if part:
                units.append(part)
        break
    k = int(depth * len(units) + 0.5)
    before = header + " ".join(units[:k]) + (" " if k else "")
    body = " ".join([*units[:k], needle, *units[k:]])
    prompt_text = header + body + question
    ids, needle_tok = encode(tokenizer, prompt_text, len(before))
    return Prompt(prompt_text, ids, answer, needle_tok)


def passkey_prompt(tokenizer, seed: int, length: int, depth: float, sample: int) -> Prompt:
    rng = text.stable_rng(seed, "passkey", length, float(depth), sample)
    key = str(int(rng.integers(10000, 100000)))
    return haystack(tokenizer, PASSKEY, text.passkey_sentences(), length, depth, key)


def needle_prompt(tokenizer, seed: int, length: int, depth: float, sample: int) -> Prompt:
    rng = text.stable_rng(seed, "needle", length, float(depth), sample)
    subject = text.NEEDLE_SUBJECTS[int(rng.integers(len(text.NEEDLE_SUBJECTS)))]
    number = str(int(rng.integers(10000, 100000)))
    return haystack(tokenizer, NEEDLE, text.wiki_sentences(rng), length, depth, number,
                    subject=subject)


def kv_prompts(tokenizer, seed: int, pairs: int, sample: int, queries: int) -> list[Prompt]:
    """One prompt per query; the needle is the queried "key: value" line."""
    rng = text.stable_rng(seed, "kv", pairs, sample)
    keys = text.word_keys(rng, pairs)
    values = [str(v) for v in rng.choice(np.arange(100, 10000), size=pairs, replace=False)]
    lines = [f"{k}: {v}" for k, v in zip(keys, values)]
    head = KV_HEADER + "\n".join(lines) + KV_RECALL
    asked = [int(q) for q in rng.choice(pairs, size=min(queries, pairs), replace=False)]
    out = []
    for j, q in enumerate(asked):
        done = "".join(f"{lines[a]}\n" for a in asked[:j])
        needle_char = len(KV_HEADER) + sum(len(line) + 1 for line in lines[:q])
        ids, needle_tok = encode(tokenizer, head + done + f"{keys[q]}:", needle_char)
        out.append(Prompt(head + done + f"{keys[q]}:", ids, values[q], needle_tok))
    return out


def squad_prompt(tokenizer, q: text.SquadQuestion) -> Prompt:
    prompt_text = SQUAD.format(title=q.title, context=q.context, question=q.question)
    start = q.context.lower().find(q.answers[0].lower()) if q.answers else -1
    offset = prompt_text.index("\nBackground: ") + len("\nBackground: ")
    ids, needle_tok = encode(tokenizer, prompt_text, offset + start if start >= 0 else None)
    return Prompt(prompt_text, ids, "\t".join(q.answers), needle_tok)


def score(task: str, prompt: Prompt, output: str) -> bool:
    if task in ("passkey", "needle"):
        return prompt.answer in output
    if task == "kv":
        first = re.search(r"\d+", output)
        return first is not None and first.group() == prompt.answer
    line = output.strip().split("\n")[0]
    golds = [text.normalize_answer(a) for a in prompt.answer.split("\t")]
    return any(g and g in text.normalize_answer(line) for g in golds)


class Recall(Suite):
    """passkey, needle, kv and squad recall (see the module docstring).

    Options: `lengths` and `depths` (the passkey/needle grid), `pairs` (kv pair counts),
    `samples` (per grid cell / pair count when ctx.limit is None), `kv_queries` (queries
    per kv sample), `squad_questions` (when ctx.limit is None), `tasks` (a subset).
    """
    name = "recall"
    version = "1"
    order = 40
    heatmaps = ("passkey", "needle")
    # exact-match generation: no chance level
    metrics = tuple(accuracy(name) for name in (
        "passkey", "passkey_in_window", "passkey_out_window",
        "needle", "needle_in_window", "needle_out_window", "kv", "squad"))

    def __init__(self, lengths: Sequence[int] = (256, 512, 1024, 2048, 4096),
                 depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
                 pairs: Sequence[int] = (4, 8, 16, 32, 64), samples: int = 2,
                 kv_queries: int = 4, squad_questions: int = 50,
                 tasks: Sequence[str] = TASKS):
        unknown = set(tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown recall tasks {sorted(unknown)} (choose from {TASKS})")
        self.lengths = sorted(int(x) for x in lengths)
        self.depths = [float(d) for d in depths]
        self.pairs = sorted(int(p) for p in pairs)
        self.samples, self.kv_queries = int(samples), int(kv_queries)
        self.squad_questions = int(squad_questions)
        self.tasks = [t for t in TASKS if t in tasks]

    def per_point(self, ctx: RunContext) -> tuple[int, int]:
        """(samples per cell / pair count, squad questions)."""
        if ctx.limit is not None:
            return ctx.limit, ctx.limit
        return self.samples, self.squad_questions

    def config(self, ctx: RunContext) -> dict:
        samples, squad_n = self.per_point(ctx)
        return {"limit": ctx.limit, "seed": ctx.seed, "tasks": self.tasks,
                "lengths": self.lengths, "depths": self.depths, "pairs": self.pairs,
                "samples": samples, "kv_queries": self.kv_queries,
                "squad_questions": squad_n, "max_new_tokens": MAX_NEW}

    def grid_lengths(self, model) -> list[int]:
        cap = getattr(model.config, "max_position_embeddings", None)
        return [L for L in self.lengths if cap is None or L <= cap]

    def plan(self, model, tokenizer, ctx: RunContext) -> dict[str, list[tuple[dict, list[Prompt]]]]:
        """{task: [(point, its prompts)]} with point = the cell's coordinates."""
        samples, squad_n = self.per_point(ctx)
        make = {"passkey": passkey_prompt, "needle": needle_prompt}
        plan: dict[str, list] = {}
        for task in ("passkey", "needle"):
            if task in self.tasks:
                plan[task] = [({"length": L, "depth": d},
                               [make[task](tokenizer, ctx.seed, L, d, s) for s in range(samples)])
                              for L in self.grid_lengths(model) for d in self.depths]
        if "kv" in self.tasks:
            plan["kv"] = [({"pairs": P}, [p for s in range(samples) for p in
                                          kv_prompts(tokenizer, ctx.seed, P, s, self.kv_queries)])
                          for P in self.pairs]
        if "squad" in self.tasks:
            qs = text.squad_selection(ctx.seed, squad_n)
            plan["squad"] = [({}, [squad_prompt(tokenizer, q) for q in qs])]
        return plan

    def run(self, model, tokenizer, ctx: RunContext) -> list[Record]:
        from tqdm.auto import tqdm
        t0 = time.perf_counter()
        window = model_window(model)
        plan = self.plan(model, tokenizer, ctx)
        metrics, details = {}, {"window": window, "lengths": self.grid_lengths(model),
                                "depths": self.depths, "samples": self.per_point(ctx)[0]}
        items = {}  # per-prompt 0/1 outcomes of every metric, for paired tests
        was_training = model.training
        model.eval()
        try:
            for task, points in plan.items():
                # every prompt of the task, split across the ranks of a distributed run
                prompts = [p for _, ps in points for p in ps]
                outputs = shared_map(
                    lambda p: greedy_text(model, tokenizer, p.ids, MAX_NEW[task]), prompts,
                    lambda it: tqdm(it, desc=f"recall {task}", disable=not ctx.progress, leave=False))
                cells, hits, flags, ids = [], [], [], []
                for point, prompts in points:
                    outs, outputs = outputs[:len(prompts)], outputs[len(prompts):]
                    cell, got, inside = self._point(task, point, prompts, outs, window)
                    cells.append(cell)
                    hits += got
                    flags += inside
                    ids += self.item_ids(task, point, len(prompts), ctx)
                metrics[task] = binomial_metric(hits)
                items[task] = {"ids": ids, "values": [int(h) for h in hits]}
                if task in ("passkey", "needle"):
                    for suffix, want in (("in_window", True), ("out_window", False)):
                        sel = [h for h, f in zip(hits, flags) if f is want]
                        if sel:
                            metrics[f"{task}_{suffix}"] = binomial_metric(sel)
                            items[f"{task}_{suffix}"] = {
                                "ids": [i for i, f in zip(ids, flags) if f is want],
                                "values": [int(h) for h in sel]}
                details[task] = cells[0] if task == "squad" else cells
        finally:
            model.train(was_training)
        details["seconds"] = round(time.perf_counter() - t0, 2)
        details["items"] = items
        return [Record(self.name, metrics, details)]

    def item_ids(self, task: str, point: dict, n: int, ctx: RunContext) -> list[str]:
        """Stable ids of a grid point's `n` prompts, in plan order: passkey/needle
        "L<length>/d<depth>/s<sample>", kv "P<pairs>/s<sample>/q<query>", squad
        "squad/<question id>"."""
        if task in ("passkey", "needle"):
            return [f"L{point['length']}/d{point['depth']:g}/s{s}" for s in range(n)]
        if task == "kv":
            q = min(self.kv_queries, point["pairs"])
            return [f"P{point['pairs']}/s{j // q}/q{j % q}" for j in range(n)]
        qs = text.squad_selection(ctx.seed, self.per_point(ctx)[1])
        assert len(qs) == n, (len(qs), n)
        return [f"squad/{q.id}" for q in qs]

    @staticmethod
    def _point(task, point, prompts, outputs, window):
        """Score one grid point's generated outputs: (cell dict, 0/1 hits, in-window flags)."""
        got, inside = [], []
        for p, out in zip(prompts, outputs):
            got.append(float(score(task, p, out)))
            inside.append(in_window(p.distance, window))
        m = binomial_metric(got)
        known = [f for f in inside if f is not None]
        cell = {**point, "acc": m.value, "n": m.n,
                "in_window": all(known) if known else None,
                "in_window_frac": float(np.mean(known)) if known else None,
                "tokens": float(np.mean([len(p.ids) for p in prompts])) if prompts else 0.0,
                "example": outputs[0][:60] if outputs else ""}
        return cell, got, inside
