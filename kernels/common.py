"""What every op's torch forms share: conventions, dtypes, the normalizer column, the chunk
layout, argument checks, and which op folder holds each kernel.

Conventions (every form of every op):
  q, k: (B, T, H, K)   v: (B, T, H, V)   states fp32 (B, H, K, V)
  `scale` multiplies q.k (default K ** -0.5).  Log-decays / log-gates are <= 0.
  Outputs keep the dtype of v; the math runs in at least fp32 (fp64 stays fp64).
"""
from __future__ import annotations

import torch

# kernel name -> the op folder (linbench.kernels.<op>) holding its forms:
# reference.py <name>_ref, chunked.py <name>_chunked, recurrent.py <name>_step, triton.py <name>
OPS = {
    "linear_attention": "linear",
    "gated_linear_attention": "gla",
    "delta_rule": "delta",
    "sliding_window_attention": "window",
    "window_linear_attention": "window",
}


def acc_dtype(*xs) -> torch.dtype:
    """The compute dtype: fp32, or wider when an input (None skipped) is wider."""
    dt = torch.float32
    for x in xs:
        if x is not None:
            dt = torch.promote_types(dt, x.dtype)
    return dt


def default_scale(q: torch.Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def augment_ones(v: torch.Tensor) -> torch.Tensor:
    """Append a ones column to v: the normalizer z = sum phi(k) rides in the state."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def normalize_output(o_aug: torch.Tensor, eps: float) -> torch.Tensor:
    """Split the augmented output into numerator / denominator and divide."""
    return o_aug[..., :-1] / (o_aug[..., -1:] + eps)


def outer(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(..., K), (..., V) -> (..., K, V)."""
    return k[..., :, None] * v[..., None, :]


def to_chunks(x: torch.Tensor, C: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, L, H, ...) -> (B, H, N, C, ...) (a permuted view when no padding is needed),
    zero-padded to N = ceil(L / C) whole chunks, cast to dtype when given.

    Zero padding at the end is harmless: k = 0 and beta = 0 add nothing to the state,
    g = 0 leaves it undecayed, and the padded outputs are cut off (from_chunks).
    """
    if dtype is not None:
        x = x.to(dtype)
    B, L = x.shape[:2]
    pad = (-L) % C
    if pad:
        x = torch.cat([x, x.new_zeros(B, pad, *x.shape[2:])], dim=1)
    return x.reshape(B, (L + pad) // C, C, *x.shape[2:]).movedim(3, 1)


def from_chunks(o: torch.Tensor, L: int) -> torch.Tensor:
    """(B, H, N, C, V) -> (B, L, H, V): the inverse of to_chunks, padding cut off."""
    B, H, N, C, V = o.shape
    return o.movedim(1, 3).reshape(B, N * C, H, V)[:, :L]


def check_shapes(q, k, v, *, initial_state=None, state_extra: int = 0, **per_head) -> None:
    """One-line ValueError for inconsistent shapes.

    initial_state, when given, must be (B, H, K, V + state_extra); per_head:
    name=(tensor or None, expected shape).
    """
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"shape mismatch: expected q, k (B, T, H, K) and v (B, T, H, V); got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "(repeat GQA key/value heads before the call)")
    B, T, H, K = q.shape
    want = (B, H, K, v.shape[-1] + state_extra)
    if initial_state is not None and tuple(initial_state.shape) != want:
        raise ValueError(f"initial_state must be {want}, got {tuple(initial_state.shape)}")
    for name, (x, shape) in per_head.items():
        if x is not None and tuple(x.shape) != tuple(shape):
            raise ValueError(f"{name} must be {tuple(shape)}, got {tuple(x.shape)}")


def check_positive(**sizes) -> None:
    """ValueError unless every size (chunk, block, window) is >= 1."""
    bad = {n: s for n, s in sizes.items() if int(s) < 1}
    if bad:
        raise ValueError(f"{' and '.join(bad)} must be >= 1, got "
                         + ", ".join(f"{n}={s}" for n, s in bad.items()))


def segmented(run, seg: int, state, inputs, params=()):
    """run(parts, state) -> (o, state) over the time segments of `inputs`, the state carried:
    returns the whole output (B, T, ...) in o's dtype and the final state.

    inputs: (B, T, ...) tensors or None, cut into `seg`-token parts along dim 1; state: a
    tensor or None; params: leaves `run` reads besides the inputs (a module's parameters),
    so that their gradients come back. The segments write into one preallocated output.
    Under autograd (`_Segments`) only the inputs and the state at each segment start are
    kept; the backward walks the segments in reverse, recomputes each one with autograd,
    pulls the start state's gradient into the segment before and writes each input's
    gradient into one buffer (no per-segment full-length gradient); parameter gradients
    accumulate. Peak: inputs, output, T / seg states and one segment's graph. Without a
    gradient to compute it is a plain loop, and `state` may then be any structure (a
    tuple of states, say)."""
    leaves = [t for t in (*inputs, *params, state) if torch.is_tensor(t)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in leaves):
        return _Segments.apply(run, seg, len(inputs), state, *inputs, *params)
    out, state, _ = _scan(run, seg, state, inputs)
    return out, state


def _cut(xs, t0: int, seg: int):
    return [None if x is None else x[:, t0:t0 + seg] for x in xs]


def _scan(run, seg: int, state, inputs):
    """The forward of `segmented`: (output, final state, the state at each segment start)."""
    T = next(x for x in inputs if x is not None).shape[1]
    out, starts = None, []
    for t0 in range(0, T, seg):
        starts.append(state)
        o, state = run(_cut(inputs, t0, seg), state)
        if out is None:
            out = o.new_empty(o.shape[0], T, *o.shape[2:])
        out[:, t0:t0 + seg] = o
    return out, state, starts


class _Segments(torch.autograd.Function):
    """The recomputing segment scan of `segmented`."""

    @staticmethod
    def forward(ctx, run, seg, n_inputs, state, *tensors):
        inputs, params = tensors[:n_inputs], tensors[n_inputs:]
        out, state, starts = _scan(run, seg, state, inputs)
        ctx.set_materialize_grads(False)
        ctx.run, ctx.seg, ctx.n_inputs, ctx.params = run, seg, n_inputs, params
        ctx.save_for_backward(*inputs, *starts)
        return out, state

    @staticmethod
    def backward(ctx, d_out, d_state):
        saved, n, seg, params = ctx.saved_tensors, ctx.n_inputs, ctx.seg, ctx.params
        inputs, starts = saved[:n], saved[n:]
        need_s0, need_in, need_p = (ctx.needs_input_grad[3], ctx.needs_input_grad[4:4 + n],
                                    ctx.needs_input_grad[4 + n:])
        d_in, d_p = [None] * n, [None] * len(params)
        for idx in reversed(range(len(starts))):
            t0 = idx * seg
            with torch.enable_grad():
                part = [None if x is None else x.detach().requires_grad_(nd)
                        for x, nd in zip(_cut(inputs, t0, seg), need_in)]
                s_in = starts[idx]
                if s_in is not None:
                    s_in = s_in.detach().requires_grad_(idx > 0 or need_s0)
                o, s_out = ctx.run(part, s_in)
                ys = [(o, None if d_out is None else d_out[:, t0:t0 + seg]), (s_out, d_state)]
                ys = [(y, d) for y, d in ys if d is not None and y.requires_grad]
                wrt = [t for t in [*part, s_in, *params] if t is not None and t.requires_grad]
                got = iter(torch.autograd.grad([y for y, _ in ys], wrt, [d for _, d in ys],
                                               allow_unused=True) if ys else [None] * len(wrt))
            for i, t in enumerate(part):
                if t is not None and t.requires_grad and (g := next(got)) is not None:
                    if d_in[i] is None:
                        d_in[i] = torch.zeros_like(inputs[i], memory_format=torch.contiguous_format)
                    d_in[i][:, t0:t0 + seg] = g
            d_state = next(got) if s_in is not None and s_in.requires_grad else None
            for i, p in enumerate(params):
                if p.requires_grad and (g := next(got)) is not None:
                    d_p[i] = g if d_p[i] is None else d_p[i].add_(g)
        return (None, None, None, d_state if need_s0 else None,
                *[d if nd else None for d, nd in zip(d_in, need_in)],
                *[d if nd else None for d, nd in zip(d_p, need_p)])
