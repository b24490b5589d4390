"""Streaming over the sequence, shared by the window mixers' torch and Triton forms.

`streamed(fn, q, k, v, fq, fk, gamma, window=W, group=L)` cuts the queries into groups of
L tokens and calls, group by group,

    fn(q_g, k_e, v_e, fq_g, fk_e, gamma, S, lead) -> (y_g, S_next)

with q_g, fq_g the group's queries [s, e) and k_e, v_e, fk_e the keys [lo, e),
lo = max(0, s - W), `lead` = s - lo of them before the group: the window (s - W, s] of
its first query and the `window`-shifted keys [s - W, e - W) of the hybrid's linear part.
S is the hybrid's state, the sum of fk_j [v_j, 1] over keys j < s - W ((B, H, F, V + 1) in
the compute dtype; None for the plain window). Slices are handed over in the inputs' own
dtype (fn casts them), y_g is written into an output in v's dtype, so the only
whole-sequence tensors are the inputs and the output.

fq, fk may also be the feature maps themselves (callables, e.g. nn.Modules, applied per
token): then they are applied to each group's q and k slices, never to the whole sequence
(the keys before a group are mapped again with it), and their parameters get gradients.

Backward (a torch.autograd.Function): the forward saves the inputs and the state at each
group start (T / L states); the backward walks the groups in reverse, recomputes each one
with autograd and pulls the state's gradient into the group before. A key's gradient gets
contributions from its own group and from later groups whose window reaches back to it:
those (at most W keys, in fp32 or wider) wait in a carry and are added before the slice is
written, so each gradient slice is written once. Peak memory: inputs, output (and in
backward their gradients), T / L states, one group's graph.
"""
from __future__ import annotations

import torch


def _slice(x, a, b):
    return None if x is None else x[:, a:b]


def _wide(x):
    """The dtype gradients are summed in: fp32, or x's when wider."""
    return torch.promote_types(x.dtype, torch.float32)


def _leaf(x, need):
    return None if x is None else x.detach().requires_grad_(need)


def _features(maps, q_g, k_e, fq_g, fk_e):
    """The group's (fq, fk): the given slices, or the feature maps applied to q, k."""
    return (fq_g, fk_e) if maps is None else (maps[0](q_g), maps[1](k_e))


class _Streamed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, W, L, maps, q, k, v, fq, fk, gamma, s0, *params):
        T = q.shape[1]
        out = v.new_empty(v.shape)
        # the state at each group start, one tensor allocated once (no small tensors
        # left between the groups' large ones: the heap stays unfragmented)
        starts = None if s0 is None else s0.new_empty(-(-T // L), *s0.shape)
        S = s0
        for s in range(0, T, L):
            e, lo = min(T, s + L), max(0, s - W)
            if S is not None:
                starts[s // L] = S
            q_g, k_e = q[:, s:e], k[:, lo:e]
            y, S = fn(q_g, k_e, v[:, lo:e], *_features(maps, q_g, k_e, _slice(fq, s, e),
                                                          _slice(fk, lo, e)), gamma, S, s - lo)
            out[:, s:e] = y
        ctx.save_for_backward(q, k, v, fq, fk, gamma, starts)
        ctx.cfg = (fn, W, L, maps, params)
        return out

    @staticmethod
    def backward(ctx, dy):
        q, k, v, fq, fk, gamma, starts = ctx.saved_tensors
        fn, W, L, maps, params = ctx.cfg
        need = ctx.needs_input_grad[4:11]
        T = q.shape[1]
        xs = (q, k, v, fq, fk)
        grads = [torch.empty_like(x, memory_format=torch.contiguous_format)
                 if x is not None and nd else None for x, nd in zip(xs, need)]
        keyed = (1, 2, 4)  # k, v, fk: sliced [lo, e), gradients carried back
        carry, carry_lo = {}, T
        dgamma = None if gamma is None or not need[5] else torch.zeros_like(gamma, dtype=_wide(gamma))
        want = [p for p, nd in zip(params, ctx.needs_input_grad[11:]) if nd]
        dparams = [torch.zeros_like(p, dtype=_wide(p)) for p in want]
        dS = None
        for idx in reversed(range(-(-T // L))):
            s = idx * L
            e, lo = min(T, s + L), max(0, s - W)
            with torch.enable_grad():
                part = [_leaf(_slice(x, s, e) if i in (0, 3) else _slice(x, lo, e), need[i])
                        for i, x in enumerate(xs)]
                g_in = _leaf(gamma, need[5])
                S_in = None if starts is None else _leaf(starts[idx], idx > 0 or need[6])
                feats = _features(maps, part[0], part[1], part[3], part[4])
                y, S_out = fn(*part[:3], *feats, g_in, S_in, s - lo)
                outs = [(y, dy[:, s:e].to(y.dtype))] + ([(S_out, dS)] if dS is not None else [])
                outs = [(o, d) for o, d in outs if o.requires_grad]
                wrt = [t for t in (*part, g_in, S_in) if t is not None and t.requires_grad]
                got = torch.autograd.grad([o for o, _ in outs], wrt + want,
                                          [d for _, d in outs], allow_unused=True)
            got = iter(got)
            for i, t in enumerate(part):
                if t is None or not t.requires_grad:
                    continue
                d = next(got)
                d = torch.zeros_like(t, dtype=_wide(t)) if d is None else d.to(_wide(d))
                if i not in keyed:
                    grads[i][:, s:e] = d
                    continue
                if i in carry:  # later groups' share of keys [carry_lo, e)
                    d[:, carry_lo - lo:] += carry[i]
                grads[i][:, s:e] = d[:, s - lo:]
                carry[i] = d[:, :s - lo]
            carry_lo = lo
            if g_in is not None and g_in.requires_grad:
                d = next(got)
                if d is not None:
                    dgamma += d
            if S_in is not None and S_in.requires_grad:
                dS = next(got)
                dS = torch.zeros_like(S_in) if dS is None else dS
            for acc in dparams:
                d = next(got)
                if d is not None:
                    acc += d
        dS0 = dS if need[6] else None
        dgamma = None if dgamma is None else dgamma.to(gamma.dtype)
        dparams = iter([d.to(p.dtype) for d, p in zip(dparams, want)])
        dp = [next(dparams) if nd else None for nd in ctx.needs_input_grad[11:]]
        return (None, None, None, None, *grads, dgamma, dS0, *dp)


def maps_params(fq, fk) -> list:
    """The trainable parameters of feature maps given as modules (none for tensors)."""
    out = []
    for m in (fq, fk):
        for p in (m.parameters() if isinstance(m, torch.nn.Module) else ()):
            if p.requires_grad and all(p is not o for o in out):
                out.append(p)
    return out


def streamed(fn, q, k, v, fq=None, fk=None, gamma=None, s0=None, *, window: int, group: int):
    """y (B, T, H, V) in v's dtype: `fn` over groups of `group` query tokens, keys from
    `window` tokens before each group (module docstring); fq, fk: feature tensors or the
    feature maps; s0: the hybrid's initial state (zeros), None for the plain window."""
    maps = (fq, fk) if callable(fq) else None
    params = maps_params(fq, fk) if maps else []
    if maps:
        fq = fk = None
    return _Streamed.apply(fn, int(window), int(group), maps, q, k, v, fq, fk, gamma, s0,
                           *params)
