"""ppl: token-level perplexity on held-out text, and LAMBADA last-word accuracy.

- ppl_wiki: a fixed, seeded selection of Wikipedia lead paragraphs (suites/text.py),
  tokenized without special tokens, joined with the EOS token between documents, cut
  into non-overlapping windows of `context` tokens (the last window may be shorter);
  every token but the first of each window is scored. ppl = exp(total NLL / tokens).
- ppl_lambada: each LAMBADA passage (Paperno et al. 2016, OpenAI test split) scored on
  its own, every token but the first (the tokenizer's own special tokens included, as
  for any single text).
- lambada_acc: lm-eval's `lambada_openai` rule: the passage without its last word is the
  context, " " + last word the continuation (split off the tokenization of the whole
  passage); a hit when every continuation token is the argmax of its predictive
  distribution (greedy). Measured from the same forward pass as ppl_lambada.

Defaults (CPU sized): 200 Wikipedia documents (21K SmolLM2 tokens, 21 windows; all
10,033 are 1.05M tokens) and 200 LAMBADA passages (16K tokens); `ctx.limit` replaces
both counts (SmolLM2-135M scores ~140 tokens/s on one busy CPU core). Perplexities
carry stderr None (see the record schema), n = tokens evaluated; lambada_acc has a
binomial stderr.

Passages are batched with right padding and no attention mask: exact for any causal
mixer (softmax or linear), since no real token ever sees a pad.

Distributed (torch.distributed, N ranks): the batches are split across the ranks and
their per-token outcomes gathered (base.shared_map), then summed in batch order as in
one process: the same numbers.
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from linbench.suites.base import (Metric, MetricSpec, Record, RunContext, Suite, accuracy,
                                   shared_map)
from linbench.suites.lmeval import binomial_metric
from linbench.suites import text

LOGIT_BUDGET = 1 << 26  # fp32 logits materialized at once (256 MiB)


@torch.no_grad()
def score_tokens(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL and greedy hits of a batch: ids (B, T) -> nll, hit (B, T-1).

    nll[b, t] = -log p(ids[b, t+1] | ids[b, :t+1]) in fp32; hit[b, t] is True when that
    token is the argmax. The LM head runs in row chunks so that (B, T, vocab) logits are
    never materialized at once.
    """
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state  # (B, T, D)
    head = model.get_output_embeddings()
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(T-1), D)
    targets = ids[:, 1:].reshape(-1)                   # (B*(T-1),)
    step = max(1, LOGIT_BUDGET // head.weight.shape[0])
    nll, hit = [], []
    for s in range(0, h.shape[0], step):
        logits = head(h[s:s + step]).float()           # (rows, V)
        t = targets[s:s + step]
        nll.append(F.cross_entropy(logits, t, reduction="none"))
        hit.append(logits.argmax(-1) == t)
    shape = (ids.shape[0], ids.shape[1] - 1)
    return torch.cat(nll).view(shape), torch.cat(hit).view(shape)


def wiki_windows(tokenizer, docs: Sequence[str], context: int, owners: bool = False):
    """Documents joined by EOS into one stream, cut into windows of `context` tokens.

    owners=True: (windows, owners), owners[k][t] the index in `docs` of the document that
    token t of window k belongs to (a separator belongs to the document after it).
    """
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else \
        tokenizer("\n\n", add_special_tokens=False).input_ids
    stream: list[int] = []
    owner: list[int] = []
    for i, ids in enumerate(tokenizer(list(docs), add_special_tokens=False).input_ids):
        piece = (sep if i else []) + ids
        stream += piece
        owner += [i] * len(piece)
    starts = [s for s in range(0, len(stream), context) if len(stream) - s >= 2]
    windows = [stream[s:s + context] for s in starts]
    return (windows, [owner[s:s + context] for s in starts]) if owners else windows


def wiki_doc_ids(docs: Sequence[str]) -> list[str]:
    """Stable ids of Wikipedia lead paragraphs: "wiki/<article title>" (leads are unique)."""
    title = {lead: t for t, lead in text.wiki_articles()}
    return [f"wiki/{title[d]}" for d in docs]


def lambada_doc_ids(seed: int, n: int | None) -> list[str]:
    """Stable ids of text.lambada_selection(seed, n): "lambada/<index in the test split>"
    (the same seeded permutation; the split holds duplicate passages, so not by text)."""
    data = text.lambada()
    order = text.stable_rng(seed, "lambada").permutation(len(data))
    return [f"lambada/{i}" for i in order[: n if n is not None else len(data)]]


def lambada_ids(tokenizer, passage: text.LambadaPassage) -> tuple[list[int], int]:
    """(token ids of the whole passage, number of context tokens before the target)."""
    whole = tokenizer(passage.text).input_ids
    ctx = tokenizer(passage.context).input_ids
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        return whole, len(ctx)
    # the tokenizer merged across the boundary: encode the continuation on its own
    cont = tokenizer(" " + passage.target, add_special_tokens=False).input_ids
    return ctx + cont, len(ctx)


def _batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _pad_right(rows: Sequence[Sequence[int]], pad: int, device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [pad] * (width - len(r)) for r in rows], device=device)


