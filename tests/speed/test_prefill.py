"""Model-level prefill and decode (linbench.speed.targets): a chunked prefill equals the
one-call forward for every registered method, and a decode cache advanced to position T
has the shape of a real one (fp32, tiny random Llama)."""
from __future__ import annotations

import pytest
import torch

from linbench import registry
from linbench.methods.linearize import NO_SOFTMAX, restore_softmax
from linbench.speed.targets import (_cache_kwarg, _cache_of, advance_cache, chunked_prefill,
                                    decode_cache, model_target)
from linbench.speed.timing import Guard
from tests.conftest import make_tiny_llama

T, CHUNK = 150, 64  # three chunks (64, 64, 22): the chunk does not divide T, T > the window


def _linearized(name):
    method = registry.methods.get(name)()
    model = method.linearize(make_tiny_llama(vocab_size=256, seed=1)).eval()
    return method, model


def _greedy(model, cache, logits, steps=3):
    """Logits of `steps` greedy decode steps continuing from (cache, last logits)."""
    kw, out = _cache_kwarg(model), []
    for _ in range(steps):
        tok = logits[:, -1:].argmax(-1)  # (1, 1)
        logits = model(tok, use_cache=True, **{kw: cache}).logits
        out.append(logits)
    return torch.cat(out, 1)


@pytest.mark.parametrize("name", registry.methods.names())
@torch.no_grad()
def test_chunked_prefill_equals_one_call(name):
    method, model = _linearized(name)
    ids = torch.randint(256, (1, T), generator=torch.Generator().manual_seed(0))
    one = model(ids, use_cache=True, logits_to_keep=1)
    chunked = chunked_prefill(model, ids, CHUNK)
    assert chunked.logits.shape == one.logits.shape == (1, 1, 256)
    torch.testing.assert_close(chunked.logits, one.logits, rtol=1e-4, atol=1e-4)
    assert _cache_of(chunked).get_seq_length() == _cache_of(one).get_seq_length() == T
    # the carried state continues like the one-call state: same greedy decode logits
    torch.testing.assert_close(_greedy(model, _cache_of(chunked), chunked.logits),
                               _greedy(model, _cache_of(one), one.logits), rtol=1e-4, atol=1e-4)


def _masks_seen(model, ids, chunk):
    """The attention_mask each chunk of a prefill hands to the first decoder layer."""
    seen = []
    hook = model.model.layers[0].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True)
    try:
        chunked_prefill(model, ids, chunk)
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize("name", registry.methods.names())
@torch.no_grad()
def test_a_model_with_no_softmax_layer_builds_no_attention_mask(name):
    """Every chunk after the first used to build a (chunk x tokens so far) causal mask that
    no linearized layer reads: the only part of a recurrent prefill growing with T."""
    method, model = _linearized(name)
    ids = torch.randint(256, (1, T), generator=torch.Generator().manual_seed(0))
    masks = _masks_seen(model, ids, CHUNK)
    assert len(masks) == 3
    if name == "softmax":  # the parent keeps its masks: chunks 2 and 3 see earlier keys
        assert model.config._attn_implementation != NO_SOFTMAX
        assert [None if m is None else tuple(m.shape[-2:]) for m in masks] == [None, (64, 128), (22, 150)]
    else:
        assert model.config._attn_implementation == NO_SOFTMAX
        assert masks == [None, None, None]


