"""ppl: the data, the windows, chunked scoring against full logits, and the suite's
numbers against a hand loop on a tiny random Llama; (integration) SmolLM2 sanity."""
from __future__ import annotations

import math

import pytest
import torch

from linbench.suites import ppl as ppl_mod
from linbench.suites import text
from linbench.suites.base import RunContext
from linbench.suites.ppl import Perplexity, lambada_ids, score_tokens, wiki_windows
from tests.conftest import make_tiny_llama


def test_offline_corpora():
    arts = text.wiki_articles()
    assert len(arts) > 10_000 - 10 and all(e for _, e in arts)
    lam = text.lambada()
    assert len(lam) == 5153
    assert lam[0].target == "signs" and lam[0].context.endswith("I don't care about")


def test_selections_deterministic_and_nested():
    a = text.wiki_selection(1234, 50)
    assert a == text.wiki_selection(1234, 50) and a[:20] == text.wiki_selection(1234, 20)
    assert a != text.wiki_selection(1235, 50) and len(set(a)) == 50
    b = text.lambada_selection(1234, 30)
    assert b == text.lambada_selection(1234, 30) and b != text.lambada_selection(1, 30)


def test_wiki_windows(smol_tokenizer):
    tok = smol_tokenizer
    docs = text.wiki_selection(0, 5)
    windows = wiki_windows(tok, docs, 64)
    stream = sum(windows, [])
    expect = []
    for i, d in enumerate(docs):
        expect += ([tok.eos_token_id] if i else []) + tok(d, add_special_tokens=False).input_ids
    assert stream == expect  # non-overlapping, nothing dropped, EOS between documents
    assert all(len(w) == 64 for w in windows[:-1]) and 2 <= len(windows[-1]) <= 64
    assert stream.count(tok.eos_token_id) == 4
    same, owners = wiki_windows(tok, docs, 64, owners=True)
    assert same == windows and [len(o) for o in owners] == [len(w) for w in windows]
    owner = sum(owners, [])
    assert owner == sorted(owner) and set(owner) == set(range(5))
    for i, d in enumerate(docs):  # a document owns its tokens and the separator before it
        assert owner.count(i) == len(tok(d, add_special_tokens=False).input_ids) + (i > 0)


def test_lambada_split(smol_tokenizer):
    for p in text.lambada_selection(3, 20):
        ids, n_ctx = lambada_ids(smol_tokenizer, p)
        assert smol_tokenizer.decode(ids) == p.text
        assert smol_tokenizer.decode(ids[n_ctx:]) == " " + p.target


