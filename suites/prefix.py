"""Prefix-state reuse: lm-eval's HFLM, with every shared prompt prefix computed once.

Few-shot prompts repeat themselves: every 5-shot MMLU question of a subject starts with
the same description and five answered dev questions (~600 tokens of a ~700-token
input), and the choices of one question share its whole context. `PrefixReuseLM` is an
lm-eval `HFLM` (lm-eval still builds and tokenizes every request) whose
`_loglikelihood_tokens` works on the very `(context_enc, continuation_enc)` token ids HFLM
produced:

    input = (context_enc + continuation_enc)[:-1]        # HFLM's model input
    distinct inputs, sorted -> groups sharing a prefix   # `plan_groups`
    per group: run the prefix once (use_cache=True), then for each batch of suffixes a
    copy of its cache (KV cache for softmax, recurrent state + window for linearized
    layers), expanded to the batch, and only the suffix tokens

and scores each request as HFLM does: the log-softmax at the last len(continuation)
positions, summed at the continuation ids, and whether each is the argmax.

Exactness is up to floating-point order (the same sums split at another place). Checked
once per LM on the first shared group (reuse against one plain forward of the same
input); a model whose cache cannot be copied or continued, or that fails the check,
falls back to HFLM's own path with a warning saying why. Requests HFLM would truncate on
the left (longer than max_length + 1 tokens) always take HFLM's path.

`prefix_reuse=False` is HFLM's path unchanged (the slow, obvious twin).

Distributed (torch.distributed initialized, N > 1 ranks; suites.base.world): lm-eval
still builds every request on every rank, but each rank runs only its share of the model
calls and the answers are exchanged (all_gather_object), so every rank returns the whole
list. The units shared out are the batches one process would run, formed exactly as one
process forms them: prefix reuse's (group, batch of suffixes) in plan order, HFLM's own
batches (`hflm_batches`, lm-eval's Collator order) on the plain path; each rank takes a
contiguous run of about equal padded tokens (base.contiguous_shares) and computes a
group's prefix again when the group's batches straddle two ranks (the same forward).
Every request is computed in the same batch with the same padding as in one process:
the same floats. One process, or HFLM's automatic batch size (batches sized while
running): unchanged code, every request on this process.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from linbench.errors import LinbenchError
from linbench.suites.base import contiguous_shares, gather_indexed, world

log = logging.getLogger(__name__)

MIN_PREFIX = 16     # tokens: a shorter shared prefix does not pay for a cache copy
MAX_DEPTH = 200     # plan_groups' recursion: deeper nests are grouped at their top level


class _Fallback(Exception):
    """Reuse cannot be trusted for this model: score everything on HFLM's path."""


@dataclass
class Item:
    """One distinct model input and the requests scored on it."""
    tokens: tuple[int, ...]     # (context_enc + continuation_enc)[:-1]
    span: int = 0               # longest continuation scored on it (its last positions)
    requests: list[int] = field(default_factory=list)


def common_prefix(a, b) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    diff = np.asarray(a[:n]) != np.asarray(b[:n])
    return int(diff.argmax()) if diff.any() else n


def plan_groups(items: list[Item], min_prefix: int = MIN_PREFIX) -> list[tuple[list[int], int]]:
    """Partition items into groups that share a prefix: [(item indices, prefix length)].

    Inputs are sorted, so each group is a run of neighbours and its prefix the smallest
    common prefix of neighbours in the run (capped so every scored position stays in the
    suffix). A run is split where that minimum occurs when its parts together save more
    recomputed tokens, (members - 1) * prefix, than the whole; prefixes shorter than
    `min_prefix` are not shared (prefix length 0: the input runs whole).
    """
    order = sorted(range(len(items)), key=lambda i: items[i].tokens)
    caps = [len(items[i].tokens) - items[i].span for i in order]
    e = [min(common_prefix(items[a].tokens, items[b].tokens), caps[j], caps[j + 1])
         for j, (a, b) in enumerate(zip(order, order[1:]))]

    def split(lo: int, hi: int, depth: int) -> tuple[int, list[tuple[int, int, int]]]:
        if lo == hi:
            return 0, [(lo, hi, 0)]
        p = min(e[lo:hi])
        whole = (hi - lo) * p if p >= min_prefix else 0
        if depth >= MAX_DEPTH:
            return whole, [(lo, hi, p)] if whole else [(k, k, 0) for k in range(lo, hi + 1)]
        saved, groups, start = 0, [], lo
        for cut in [j for j in range(lo, hi) if e[j] == p] + [hi]:
            s, g = split(start, cut, depth + 1)
            saved, groups, start = saved + s, groups + g, cut + 1
        return (whole, [(lo, hi, p)]) if whole and whole >= saved else (saved, groups)

    if not items:
        return []
    return [([order[k] for k in range(lo, hi + 1)], p) for lo, hi, p in split(0, len(items) - 1, 0)[1]]