class Perplexity(Suite):
    """Perplexity on Wikipedia and LAMBADA, and LAMBADA last-word accuracy.

    Options: `context` (window length in tokens, default 1024), `wiki_docs` and
    `lambada_docs` (documents scored when ctx.limit is None; defaults 200 each).
    """
    name = "ppl"
    version = "1"
    order = 30
    _PPL_NOTE = ("perplexity is lower-is-better: its column beside {parent} is the ratio "
                 "ppl / {parent} ppl, not a percentage")
    metrics = (MetricSpec("ppl_wiki", higher_is_better=False, kind="perplexity", note=_PPL_NOTE),
               MetricSpec("ppl_lambada", higher_is_better=False, kind="perplexity",
                          note=_PPL_NOTE),
               accuracy("lambada_acc"))  # open-ended last word: no chance level

    def __init__(self, context: int = 1024, wiki_docs: int = 200, lambada_docs: int = 200):
        self.context = int(context)
        self.wiki_docs = int(wiki_docs)
        self.lambada_docs = int(lambada_docs)

    def counts(self, ctx: RunContext) -> tuple[int, int]:
        if ctx.limit is not None:
            return ctx.limit, ctx.limit
        return self.wiki_docs, self.lambada_docs

    def config(self, ctx: RunContext) -> dict:
        wiki, lamb = self.counts(ctx)
        return {"limit": ctx.limit, "seed": ctx.seed, "context": self.context,
                "wiki_docs": wiki, "lambada_docs": lamb}

    def wiki(self, model, tokenizer, ctx: RunContext) -> tuple[float, int, int, dict]:
        """(total NLL, tokens scored, windows, per-document items) over the held-out
        Wikipedia windows; items: {"ids", "nll": summed NLL, "tokens": tokens scored}, each
        scored token counted for the document it belongs to."""
        docs = text.wiki_selection(ctx.seed, self.counts(ctx)[0])
        windows, owners = wiki_windows(tokenizer, docs, self.context, owners=True)
        groups: dict[int, list] = {}
        for k, w in enumerate(windows):  # full windows batch together; a short last one alone
            groups.setdefault(len(w), []).append(k)
        batches = [b for g in groups.values() for b in _batches(g, ctx.batch_size)]
        total, count = 0.0, 0
        doc_nll, doc_tok = np.zeros(len(docs)), np.zeros(len(docs), dtype=np.int64)

        def score(batch):
            ids = torch.tensor([windows[k] for k in batch], device=model.device)
            return score_tokens(model, ids)[0].double().cpu()
        scored = shared_map(score, batches, lambda it: _progress(it, ctx, "ppl wiki"))
        for batch, nll in zip(batches, scored):  # in batch order: one-process sums
            total += nll.sum().item()
            count += nll.numel()
            for row, k in enumerate(batch):  # token t+1 of the window is scored at t
                who = np.asarray(owners[k][1:])
                doc_nll += np.bincount(who, weights=nll[row].cpu().numpy(), minlength=len(docs))
                doc_tok += np.bincount(who, minlength=len(docs))
        items = {"ids": wiki_doc_ids(docs), "nll": doc_nll.tolist(),
                 "tokens": [int(t) for t in doc_tok]}
        return total, count, len(windows), items

    def lambada(self, model, tokenizer, ctx: RunContext
                ) -> tuple[float, int, list[float], list[float], list[int]]:
        """(total NLL, tokens scored, per-passage 0/1 last-word hits, per-passage summed
        NLL, per-passage tokens scored)."""
        passages = text.lambada_selection(ctx.seed, self.counts(ctx)[1])
        encoded = [lambada_ids(tokenizer, p) for p in passages]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # less padding
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        hits = [0.0] * len(encoded)
        doc_nll, doc_tok = [0.0] * len(encoded), [0] * len(encoded)
        total, count = 0.0, 0
        batches = _batches(order, ctx.batch_size)

        def score(idx):
            batch = _pad_right([encoded[i][0] for i in idx], pad, model.device)  # (B, T)
            return tuple(t.cpu() for t in score_tokens(model, batch))
        scored = shared_map(score, batches, lambda it: _progress(it, ctx, "ppl lambada"))
        for idx, (nll, hit) in zip(batches, scored):
            for row, i in enumerate(idx):
                ids, n_ctx = encoded[i]
                doc_nll[i] = nll[row, :len(ids) - 1].double().sum().item()
                doc_tok[i] = len(ids) - 1
                total += doc_nll[i]
                count += len(ids) - 1
                hits[i] = float(bool(hit[row, n_ctx - 1:len(ids) - 1].all()))
        return total, count, hits, doc_nll, doc_tok

    def run(self, model, tokenizer, ctx: RunContext) -> list[Record]:
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            w_nll, w_tok, w_windows, w_items = self.wiki(model, tokenizer, ctx)
            l_nll, l_tok, hits, l_doc_nll, l_doc_tok = self.lambada(model, tokenizer, ctx)
        finally:
            model.train(was_training)
        metrics = {
            "ppl_wiki": Metric(_exp_mean(w_nll, w_tok), None, w_tok),
            "ppl_lambada": Metric(_exp_mean(l_nll, l_tok), None, l_tok),
            "lambada_acc": binomial_metric(hits),
        }
        wiki_docs, lambada_docs = self.counts(ctx)
        l_ids = lambada_doc_ids(ctx.seed, lambada_docs)
        # per-item outcomes for paired tests: perplexities per document (summed NLL and
        # tokens scored: ppl = exp(sum nll / sum tokens)), lambada_acc per passage
        items = {"ppl_wiki": w_items,
                 "ppl_lambada": {"ids": l_ids, "nll": l_doc_nll, "tokens": l_doc_tok},
                 "lambada_acc": {"ids": l_ids, "values": [int(h) for h in hits]}}
        details = {
            "context": self.context,
            "wiki": {"docs": wiki_docs, "windows": w_windows, "tokens": w_tok,
                     "nll": w_nll / max(w_tok, 1)},
            "lambada": {"passages": len(hits), "tokens": l_tok, "nll": l_nll / max(l_tok, 1)},
            "seconds": round(time.perf_counter() - t0, 2),
            "items": items,
        }
        return [Record(self.name, metrics, details)]


def _exp_mean(total: float, count: int) -> float:
    return math.exp(total / count) if count else float("nan")


def _progress(items, ctx: RunContext, desc: str):
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, disable=not ctx.progress, leave=False)