def test_score_tokens_matches_full_logits(monkeypatch):
    model = make_tiny_llama()
    ids = torch.randint(0, 49152, (3, 21), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(ppl_mod, "LOGIT_BUDGET", 49152 * 7)  # 7 rows per chunk
    nll, hit = score_tokens(model, ids)
    with torch.no_grad():
        logits = model(ids).logits.float()[:, :-1]
    want = -torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(nll, want, atol=1e-4, rtol=1e-5)
    assert torch.equal(hit, logits.argmax(-1) == ids[:, 1:])


def hand_numbers(model, tok, docs, passages, context):
    """ppl_wiki, ppl_lambada, lambada_acc from full-logit forwards, one sequence at a time."""
    def nll_and_hits(ids):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
        t = torch.tensor(ids[1:])
        return -torch.log_softmax(logits, -1)[torch.arange(len(t)), t], logits.argmax(-1) == t

    stream = []
    for i, d in enumerate(docs):
        stream += ([tok.eos_token_id] if i else []) + tok(d, add_special_tokens=False).input_ids
    wiki = [nll_and_hits(stream[s:s + context])[0] for s in range(0, len(stream), context)]
    wiki_nll = torch.cat(wiki).double()
    lam, acc = [], []
    for p in passages:
        ctx_ids = tok(p.context).input_ids
        ids = tok(p.text).input_ids
        nll, hits = nll_and_hits(ids)
        lam.append(nll)
        acc.append(float(hits[len(ctx_ids) - 1:].all()))
    lam_nll = torch.cat(lam).double()
    return (math.exp(wiki_nll.mean()), len(wiki_nll), math.exp(lam_nll.mean()), len(lam_nll),
            sum(acc) / len(acc))


def hand_wiki_docs(model, tok, docs, context):
    """Per document: the summed NLL and count of the scored tokens that belong to it (a
    separator EOS belongs to the document after it), from full-logit window forwards."""
    stream, owner = [], []
    for i, d in enumerate(docs):
        piece = ([tok.eos_token_id] if i else []) + tok(d, add_special_tokens=False).input_ids
        stream += piece
        owner += [i] * len(piece)
    nll, count = [0.0] * len(docs), [0] * len(docs)
    for s in range(0, len(stream), context):
        ids = stream[s:s + context]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        for t in range(1, len(ids)):
            nll[owner[s + t]] -= logp[t - 1, ids[t]].item()
            count[owner[s + t]] += 1
    return nll, count


def test_tiny_model_equals_hand_loop(smol_tokenizer):
    model = make_tiny_llama(seed=1)
    ctx = RunContext(limit=6, seed=11, batch_size=4, progress=False)
    suite = Perplexity(context=96)
    (rec,) = suite.run(model, smol_tokenizer, ctx)
    w, wn, lp, ln, acc = hand_numbers(model, smol_tokenizer, text.wiki_selection(11, 6),
                                      text.lambada_selection(11, 6), 96)
    # per-item outcomes (paired tests): per document summed NLL and tokens scored, so that
    # exp(sum nll / sum tokens) is the reported perplexity; lambada_acc per passage
    items = rec.details["items"]
    assert set(items) == {"ppl_wiki", "ppl_lambada", "lambada_acc"}
    for name in ("ppl_wiki", "ppl_lambada"):
        it = items[name]
        assert len(it["ids"]) == len(set(it["ids"])) == len(it["nll"]) == len(it["tokens"]) == 6
        assert sum(it["tokens"]) == rec.metrics[name].n
        assert math.exp(sum(it["nll"]) / sum(it["tokens"])) == pytest.approx(
            rec.metrics[name].value, rel=1e-9)
    titles = {lead: t for t, lead in text.wiki_articles()}
    assert items["ppl_wiki"]["ids"] == [f"wiki/{titles[d]}" for d in text.wiki_selection(11, 6)]
    nll, count = hand_wiki_docs(model, smol_tokenizer, text.wiki_selection(11, 6), 96)
    assert items["ppl_wiki"]["tokens"] == count
    assert items["ppl_wiki"]["nll"] == pytest.approx(nll, rel=1e-4)
    passages = text.lambada()
    assert [passages[int(i.split("/")[1])] for i in items["ppl_lambada"]["ids"]] == \
        text.lambada_selection(11, 6)
    assert items["lambada_acc"]["ids"] == items["ppl_lambada"]["ids"]
    assert items["ppl_lambada"]["tokens"] == [len(lambada_ids(smol_tokenizer, p)[0]) - 1
                                              for p in text.lambada_selection(11, 6)]
    assert set(items["lambada_acc"]["values"]) <= {0, 1}
    assert sum(items["lambada_acc"]["values"]) / 6 == rec.metrics["lambada_acc"].value
    m = rec.metrics
    assert m["ppl_wiki"].n == wn and m["ppl_lambada"].n == ln and m["lambada_acc"].n == 6
    assert m["ppl_wiki"].value == pytest.approx(w, rel=1e-4)
    assert m["ppl_lambada"].value == pytest.approx(lp, rel=1e-4)
    assert m["lambada_acc"].value == acc
    assert m["ppl_wiki"].stderr is None and m["ppl_lambada"].stderr is None
    assert rec.details["wiki"]["docs"] == 6 and rec.details["wiki"]["tokens"] == wn
    assert 1e3 < m["ppl_wiki"].value < 1e6  # a random model: near the vocabulary size


def test_batch_size_does_not_change_numbers(smol_tokenizer):
    """Right padding without a mask is exact for a causal model: batch 1 == batch 5."""
    model = make_tiny_llama(seed=2)
    suite = Perplexity(context=64)
    runs = [suite.run(model, smol_tokenizer, RunContext(limit=5, batch_size=b, progress=False))[0]
            for b in (1, 5)]
    for name in ("ppl_wiki", "ppl_lambada", "lambada_acc"):
        assert runs[0].metrics[name].value == pytest.approx(runs[1].metrics[name].value, rel=1e-5)
        assert runs[0].metrics[name].n == runs[1].metrics[name].n


def test_lambada_acc_counts_greedy_hits(smol_tokenizer, monkeypatch):
    """A model that always predicts the right token: acc 1; one that never does: acc 0."""
    real = ppl_mod.score_tokens

    def perfect(model, ids):
        nll, hit = real(model, ids)
        return nll, torch.ones_like(hit)
    monkeypatch.setattr(ppl_mod, "score_tokens", perfect)
    (rec,) = Perplexity(context=64).run(make_tiny_llama(), smol_tokenizer,
                                        RunContext(limit=3, progress=False))
    assert rec.metrics["lambada_acc"].value == 1.0


def lmeval_vs_ours(model, tok, passages):
    """lm-eval's (loglikelihood, is_greedy) of " " + last word, beside ours."""
    from lm_eval.api.instance import Instance
    from linbench.suites import lmeval
    lm = lmeval.make_lm(model, tok, 4, progress=False)
    reqs = [Instance("loglikelihood", {}, (p.context, " " + p.target), i)
            for i, p in enumerate(passages)]
    theirs = lm.loglikelihood(reqs)
    ours = []
    for p in passages:
        ids, n_ctx = lambada_ids(tok, p)
        nll, hit = score_tokens(model, torch.tensor([ids]))
        ours.append((-nll[0, n_ctx - 1:].sum().item(), bool(hit[0, n_ctx - 1:].all())))
    return theirs, ours


def test_lambada_matches_lm_eval_tiny(smol_tokenizer):
    theirs, ours = lmeval_vs_ours(make_tiny_llama(seed=3), smol_tokenizer,
                                  text.lambada_selection(5, 6))
    for (ll_t, g_t), (ll_o, g_o) in zip(theirs, ours):
        assert ll_o == pytest.approx(ll_t, abs=1e-3) and g_o == g_t


def test_config_knobs():
    s = Perplexity(context=512, wiki_docs=10, lambada_docs=20)
    assert s.config(RunContext(limit=None, seed=3)) == {
        "limit": None, "seed": 3, "context": 512, "wiki_docs": 10, "lambada_docs": 20}
    assert s.config(RunContext(limit=4))["wiki_docs"] == 4


@pytest.mark.integration
def test_smollm_ppl_sane():
    from linbench.assets import models
    model, tok = models.load(models.resolve("smollm2-135m"), "float32", "cpu")
    (rec,) = Perplexity(context=512).run(model, tok, RunContext(limit=20, progress=False))
    m = rec.metrics
    assert 3 < m["ppl_wiki"].value < 40, m
    assert 3 < m["ppl_lambada"].value < 60, m
    assert m["lambada_acc"].value >= 0.15, m


@pytest.mark.integration
def test_smollm_lambada_greedy_matches_lm_eval():
    from linbench.assets import models
    model, tok = models.load(models.resolve("smollm2-135m"), "float32", "cpu")
    theirs, ours = lmeval_vs_ours(model, tok, text.lambada_selection(1234, 16))
    assert [g for _, g in theirs] == [g for _, g in ours]
    assert any(g for _, g in ours)  # the check compares some hits, not only misses
    for (ll_t, _), (ll_o, _) in zip(theirs, ours):
        assert ll_o == pytest.approx(ll_t, abs=1e-3)