def hflm_batches(requests, batch_size: int, grouped: bool) -> list[tuple[list[int], int]]:
    """The batches HFLM's `_loglikelihood_tokens` runs, as ([request indices], padded
    tokens): lm-eval's Collator with `grouped` (group_by="contexts": requests sharing
    context + continuation[:-1] run once, on the member with the longest continuation)
    sorted by (-len(context + continuation), tokens), cut into batches of `batch_size`.
    A subset made of whole batches is cut by HFLM into the same batches (all but the last
    are full), so each rank can hand HFLM its batches in one call."""
    if grouped:
        groups: dict[tuple, list[int]] = {}
        for r, (_, ctx, cont) in enumerate(requests):
            groups.setdefault(tuple(ctx + cont[:-1]), []).append(r)
        units = [(max(g, key=lambda r: len(requests[r][2])), g) for g in groups.values()]
    else:
        units = [(r, [r]) for r in range(len(requests))]

    def toks(unit):
        return requests[unit[0]][1] + requests[unit[0]][2]
    units.sort(key=lambda u: (-len(toks(u)), tuple(toks(u))))
    return [([r for _, g in units[k:k + batch_size] for r in g],
             len(units[k:k + batch_size]) * len(toks(units[k])))
            for k in range(0, len(units), batch_size)]


def _same_on_every_rank(requests) -> None:
    """Raise on every rank unless all ranks hold the same requests in the same order (a
    digest of each request's lengths, last context tokens and continuation, exchanged):
    the shares are planned from them."""
    h = hashlib.sha1(repr([(len(ctx), ctx[-16:], cont) for _, ctx, cont in requests]).encode())
    digests = gather_indexed([(world()[0], h.hexdigest())], world()[1])
    if len(set(digests)) > 1:
        raise LinbenchError(f"the ranks built different lm-eval requests ({len(requests)} here): "
                            "they must build the same ones to share the model calls")


def clone_cache(cache, batch: int):
    """A copy of a batch-1 cache, repeated to `batch` rows; the original is untouched.

    Works for transformers' DynamicCache (keys/values) and linbench's RecurrentCacheLayer
    (recurrent state and window), through each layer's `reorder_cache` (index_select on
    the batch dimension, which returns new tensors).
    """
    out = copy.deepcopy(cache)
    if batch > 1:
        index = torch.zeros(batch, dtype=torch.long)
        for layer in out.layers:
            layer.reorder_cache(index)
    return out