@torch.no_grad()
def test_kept_softmax_layers_keep_their_mask_and_the_same_logits():
    """A hybrid (softmax layer 1 kept) and a model whose layer 0 is put back afterwards
    (restore_softmax): the softmax implementation returns with its masks, and a chunked
    prefill still equals one call."""
    hybrid = registry.methods.get("lolcats")(keep_softmax_layers=(1,))
    restored = registry.methods.get("lolcats")()
    models = [hybrid.linearize(make_tiny_llama(vocab_size=256, seed=1)).eval(),
              restored.linearize(make_tiny_llama(vocab_size=256, seed=1)).eval()]
    assert models[1].config._attn_implementation == NO_SOFTMAX
    restore_softmax(models[1], [0])
    ids = torch.randint(256, (1, T), generator=torch.Generator().manual_seed(0))
    for model in models:
        assert model.config._attn_implementation == "sdpa"
        assert [m is None for m in _masks_seen(model, ids, CHUNK)] == [True, False, False]
        one = model(ids, use_cache=True, logits_to_keep=1)
        torch.testing.assert_close(chunked_prefill(model, ids, CHUNK).logits, one.logits,
                                   rtol=1e-4, atol=1e-4)


def test_chunked_prefill_rejects_a_bad_chunk():
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        chunked_prefill(make_tiny_llama(vocab_size=256), torch.zeros(1, 4, dtype=torch.long), 0)


@torch.no_grad()
def test_advance_tiles_a_kv_cache_and_moves_a_recurrent_one():
    ids = torch.randint(256, (1, 40))
    _, soft = _linearized("softmax")
    cache = _cache_of(chunked_prefill(soft, ids, 16))
    keys = [layer.keys.clone() for layer in cache.layers]  # (1, Hkv, 40, D)
    advance_cache(cache, 100)
    assert cache.get_seq_length() == 100
    for layer, k in zip(cache.layers, keys):
        assert layer.keys.shape[-2] == layer.values.shape[-2] == 100
        torch.testing.assert_close(layer.keys[..., 40:80, :], k)
        torch.testing.assert_close(layer.keys[..., 80:, :], k[..., :20, :])

    _, gla = _linearized("gla")
    cache = _cache_of(chunked_prefill(gla, ids, 16))
    states = [layer.state.clone() for layer in cache.layers]
    advance_cache(cache, 100)
    assert cache.get_seq_length() == 100
    assert all(torch.equal(layer.state, s) for layer, s in zip(cache.layers, states))
    gla(ids[:, -1:], use_cache=True, **{_cache_kwarg(gla): cache})  # a step at position 100
    assert cache.get_seq_length() == 101


@torch.no_grad()
def test_decode_cache_prefills_for_real_when_the_state_grows():
    _, gla = _linearized("gla")
    ids = torch.randint(256, (1, 50))
    cache, how = decode_cache(gla, ids, 50, chunk=16, prefix=20, state_is_constant=False)
    real = _cache_of(chunked_prefill(gla, ids, 16))
    assert how == {"decode_prefix": 20, "decode_cache": "real prefill (the state grows with T)"}
    for a, b in zip(cache.layers, real.layers):
        torch.testing.assert_close(a.state, b.state)
        assert a.seen == b.seen == 50
    _, how = decode_cache(gla, ids, 50, chunk=16, prefix=20, state_is_constant=True)
    assert how["decode_cache"] == "20 real tokens, cache advanced to position 50"


@pytest.mark.parametrize("name", ["softmax", "lolcats"])
def test_model_target_decode_setup(name):
    """The prefix (80) is longer than the window (64): the state no longer grows; advanced."""
    method, model = _linearized(name)
    target = model_target(name, method, model, "cpu", prefill_chunk=32, decode_prefix=80)
    step, tokens = target.prepare("decode", 100)
    step()
    assert tokens == 1
    setup = target.setup("decode", 100)
    assert setup["prefill_chunk"] == 32 and setup["decode_prefix"] == 80
    assert setup["decode_cache"] == "80 real tokens, cache advanced to position 100"
    run, tokens = target.prepare("prefill", 100)
    run()
    assert tokens == 100 and target.setup("prefill", 100) == {"prefill_chunk": 32}


