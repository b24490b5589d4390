"""One-token decode steps, applied token by token, against the chunked forms (through the
public API, backend="torch"): prefill T0 tokens, decode the rest from the returned state;
outputs and the final state must match a single full-sequence call."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import linbench.kernels as K

B, T, H, DK, DV, FEAT, WINDOW = 2, 45, 3, 8, 4, 6, 8


def _inputs(dtype):
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(q=r(B, T, H, DK), k=r(B, T, H, DK), v=r(B, T, H, DV), pq=u(B, T, H, DK) + 0.1,
                pk=u(B, T, H, DK) + 0.1, g=F.logsigmoid(r(B, T, H, DK)), beta=u(B, T, H),
                gs=-u(B, T, H), kn=F.normalize(r(B, T, H, DK), dim=-1), fq=u(B, T, H, FEAT),
                fk=u(B, T, H, FEAT))


def _decay(dtype):
    return -(2.0 ** (-8 * (torch.arange(H, dtype=dtype) + 1) / H))


# name -> (full-sequence call (d, initial state) -> (o, state), step fn, positional
#          per-token inputs, per-token keyword inputs, static keywords (a function of dtype))
CASES = {
    "linear": (lambda d, s, **kw: K.linear_attention(d["q"], d["k"], d["v"], initial_state=s,
                                                     output_final_state=True, chunk_size=16, **kw),
               K.linear_attention_step, ("q", "k", "v"), {}, lambda dt: {}),
    "linear-decay-norm": (lambda d, s, **kw: K.linear_attention(
                              d["pq"], d["pk"], d["v"], initial_state=s, output_final_state=True,
                              chunk_size=16, **kw),
                          K.linear_attention_step, ("pq", "pk", "v"), {},
                          lambda dt: {"decay": _decay(dt), "normalize": True}),
    "gla": (lambda d, s, **kw: K.gated_linear_attention(d["q"], d["k"], d["v"], d["g"], initial_state=s,
                                                        output_final_state=True, chunk_size=16, **kw),
            K.gated_linear_attention_step, ("q", "k", "v", "g"), {}, lambda dt: {}),
    "delta-gated": (lambda d, s, **kw: K.delta_rule(d["q"], d["kn"], d["v"], d["beta"], g=d["gs"],
                                                    initial_state=s, output_final_state=True,
                                                    chunk_size=16, **kw),
                    K.delta_rule_step, ("q", "kn", "v", "beta"), {"g": "gs"}, lambda dt: {}),
    "sliding-window": (lambda d, s, **kw: K.sliding_window_attention(
                           d["q"], d["k"], d["v"], output_final_state=True, chunk_size=16, **kw),
                       K.sliding_window_attention_step, ("q", "k", "v"), {},
                       lambda dt: {"window": WINDOW}),
    "window-linear": (lambda d, s, **kw: K.window_linear_attention(
                          d["q"], d["k"], d["v"], d["fq"], d["fk"], output_final_state=True,
                          chunk_size=16, **kw),
                      K.window_linear_attention_step, ("q", "k", "v", "fq", "fk"), {},
                      lambda dt: {"window": WINDOW, "gamma": torch.tensor([0.1, 0.5, 0.9], dtype=dt)}),
}


@pytest.mark.parametrize("T0", [0, 1, 29], ids=lambda t: f"prefill{t}")
@pytest.mark.parametrize("name", list(CASES))
def test_steps_match_chunked(kit, dtype, name, T0):
    full, step, pos, kwseq, static = CASES[name]
    kw = static(dtype)
    d = _inputs(dtype)
    o_full, state_full = full(d, None, backend="torch", **kw)
    state = None
    if T0:
        _, state = full({key: x[:, :T0] for key, x in d.items()}, None, backend="torch", **kw)
    outs = []
    for t in range(T0, T):
        o, state = step(*(d[n][:, t] for n in pos), state,
                        **{key: d[n][:, t] for key, n in kwseq.items()}, **kw)
        outs.append(o)
    # A prefill hands over an fp32 state (the contract), so decoding after it is fp32-exact.
    kit.close(torch.stack(outs, 1), o_full[:, T0:], "o", tol=1e-4 if T0 else None)
    assert o.dtype == dtype
    if isinstance(state_full, tuple):  # window caches: tensors of the last tokens, kv sums
        assert type(state) is type(state_full)
        for field, a, b in zip(state_full._fields, state_full, state):
            kit.close(a, b, f"state.{field}")
    else:
        kit.close(state_full, state, "final state")


def test_step_continues_from_initial_state(kit):
    """A step from a given state equals the chunked form with that initial_state."""
    d = _inputs(torch.float64)
    s0 = torch.randn(B, H, DK, DV, dtype=torch.float64)
    o, s1 = K.gated_linear_attention(d["q"][:, :1], d["k"][:, :1], d["v"][:, :1], d["g"][:, :1],
                                     initial_state=s0, output_final_state=True, backend="reference")
    o_step, s_step = K.gated_linear_attention_step(d["q"][:, 0], d["k"][:, 0], d["v"][:, 0],
                                                   d["g"][:, 0], s0)
    kit.close(o_step, o[:, 0], "o")
    kit.close(s1, s_step, "state")


def test_window_cache_stays_bounded():
    d = _inputs(torch.float32)
    cache, state = None, None
    gamma = torch.full((H,), 0.5)
    for t in range(20):
        args = (d["q"][:, t], d["k"][:, t], d["v"][:, t])
        _, cache = K.sliding_window_attention_step(*args, cache, window=4)
        _, state = K.window_linear_attention_step(*args, d["fq"][:, t], d["fk"][:, t], state,
                                                  window=4, gamma=gamma)
    assert cache.k.shape == (B, 4, H, DK) and state.fk.shape == (B, 4, H, FEAT)
    assert state.kv.shape == (B, H, FEAT, DV + 1) and state.kv.dtype == torch.float32
    assert torch.allclose(state.kv[..., -1], d["fk"][:, :16].sum(1))