def _accepts(fn, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _cache_arg(model) -> str:
    """The model's name for its cache, in the forward and in its output: `cache`
    (transformers >= 5.2x) or `past_key_values` (a peft wrapper: its base model's)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


class PrefixReuseLM(HFLM):
    """HFLM that computes each shared prefix once (module docstring). Extra arguments:
    `prefix_reuse` (False: HFLM's path), `progress` (show the request bar)."""

    def __init__(self, *args, prefix_reuse: bool = True, progress: bool = True,
                 min_prefix: int = MIN_PREFIX, **kwargs):
        super().__init__(*args, **kwargs)
        self.prefix_reuse, self.progress, self.min_prefix = prefix_reuse, progress, min_prefix
        self.fallback_reason: str | None = None   # set when reuse was refused, with why
        self.stats = {"inputs": 0, "shared_groups": 0, "tokens_plain": 0, "tokens_run": 0}
        self._checked = False

    # evaluator.evaluate() calls lm.loglikelihood(requests) without disable_tqdm.
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        if world() is not None:
            _same_on_every_rank(requests)
        if not self.prefix_reuse or self.fallback_reason or self.backend != "causal":
            return self._plain(requests, disable_tqdm, override_bs)
        try:
            return self._reuse(requests, disable_tqdm, override_bs)
        except _Fallback as exc:
            self.fallback_reason = str(exc)
            log.warning("prefix reuse off for this model, HFLM's path instead: %s", exc)
            return self._plain(requests, disable_tqdm, override_bs)

    def _plain(self, requests, disable_tqdm, override_bs):
        """HFLM's path; distributed, each rank runs its share of HFLM's batches."""
        w = world()
        bs = override_bs if self.batch_size == "auto" else self.batch_size
        if w is None or not requests or not bs:
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        rank, n = w
        batches = hflm_batches(requests, int(bs), self.backend == "causal" and self.logits_cache)
        owner = contiguous_shares([cost for _, cost in batches], n)
        mine = sorted(r for (rs, _), o in zip(batches, owner) if o == rank for r in rs)
        res: list = [None] * len(requests)
        if mine:
            answers = super()._loglikelihood_tokens([requests[r] for r in mine], disable_tqdm, override_bs)
            for r, ans in zip(mine, answers):
                res[r] = ans
        return self._exchange(requests, res, mine)

    def _exchange(self, requests, res: list, mine: list[int]) -> list:
        """res, holding this rank's answers (requests `mine`), completed with every other
        rank's (all_gather_object; the response-cache hook sees those too)."""
        got = gather_indexed([(r, res[r]) for r in mine], len(requests))
        own = set(mine)
        for r, ans in enumerate(got):
            if ans is not None and r not in own:
                res[r] = ans
                if requests[r][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[r][0], ans)
        return res

    def _reuse(self, requests, disable_tqdm, override_bs):
        res: list = [None] * len(requests)
        items: dict[tuple, Item] = {}
        long = []                               # HFLM would truncate these on the left
        for r, (_, ctx, cont) in enumerate(requests):
            if len(ctx) + len(cont) > self.max_length + 1:
                long.append(r)
                continue
            item = items.setdefault(tuple(ctx + cont)[:-1], Item(tuple(ctx + cont)[:-1]))
            item.span = max(item.span, len(cont))
            item.requests.append(r)
        items = list(items.values())
        groups = plan_groups(items, self.min_prefix)
        bs = max(int(self.batch_size if isinstance(self.batch_size, int) else override_bs or 1), 1)
        checked = self._check(items, groups) if not self._checked else None   # on every rank
        if long:
            for r, ans in zip(long, self._plain([requests[r] for r in long], disable_tqdm, override_bs)):
                res[r] = ans
        self.stats["inputs"] += len(items)
        self.stats["tokens_plain"] += sum(len(item.tokens) for item in items)
        groups = [(sorted(members, key=lambda i: -len(items[i].tokens)), p)  # as HFLM: little padding
                  for members, p in groups]
        batches = [(g, members[b0:b0 + bs]) for g, (members, p) in enumerate(groups)
                   for b0 in range(0, len(members), bs)]
        w = world()
        if w is not None:   # this rank's batches: a contiguous run of about equal tokens
            costs = [len(b) * (len(items[b[0]].tokens) - groups[g][1])          # padded suffixes
                     + (groups[g][1] if b[0] == groups[g][0][0] else 0)        # + the prefix, once
                     for g, b in batches]
            batches = [batch for batch, o in zip(batches, contiguous_shares(costs, w[1])) if o == w[0]]
        mine = [r for _, b in batches for i in b for r in items[i].requests]
        pbar = tqdm(total=len(mine), disable=disable_tqdm or self.rank != 0,
                    desc="Running loglikelihood requests (prefix reuse)")
        for members, p in groups:
            self.stats["shared_groups"] += bool(p)
            self.stats["tokens_run"] += p + sum(len(items[i].tokens) - p for i in members)
        cache, cached = None, None
        for g, members in batches:
            p = groups[g][1]
            if p and cached != g:
                head = items[groups[g][0][0]].tokens[:p]
                cache = checked[1] if checked and checked[0] == head else self._prefix_cache(head)
                cached = g
            batch = [items[i] for i in members]
            for item, logprobs in zip(batch, self._score(batch, p, cache if p else None)):
                for r in item.requests:
                    res[r] = self._answer(requests[r], logprobs)
                    pbar.update(1)
        pbar.close()
        return res if w is None else self._exchange(requests, res, mine)

    def _answer(self, request, logprobs):
        """HFLM's (log-likelihood, is_greedy) of one request from its input's log-probs."""
        request_str, _, cont = request
        rows = logprobs[-len(cont):]                            # (len(cont), V)
        cont_t = torch.tensor(cont, dtype=torch.long, device=rows.device)
        answer = (float(rows.gather(1, cont_t[:, None]).sum()), bool((rows.argmax(-1) == cont_t).all()))
        if request_str is not None:
            self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return answer

    def _forward(self, ids, **kwargs):
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            return self.model(ids, **kwargs)

    def _prefix_cache(self, prefix):
        ids = torch.tensor([prefix], dtype=torch.long, device=self.device)
        keep = {"logits_to_keep": 1} if _accepts(self.model.forward, "logits_to_keep") else {}
        out = self._forward(ids, use_cache=True, **keep)
        return getattr(out, _cache_arg(self.model))

    def _score(self, batch: list[Item], p: int, cache) -> list[torch.Tensor]:
        """Log-probs (span, V) at the last `span` positions of each item's input, with the
        first p tokens taken from `cache` (a batch-1 prefix cache; None when p == 0)."""
        suffixes = [item.tokens[p:] for item in batch]
        width = max(len(s) for s in suffixes)
        ids = torch.zeros(len(batch), width, dtype=torch.long)  # right padding, as HFLM
        for row, s in enumerate(suffixes):
            ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
        wanted = sorted({t for s, item in zip(suffixes, batch) for t in range(len(s) - item.span, len(s))})
        kwargs = {}
        if _accepts(self.model.forward, "logits_to_keep"):
            kwargs["logits_to_keep"] = torch.tensor(wanted, dtype=torch.long, device=self.device)
            column = {t: j for j, t in enumerate(wanted)}
        else:
            column = {t: t for t in wanted}
        if cache is not None:
            kwargs.update({_cache_arg(self.model): clone_cache(cache, len(batch)), "use_cache": True})
        logits = self._forward(ids.to(self.device), **kwargs).logits
        out = []
        for row, (s, item) in enumerate(zip(suffixes, batch)):
            cols = [column[t] for t in range(len(s) - item.span, len(s))]
            out.append(F.log_softmax(logits[row, cols], dim=-1, dtype=self.softmax_dtype))
        return out

    def _check(self, items: list[Item], groups):
        """Once per LM: the first shared group's first input scored with its prefix cache
        and by one plain forward must agree; otherwise raise _Fallback with the reason.
        Returns (prefix, its cache) for the main loop, or None when nothing is shared."""
        shared = [(m, p) for m, p in groups if p]
        if not shared:
            return None
        members, p = shared[0]
        item = items[members[0]]
        try:
            cache = self._prefix_cache(item.tokens[:p])
            reused = self._score([item, item], p, cache)       # batch 2: the copy expands
        except Exception as exc:  # any model whose cache cannot be copied or continued
            raise _Fallback(f"its cache cannot be copied and continued ({type(exc).__name__}: {exc})") from exc
        plain = self._score([item], 0, None)[0]
        tol = 1e-3 if plain.dtype == torch.float32 else 5e-2
        diff = max(float((r - plain).abs().max()) for r in reused)
        if not diff <= tol:
            raise _Fallback(f"log-probs from the reused prefix differ from a plain forward by {diff:.3g} (> {tol})")
        self._checked = True
        return item.tokens[:p], cache
