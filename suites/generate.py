"""Greedy decoding through `model.generate`, one prompt at a time.

`model.generate` is the supported path for linearized models too (their attention keeps
its recurrent state in the transformers Cache), so no hand-written decoding loop here.
Prompts are never batched: left padding would need a padding mask, which linear
attention does not support.
"""
from __future__ import annotations

from typing import Sequence

import torch


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


@torch.no_grad()
def greedy(model, input_ids: Sequence[int], max_new_tokens: int, tokenizer=None) -> list[int]:
    """The greedy continuation (new token ids only) of one prompt; stops at EOS."""
    from transformers import GenerationConfig
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=model.device)  # (1, T)
    eos = _eos_ids(model, tokenizer)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad is None:
        pad = eos[0] if eos else 0
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=eos or None, pad_token_id=pad)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, ids.shape[1]:].tolist()


def greedy_text(model, tokenizer, input_ids: Sequence[int], max_new_tokens: int) -> str:
    """The greedy continuation decoded to text (special tokens dropped)."""
    new = greedy(model, input_ids, max_new_tokens, tokenizer)
    return tokenizer.decode(new, skip_special_tokens=True)