def test_guard_lets_memory_stay_flat_but_not_time():
    g = Guard()
    g.observe(1024, "ok", 1.0, 100 << 20)
    g.observe(2048, "ok", 2.0, 100 << 20)
    # flat memory is not extrapolated linearly (2**17 / 2**11 * 100 MiB would be 6.4 GiB)
    assert g.predict(2 ** 17, 1e9, 1 << 30, 0) is None
    # but what the target says must grow (its KV cache) still counts
    assert g.predict(2 ** 17, 1e9, 1 << 30, 2 << 30)[0] == "oom"
    # time still grows at least linearly: 2 s at 2k -> 128 s at 128k
    assert g.predict(2 ** 17, 60.0, None, 0)[0] == "timeout"


def test_cli_rejects_a_bad_prefill_chunk(capsys):
    from linbench.cli import main
    with pytest.raises(SystemExit) as exc:
        main(["speed", "--mode", "prefill", "--prefill-chunk", "0", "--seqlen", "1k"])
    assert exc.value.code == 2
    assert "--prefill-chunk" in capsys.readouterr().err


# the decode-path fast forms in methods/attention.py against their one-op-at-a-time twins

@pytest.mark.parametrize("T,groups", [(1, 3), (7, 2), (5, 1)])
def test_rotate_repeat_equals_rotate_then_repeat(T, groups):
    from linbench.methods.attention import repeat_heads, rotate, rotate_repeat
    g = torch.Generator().manual_seed(T)
    q0, k0, v = (torch.randn(2, T, h, 8, generator=g, requires_grad=True)
                 for h in (3 * groups, 3, 3))
    cos, sin = torch.randn(2, T, 8, generator=g), torch.randn(2, T, 8, generator=g)
    fast = rotate_repeat(q0, k0, v, cos, sin, groups)
    slow = (rotate(q0, cos, sin), repeat_heads(rotate(k0, cos, sin), groups),
            repeat_heads(v, groups), repeat_heads(k0, groups))
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b)
    w = [torch.randn(a.shape, generator=g) for a in fast]
    gf = torch.autograd.grad(sum((a * x).sum() for a, x in zip(fast, w)), (q0, k0, v))
    gs = torch.autograd.grad(sum((a * x).sum() for a, x in zip(slow, w)), (q0, k0, v))
    for a, b in zip(gf, gs):
        torch.testing.assert_close(a, b)


def test_head_rms_norm_equals_its_unfused_form():
    from linbench.methods.attention import HeadRMSNorm
    norm = HeadRMSNorm(3, 8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    o = torch.randn(2, 5, 3, 8, requires_grad=True)
    fast, slow = norm(o), norm.norm_reference(o)
    torch.testing.assert_close(fast, slow)
    gf = torch.autograd.grad(fast.square().sum(), (o, norm.weight))
    gs = torch.autograd.grad(slow.square().sum(), (o, norm.weight))
    for a, b in zip(gf, gs):
        torch.testing.assert_close(a, b)


def test_model_level_rows_render_with_their_setup():
    """The report's speed table (and plot) take model-level prefill / decode rows, with a
    note saying how each mode's inputs were built."""
    from linbench.report.build import build_tables
    from linbench.report.plots import speed_figure
    from tests.report.records import speed
    recs = []
    for method in ("softmax", "gla"):
        for mode in ("prefill", "decode"):
            for T in (1024, 4096):
                r = speed(method, mode, T)
                r["details"].update(level="model", layers=2, setup={"prefill_chunk": 512} if
                                    mode == "prefill" else {"prefill_chunk": 512, "decode_prefix": 512,
                                    "decode_cache": f"512 real tokens, cache advanced to position {T}"})
                recs.append(r)
    (table,) = build_tables(recs)
    assert table.kind == "speed" and "model level" in table.title and len(table.rows) == 8
    assert "prefill in chunks of 512 tokens, state or KV cache carried (softmax, gla)" in table.notes
    assert ("decode: ms per token; cache at T: 512 real tokens, cache advanced to position T "
            "(softmax, gla)") in table.notes
    fig = speed_figure(table, {"softmax": "k", "gla": "b"})
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert {"softmax prefill", "softmax decode", "gla prefill", "gla decode"} <= set(labels)
