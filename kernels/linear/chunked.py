"""Chunked causal linear attention in torch, linear in T: the gated chunk scan that
linear (no decay, fixed per-head decay, normalizer) and gla (per-channel gates) share.

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
A scalar gate gives the (C, C) weights directly; per-channel gates need exp(G_i - G_j)
per channel, which linbench.kernels.gla.chunked supplies as the `intra` of `scan`.

Memory. The sequence is processed in segments of L tokens (L * B * H ~ `budget`
token-heads, whole chunks: 2,048 tokens for B1 H8 at SEGMENT_TOKEN_HEADS). The forward
keeps one state and one segment of intermediates. For training, the segment scan
(`linbench.kernels.common.segmented`, a torch.autograd.Function) saves only its inputs and the state at each segment boundary
(T / L states: 512 states of (H, K, V) at T = 1M for B1 H8, versus 16,384 per-chunk
states); its backward walks the segments in reverse, recomputes each one with autograd
and pulls the gradient of the state at the segment start into the previous segment (a
checkpointed reverse sweep: each segment runs forward twice and backward once). Peak
memory: inputs + T / L states + one segment's graph; no per-chunk state for the whole
sequence ever exists.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from linbench.kernels.common import (acc_dtype, augment_ones, check_positive, check_shapes,
                                     default_scale, from_chunks, normalize_output, segmented,
                                     to_chunks)

# Token-heads (B * H * L) per segment. Tests shrink it to force many segments.
SEGMENT_TOKEN_HEADS = 1 << 14


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


def _segment(q, k, v, g, S, scale: float, C: int, intra):
    """One segment of whole chunks, differentiable.

    q, k: (B, L, H, K); v: (B, L, H, V); g: None | (B, L, H, 1) scalar | (B, L, H, K)
    per-channel log-gates (then intra(qc, kc, G) gives the (.., C, C) weights); S:
    (B, H, K, V) state before the segment.
    Returns o in chunk layout (B, H, n, C, V) (padded) and the state after the segment.
    """
    qc, kc, vc = (to_chunks(x, C).contiguous() for x in (q, k, v))  # (B, H, n, C, D)
    if g is None:
        a = (qc @ kc.transpose(-1, -2)).tril_()  # (B, H, n, C, C)
        ds = kc.transpose(-1, -2) @ vc  # (B, H, n, K, V): each chunk's contribution
        states, S_new = _carry(S, ds, None)
        o = (a @ vc).add_(qc @ states)
    else:
        gc = to_chunks(g, C).contiguous()  # (B, H, n, C, 1 | K)
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
            a = intra(qc, kc, G)
        ds = (kc * torch.exp(to_end)).transpose(-1, -2) @ vc  # (B, H, n, K, V)
        states, S_new = _carry(S, ds, torch.exp(g_end).transpose(-1, -2))  # decay (.., 1 | K, 1)
        o = (a @ vc).add_((qc * torch.exp(G)) @ states)
    return o.mul_(scale), S_new


def scan(q, k, v, g, initial_state, scale, C, budget=None, intra=None):
    """The chunk scan in the compute dtype (acc_dtype of q), each segment cast to it (no
    whole-sequence copy); returns (o in v's dtype, final state in the compute dtype).

    g: None, (B, T, H, 1) scalar or (B, T, H, K) per-channel log-gates (with `intra`);
    budget: token-heads per segment (default SEGMENT_TOKEN_HEADS).
    """
    check_positive(chunk_size=C)
    check_shapes(q, k, v)
    C = int(C)
    B, T, H, K = q.shape
    budget = SEGMENT_TOKEN_HEADS if budget is None else budget
    seg = C * max(1, budget // (B * H * C))
    dt = acc_dtype(q)
    s0 = torch.zeros(B, H, K, v.shape[-1], dtype=dt, device=q.device)
    if initial_state is not None:
        s0 = initial_state.to(dt).expand_as(s0)

    def run(parts, S):  # one segment, cast to the compute dtype; o back in v's dtype
        qs, ks, vs, gs = (None if x is None else x.to(dt) for x in parts)
        oc, S = _segment(qs, ks, vs, gs, S, scale, C, intra)
        return from_chunks(oc, qs.shape[1]).to(v.dtype), S
    return segmented(run, seg, s0, [q, k, v, g])


def linear_attention_chunked(q, k, v, *, decay=None, normalize=False, scale=None, eps=1e-6,
                             initial_state=None, output_final_state=False, chunk_size=64):
    """Causal linear attention, chunked; same contract as
    linbench.kernels.linear.reference.linear_attention_ref.

    q, k: (B, T, H, K); v: (B, T, H, V); decay: (H,) fixed log-decay <= 0 (differentiable);
    normalize: v gets a ones column, state (B, H, K, V + 1), o = num / (den + eps).
    Returns (o (B, T, H, V) in v's dtype, fp32 final state or None).
    Memory: see the module docstring (inputs + one state per segment + one segment).
    """
    dt, out_dtype = acc_dtype(q), v.dtype
    scale = default_scale(q, scale)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if normalize:
        v = augment_ones(v)  # (B, T, H, V + 1)
    B, T, H, _ = q.shape
    g = None if decay is None else decay.to(dt).view(1, 1, H, 1).expand(B, T, H, 1)
    o, final = scan(q, k, v, g, initial_state, scale, chunk_size)
    if normalize:
        o = normalize_output(o, eps)
    return o.to(out_dtype), (final.float() if output_final_state else None)
