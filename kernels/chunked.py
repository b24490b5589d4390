"""Chunked linear attention in torch (decay / normalizer / per-channel gates), linear in T.

Algorithm (Lightning Attention-2, arXiv 2401.04658; GLA, arXiv 2312.06635 sec. 4): cut T
into chunks of C tokens. Inside a chunk the causal interaction is a masked (C, C) product
(intra); across chunks a single state S (B, H, K, V) carries the past (inter):

    o_c   = (Q_c * exp(G)) S_c + [(Q_c K_c^T) * exp(G_i - G_j)]_{j<=i} V_c
    S_c+1 = exp(G_C) S_c + (K_c * exp(G_C - G))^T V_c

with G the in-chunk cumulative log-gate (a per-head constant decay is a gate that does not
depend on t; no decay means G = 0). Every exponent is <= 0, so nothing overflows however
close to 0 the gates are; exp(G_C - G_j) is taken as an exclusive suffix sum and the
diagonal weight exp(G_i - G_i) is exactly 1, so the gate gradient has no large +/-
cancellation (fp32 gate gradients stay within ~1e-5 of fp64 even for gates of e^-8).
Per-channel gates (GLA) need exp(G_i - G_j) per channel: the chunk is cut into sub-blocks
of s ~ sqrt(C) tokens (8 for C = 64); diagonal sub-blocks use the pairwise (s, s, K) form
with a -inf mask, the others factor through a reference point (the last token before the
query's sub-block), which keeps both factors <= 1.

Memory. The sequence is processed in segments of L tokens (L * B * H ~ SEGMENT_TOKEN_HEADS,
whole chunks: 2,048 tokens for B1 H8). The forward keeps one state and one segment of
intermediates. For training, `_ChunkScan` (a torch.autograd.Function) saves only its
inputs and the state at each segment boundary (T / L states: 512 states of (H, K, V) at
T = 1M for B1 H8, versus 16,384 per-chunk states); its backward walks the segments in
reverse, recomputes each one with autograd and pulls the gradient of the state at the
segment start into the previous segment (a checkpointed reverse sweep: each segment runs
forward twice and backward once). Peak memory: inputs + T / L states + one segment's
graph; no per-chunk state for the whole sequence ever exists.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from linbench.kernels.reference import acc_dtype, normalize_output

# Token-heads (B * H * L) per segment. Per-channel gates build (s, s, K) pairwise
# blocks, hence a smaller budget. Tests shrink these to force many segments.
SEGMENT_TOKEN_HEADS = 1 << 14
SEGMENT_TOKEN_HEADS_CHANNEL = 1 << 12


def _chunks(x: torch.Tensor, C: int) -> torch.Tensor:
    """(B, L, H, D) -> contiguous (B, H, n, C, D), zero-padded to whole chunks.

    Zero padding at the end is harmless: k = 0 adds nothing to the state, g = 0 leaves it
    undecayed, and the padded outputs are cut off.
    """
    B, L, H, D = x.shape
    pad = (-L) % C
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
    return x.reshape(B, (L + pad) // C, C, H, D).permute(0, 3, 1, 2, 4).contiguous()


def _unchunk(o: torch.Tensor, L: int) -> torch.Tensor:
    """(B, H, n, C, V) -> (B, L, H, V)."""
    B, H, n, C, V = o.shape
    return o.permute(0, 2, 3, 1, 4).reshape(B, n * C, H, V)[:, :L]


def _sub_block(C: int) -> int:
    """Diagonal sub-block size s for per-channel gates: the divisor of C minimizing the
    elementwise work per token, s (pairwise) + C / s (reference-point factors)."""
    return min((d for d in range(1, C + 1) if C % d == 0), key=lambda d: (d + C // d, -d))


def _intra_channel(qc, kc, G):
    """(Q K^T * exp(G_i - G_j))_{j<=i} with per-channel G, (B, H, n, C, C), overflow-free."""
    B, H, n, C, K = qc.shape
    sub = _sub_block(C)
    m = C // sub
    qb, kb, Gb = (x.view(B, H, n, m, sub, K) for x in (qc, kc, G))
    below = torch.ones(sub, sub, dtype=torch.bool, device=qc.device).tril(-1)
    diff = Gb[..., :, None, :] - Gb[..., None, :, :]  # (B, H, n, m, sub, sub, K): G_i - G_j
    pair = diff.masked_fill_(~below[..., None], float("-inf")).exp_()
    a_diag = (qb[..., :, None, :] * pair).mul_(kb[..., None, :, :]).sum(-1)  # (.., m, sub, sub)
    a_diag = a_diag + torch.diag_embed((qb * kb).sum(-1))  # i = j: weight 1, no gate gradient
    if m == 1:
        return a_diag.view(B, H, n, C, C)
    # Off-diagonal sub-blocks: reference point r_a = last token before sub-block a.
    g_ref = F.pad(Gb[..., :-1, -1, :], (0, 0, 1, 0))  # (B, H, n, m, K): G_{r_a}, 0 for a = 0
    q_ref = qb * torch.exp(Gb - g_ref[..., None, :])  # (B, H, n, m, sub, K), exponent <= 0
    pos = torch.arange(C, device=qc.device)
    before = pos[None, :] < pos[:m, None] * sub  # (m, C): key j precedes sub-block a
    k_exp = g_ref[..., None, :] - G[:, :, :, None]  # (B, H, n, m, C, K), <= 0 where j <= r_a
    k_ref = k_exp.masked_fill_(~before[..., None], float("-inf")).exp_() * kc[:, :, :, None]
    a = (q_ref @ k_ref.transpose(-1, -2)).view(B, H, n, m, sub, m, sub)
    eye = torch.eye(m, dtype=torch.bool, device=qc.device)[:, None, :, None]  # (m, 1, m, 1)
    return torch.where(eye, a_diag[..., :, :, None, :], a).view(B, H, n, C, C)


def _carry(S, ds, decay):
    """States at each chunk start, (B, H, n, K, V), and the state after the last chunk.

    S_{c+1} = decay_c * S_c + ds_c. A Python loop over the chunks of the segment: on CPU
    it is ~10x faster than cumsum along a strided axis, and it also covers the decay.
    """
    states = []
    for c, d in enumerate(ds.unbind(2)):
        states.append(S)
        S = S + d if decay is None else torch.addcmul(d, S, decay[:, :, c])
    return torch.stack(states, 2), S


def _segment(q, k, v, g, S, scale: float, C: int):
    """One segment of whole chunks, differentiable.

    q, k: (B, L, H, K); v: (B, L, H, V); g: None | (B, L, H, 1) scalar | (B, L, H, K)
    per-channel log-gates; S: (B, H, K, V) state before the segment.
    Returns o in chunk layout (B, H, n, C, V) (padded) and the state after the segment.
    """
    qc, kc, vc = _chunks(q, C), _chunks(k, C), _chunks(v, C)  # (B, H, n, C, D)
    if g is None:
        a = (qc @ kc.transpose(-1, -2)).tril_()  # (B, H, n, C, C)
        ds = kc.transpose(-1, -2) @ vc  # (B, H, n, K, V): each chunk's contribution
        states, S_new = _carry(S, ds, None)
        o = (a @ vc).add_(qc @ states)
    else:
        gc = _chunks(g, C)  # (B, H, n, C, 1 | K)
        G = gc.cumsum(3)  # log of the gate product from the chunk start to i (inclusive)
        g_end = G[:, :, :, -1:]  # (B, H, n, 1, 1 | K)
        # g_end - G_j as an exclusive suffix sum: same value, no +/- gradient cancellation
        to_end = F.pad(gc.flip(3)[:, :, :, :-1].cumsum(3), (0, 0, 1, 0)).flip(3)
        if G.shape[-1] == 1:
            below = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
            diff = G - G.transpose(-1, -2)  # (B, H, n, C, C): G_i - G_j
            eye = torch.eye(C, dtype=q.dtype, device=q.device)  # i = j: weight 1, no gate gradient
            a = (qc @ kc.transpose(-1, -2)).mul_(diff.masked_fill_(~below, float("-inf")).exp_() + eye)
        else:
            a = _intra_channel(qc, kc, G)
        ds = (kc * torch.exp(to_end)).transpose(-1, -2) @ vc  # (B, H, n, K, V)
        states, S_new = _carry(S, ds, torch.exp(g_end).transpose(-1, -2))  # decay (.., 1 | K, 1)
        o = (a @ vc).add_((qc * torch.exp(G)) @ states)
    return o.mul_(scale), S_new


class _ChunkScan(torch.autograd.Function):
    """Segments in order forward; reverse sweep with per-segment recompute backward."""

    @staticmethod
    def forward(ctx, q, k, v, g, s0, scale, C, seg):
        B, T, H, _ = q.shape
        o = v.new_empty(B, T, H, v.shape[-1])
        S, starts = s0, []
        for t0 in range(0, T, seg):
            sl = slice(t0, t0 + seg)
            starts.append(S)
            oc, S = _segment(q[:, sl], k[:, sl], v[:, sl],
                             None if g is None else g[:, sl], S, scale, C)
            o[:, sl] = _unchunk(oc, o[:, sl].shape[1])
        ctx.save_for_backward(q, k, v, g, *starts)
        ctx.cfg = (scale, C, seg)
        return o, S

    @staticmethod
    def backward(ctx, do, dS):
        q, k, v, g, *starts = ctx.saved_tensors
        scale, C, seg = ctx.cfg
        need = ctx.needs_input_grad[:5]
        xs = (q, k, v, g)
        grads = [torch.zeros_like(x, memory_format=torch.contiguous_format) if x is not None and nd
                 else None for x, nd in zip(xs, need)]
        for idx in reversed(range(len(starts))):
            sl = slice(idx * seg, (idx + 1) * seg)
            with torch.enable_grad():
                part = [None if x is None else x[:, sl].detach().requires_grad_(nd)
                        for x, nd in zip(xs, need)]
                s_in = starts[idx].detach().requires_grad_(idx > 0 or need[4])
                o, s_out = _segment(*part, s_in, scale, C)
                wrt = [t for t in part + [s_in] if t is not None and t.requires_grad]
                outs = [(t, d) for t, d in ((o, _chunks(do[:, sl], C)), (s_out, dS)) if t.requires_grad]
                ys, dys = zip(*outs)
                got = iter(torch.autograd.grad(ys, wrt, dys, allow_unused=True))
            for i, t in enumerate(part):
                if t is not None and t.requires_grad:
                    d = next(got)
                    if d is not None:
                        grads[i][:, sl] = d
            dS = next(got) if s_in.requires_grad else None
        return (*grads, dS if need[4] else None, None, None, None)


def _scan(q, k, v, g, initial_state, scale, C):
    """Run the chunk scan in the compute dtype; returns (o, final state) in that dtype."""
    if int(C) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {C}")
    C = int(C)
    B, T, H, K = q.shape
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "(repeat GQA key/value heads before the call)")
    budget = SEGMENT_TOKEN_HEADS_CHANNEL if g is not None and g.shape[-1] > 1 else SEGMENT_TOKEN_HEADS
    seg = C * max(1, budget // (B * H * C))
    s0 = torch.zeros(B, H, K, v.shape[-1], dtype=q.dtype, device=q.device)
    if initial_state is not None:
        s0 = initial_state.to(q.dtype).expand_as(s0)
    return _ChunkScan.apply(q, k, v, g, s0, scale, C, seg)


def linear_attention_chunked(q, k, v, *, decay=None, normalize=False, scale=None, eps=1e-6,
                             initial_state=None, output_final_state=False, chunk_size=64):
    """Causal linear attention, chunked; same contract as reference.linear_attention_ref.

    q, k: (B, T, H, K); v: (B, T, H, V); decay: (H,) fixed log-decay <= 0 (differentiable);
    normalize: v gets a ones column, state (B, H, K, V + 1), o = num / (den + eps).
    Returns (o (B, T, H, V) in v's dtype, fp32 final state or None).
    Memory: see the module docstring (inputs + one state per segment + one segment).
    """
    dt, out_dtype = acc_dtype(q), v.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if normalize:
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # (B, T, H, V + 1)
    B, T, H, _ = q.shape
    g = None if decay is None else decay.to(dt).view(1, 1, H, 1).expand(B, T, H, 1)
    o, final = _scan(q, k, v, g, initial_state, scale, chunk_size)
    if normalize:
        o = normalize_output(o, eps)
    return o.to(out_dtype), (final.float() if output_final_state else None)


def gated_linear_attention_chunked(q, k, v, g, *, scale=None, initial_state=None,
                                   output_final_state=False, chunk_size=64):
    """GLA, chunked; same contract as reference.gated_linear_attention_ref.

    g: (B, T, H, K) per-channel log-gates <= 0 (gates near 0 and near 1 are both exact:
    no exp of a positive exponent is ever taken). Returns (o, fp32 final state or None).
    """
    dt, out_dtype = acc_dtype(q), v.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if g.shape != q.shape:
        raise ValueError(f"g must have q's shape {tuple(q.shape)}, got {tuple(g.shape)}")
    o, final = _scan(q.to(dt), k.to(dt), v.to(dt), g.to(dt), initial_state, scale, chunk_size)
    return o.to(out_dtype), (final.float() if output_final_state else None)


__all__ = ["linear_attention_chunked", "gated_linear_attention_chunked"]
