"""recall: golden prompts, needle positions, determinism, the window logic, scoring, record
shapes on a tiny random Llama, and (integration) SmolLM2 and its `swa` baseline."""
from __future__ import annotations

import re

import pytest
import torch

from linbench.suites import text
from linbench.suites.base import RunContext
from linbench.suites.generate import greedy
from linbench.suites.recall import (Prompt, Recall, in_window, kv_prompts, model_window,
                                    needle_prompt, passkey_prompt, score, squad_prompt)
from tests.conftest import make_tiny_llama

HEADER = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
          "memorize it. I will quiz you about the important information there.\n\n")
QUESTION = "\n\nWhat is the pass key? The pass key is"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def needle_text(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


# ---------------------------------------------------------------- prompts

def test_passkey_golden(smol_tokenizer):
    p = passkey_prompt(smol_tokenizer, 1234, 96, 0.5, 0)
    assert p.text == (HEADER + "The grass is green. The sky is blue. The sun is yellow. "
                      + needle_text("51629") + " Here we go. There and back again. "
                      "The grass is green" + QUESTION)
    assert p.answer == "51629" and len(p.ids) == 96


@pytest.mark.parametrize("depth", [0.0, 1.0])
def test_passkey_depth_ends(smol_tokenizer, depth):
    tok = smol_tokenizer
    p = passkey_prompt(tok, 1234, 256, depth, 0)
    if depth == 0.0:  # right after the instruction
        assert p.text.startswith(HEADER + needle_text(p.answer) + " " + FILLER)
    else:             # right before the question
        assert p.text.endswith(needle_text(p.answer) + QUESTION)
    assert tok.decode(p.ids[p.needle_tok:]).lstrip().startswith(needle_text(p.answer))
    # distance: tokens from the question's last token back to the needle
    question_tokens = len(tok(QUESTION, add_special_tokens=False).input_ids)
    needle_tokens = len(tok(" " + needle_text(p.answer), add_special_tokens=False).input_ids)
    if depth == 1.0:
        assert abs(p.distance - (question_tokens + needle_tokens - 1)) <= 1
    else:  # the tokens before the needle are exactly the instruction
        assert tok.decode(p.ids[:p.needle_tok]) == HEADER


@pytest.mark.parametrize("make", [passkey_prompt, needle_prompt])
@pytest.mark.parametrize("length", [256, 1024, 4096])
def test_rendered_length_close_to_target(smol_tokenizer, make, length):
    for depth in (0.0, 0.25, 1.0):
        p = make(smol_tokenizer, 7, length, depth, 0)
        assert abs(len(p.ids) - length) <= 3, (depth, len(p.ids))
        assert p.text.count(p.answer) == (2 if make is passkey_prompt else 1)


def test_needle_prompt_shape(smol_tokenizer):
    tok = smol_tokenizer
    p = needle_prompt(tok, 1234, 512, 0.5, 0)
    m = re.search(r"The special magic number of (\w+) is (\d{5})\.", p.text)
    assert m and m.group(2) == p.answer and m.group(1) in text.NEEDLE_SUBJECTS
    assert p.text.endswith(f"What is the special magic number of {m.group(1)}? "
                           f"The special magic number of {m.group(1)} is")
    assert tok.decode(p.ids[p.needle_tok:]).lstrip().startswith(m.group(0))
    # natural filler: Wikipedia sentences on both sides, needle near the middle
    assert 0.3 < p.needle_tok / len(p.ids) < 0.7
    assert "The grass is green" not in p.text


def test_prompts_deterministic(smol_tokenizer):
    tok = smol_tokenizer
    for make in (passkey_prompt, needle_prompt):
        a, b = make(tok, 5, 512, 0.25, 1), make(tok, 5, 512, 0.25, 1)
        assert a.text == b.text and a.ids == b.ids and a.needle_tok == b.needle_tok
        assert make(tok, 6, 512, 0.25, 1).text != a.text
        assert make(tok, 5, 512, 0.25, 2).text != a.text
    kv_a, kv_b = kv_prompts(tok, 5, 16, 0, 4), kv_prompts(tok, 5, 16, 0, 4)
    assert [p.text for p in kv_a] == [p.text for p in kv_b]


def test_kv_prompts(smol_tokenizer):
    tok = smol_tokenizer
    ps = kv_prompts(tok, 1234, 16, 0, 4)
    assert len(ps) == 4
    lines = ps[0].text.split("\n\n")[1].split("\n")
    keys = [line.split(": ")[0] for line in lines]
    values = [line.split(": ")[1] for line in lines]
    assert len(lines) == 16 and len(set(keys)) == 16 and len(set(values)) == 16
    assert all(re.fullmatch(r"[a-z]+", k) for k in keys)
    assert all(re.fullmatch(r"[1-9]\d{2,3}", v) for v in values)
    asked = []
    for j, p in enumerate(ps):
        key = p.text.rsplit("\n", 1)[1].removesuffix(":")
        assert p.answer == values[keys.index(key)] and key not in asked
        # earlier queries shown answered, this one open
        assert p.text.endswith("Now recall the values.\n" + "".join(
            f"{k}: {values[keys.index(k)]}\n" for k in asked) + f"{key}:")
        assert tok.decode(p.ids[p.needle_tok:]).startswith(f"{key}: {p.answer}\n")
        asked.append(key)


def test_squad_data_and_prompt(smol_tokenizer):
    qs = text.squad()
    assert len(qs) == 1000 and all(q.answers and q.context and q.question for q in qs)
    q = next(q for q in qs if q.question.startswith("Harvard - Yale Regatta predates"))
    assert q.title == "Harvard University" and "23" in q.answers
    p = squad_prompt(smol_tokenizer, q)
    assert p.text.startswith("Title: Harvard University\nBackground: Older than The Game")
    assert p.text.endswith("\nQuestion: " + q.question + "\nAnswer:")
    assert smol_tokenizer.decode(p.ids[p.needle_tok:]).lstrip().startswith(q.answers[0])


def test_scoring_rules():
    p = Prompt("", [], "12345", None)
    assert score("passkey", p, " 12345.") and not score("passkey", p, " 1234")
    kv = Prompt("", [], "538", None)
    assert score("kv", kv, " 538\nfoo") and not score("kv", kv, " 5380")
    assert not score("kv", kv, " 12 538")  # the first number generated counts
    sq = Prompt("", [], "the Eleutherian Mills\tEleutherian", None)
    assert score("squad", sq, " eleutherian mills, Delaware\nTitle: x")
    assert not score("squad", sq, "\nThe answer\nEleutherian")  # only the first line counts
    assert text.normalize_answer("The  Big, Apple!") == "big apple"


# ---------------------------------------------------------------- the window

def test_in_window_logic():
    assert in_window(10**6, None) and in_window(None, None)
    assert in_window(0, 0) is False and in_window(None, 128) is None  # None: not located
    assert in_window(127, 128) and not in_window(128, 128)  # query i sees (i - W, i]


def test_model_window():
    m = make_tiny_llama()
    assert model_window(m) is None
    m.config.linbench = {"method": "swa", "window": 64}
    assert model_window(m) == 64
    m.config.linbench = {"method": "hedgehog", "window": 0}
    assert model_window(m) == 0


# ---------------------------------------------------------------- runs on a tiny model

def test_greedy_matches_hand_loop(smol_tokenizer):
    model = make_tiny_llama()
    ids = smol_tokenizer("The pass key is 12345. What is the pass key?").input_ids
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(5):
            x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert greedy(model, ids, 5, smol_tokenizer) == x[0, len(ids):].tolist()


def _tiny_run(tok, window=None, oracle=None, monkeypatch=None):
    model = make_tiny_llama(max_position_embeddings=512)
    if window is not None:
        model.config.linbench = {"method": "test", "window": window}
    if oracle:
        monkeypatch.setattr("linbench.suites.recall.greedy_text", oracle)
    suite = Recall(lengths=(128, 256, 1024), depths=(0.0, 1.0), pairs=(4, 8), kv_queries=3)
    return suite.run(model, tok, RunContext(limit=1, seed=3, progress=False))


def test_tiny_run_record_shape(smol_tokenizer):
    (rec,) = _tiny_run(smol_tokenizer)
    d = rec.details
    assert d["window"] is None and d["lengths"] == [128, 256]  # 1024 > max_position_embeddings
    for task in ("passkey", "needle"):
        cells = d[task]
        grid = [(c["length"], c["depth"]) for c in cells]
        assert grid == [(128, 0.0), (128, 1.0), (256, 0.0), (256, 1.0)]
        assert all(c["n"] == 1 and c["in_window"] is True and 0 <= c["acc"] <= 1 for c in cells)
        assert rec.metrics[task].n == 4 and rec.metrics[f"{task}_in_window"].n == 4
        assert f"{task}_out_window" not in rec.metrics
    assert [(c["pairs"], c["n"]) for c in d["kv"]] == [(4, 3), (8, 3)] and rec.metrics["kv"].n == 6
    assert d["squad"]["n"] == 1 and rec.metrics["squad"].n == 1
    for m in rec.metrics.values():
        assert 0.0 <= m.value <= 1.0
    # per-item outcomes (paired tests): one 0/1 per prompt under a stable id; every
    # metric is the mean of its items
    items = d["items"]
    assert set(items) == set(rec.metrics)
    for name, m in rec.metrics.items():
        it = items[name]
        assert len(it["ids"]) == len(set(it["ids"])) == len(it["values"]) == m.n
        assert set(it["values"]) <= {0, 1} and sum(it["values"]) / m.n == m.value
    assert items["passkey"]["ids"] == ["L128/d0/s0", "L128/d1/s0", "L256/d0/s0", "L256/d1/s0"]
    assert items["kv"]["ids"] == [f"P{p}/s0/q{q}" for p in (4, 8) for q in range(3)]
    assert items["squad"]["ids"] == [f"squad/{text.squad_selection(3, 1)[0].id}"]
    assert items["passkey"]["values"] == [int(c["acc"]) for c in d["passkey"]]


def test_window_flags_and_oracle(smol_tokenizer, monkeypatch):
    """An oracle that reads the answer from the prompt scores 1 everywhere; with a
    64-token window, depth-0 needles are out of the window and depth-1 needles in."""
    def oracle(model, tok, ids, max_new):
        t = tok.decode(ids)
        for pat in (r"pass key is (\d{5})", r"magic number of \w+ is (\d{5})"):
            if m := re.search(pat, t):
                return " " + m.group(1) + "."
        if t.endswith("\nAnswer:"):  # squad: the first gold answer is in the context
            return " " + text.squad_selection(3, 1)[0].answers[0]
        key = t.rsplit("\n", 1)[1].removesuffix(":")
        return " " + re.search(rf"\n{key}: (\d+)\n", t).group(1)

    (rec,) = _tiny_run(smol_tokenizer, window=64, oracle=oracle, monkeypatch=monkeypatch)
    for task in ("passkey", "needle", "kv", "squad"):
        assert rec.metrics[task].value == 1.0, task
    for task in ("passkey", "needle"):
        flags = {c["depth"]: c["in_window"] for c in rec.details[task]}
        assert flags == {0.0: False, 1.0: True}
        assert rec.metrics[f"{task}_in_window"].n == 2 and rec.metrics[f"{task}_out_window"].n == 2
        # the in/out-of-window items are the cells' prompts on either side of the window
        assert rec.details["items"][f"{task}_out_window"]["ids"] == ["L128/d0/s0", "L256/d0/s0"]
        assert rec.details["items"][f"{task}_in_window"]["ids"] == ["L128/d1/s0", "L256/d1/s0"]
    (rec0,) = _tiny_run(smol_tokenizer, window=0)
    assert rec0.details["window"] == 0
    assert not any(c["in_window"] for c in rec0.details["passkey"] + rec0.details["needle"])


def test_config_knobs():
    suite = Recall(lengths=(512, 256), pairs=(8,), samples=3, squad_questions=7)
    cfg = suite.config(RunContext(limit=None, seed=9))
    assert cfg["lengths"] == [256, 512] and cfg["pairs"] == [8]
    assert cfg["samples"] == 3 and cfg["squad_questions"] == 7 and cfg["seed"] == 9
    cfg = suite.config(RunContext(limit=2))
    assert cfg["samples"] == 2 and cfg["squad_questions"] == 2
    with pytest.raises(ValueError):
        Recall(tasks=("passkey", "nope"))


# ---------------------------------------------------------------- integration (SmolLM2)

@pytest.fixture(scope="module")
def smollm():
    from linbench.assets import models
    spec = models.resolve("smollm2-135m")
    return models.load(spec, "float32", "cpu")


@pytest.mark.integration
def test_softmax_passkey_beats_chance(smollm):
    model, tok = smollm
    suite = Recall(lengths=(256, 512), depths=(0.0, 0.5, 1.0), tasks=("passkey",))
    (rec,) = suite.run(model, tok, RunContext(limit=2, progress=False))
    assert rec.metrics["passkey"].n == 12
    assert rec.metrics["passkey"].value >= 0.5  # chance of a 5-digit key is ~0


@pytest.mark.integration
@pytest.mark.parametrize("window", [64, 256])
def test_swa_baseline_fails_outside_its_window(smollm, window):
    """The real `swa` method (window 64, the paper default, and 256): cells the full model
    solves fail once the key lies outside the window. In-window accuracy is not asserted:
    SmolLM2 with an untrained window is erratic even when the key is inside it."""
    from linbench import registry
    from linbench.assets import models
    model, tok = smollm
    suite = Recall(lengths=(512,), depths=(0.0, 0.25), tasks=("passkey",))
    ctx = RunContext(limit=2, progress=False)
    (full,) = suite.run(model, tok, ctx)
    swa_model, _ = models.load(models.resolve("smollm2-135m"), "float32", "cpu")
    swa_model = registry.methods.get("swa")(window=window).linearize(swa_model)
    (swa,) = suite.run(swa_model, tok, ctx)
    assert all(c["in_window"] for c in full.details["passkey"])
    assert not any(c["in_window"] for c in swa.details["passkey"])
    assert swa.details["window"] == window
    assert full.metrics["passkey"].value >= 0.75
    assert swa.metrics["passkey_out_window"].value <= 0.25
    assert swa.metrics["passkey_out_window"].n == 4
