"""Sliding-window softmax and the LoLCATs window + linear hybrid, blockwise in torch,
streamed over the sequence.

Query blocks of `block` tokens attend to the keys of their band only: block b (queries
t0 .. t0 + block - 1) scores block + W keys (W = min(window, T)), never T x T. Blocks
run in groups of at most GROUP_SCORE_ELEMENTS score elements, one group at a time
(linbench.kernels.window.stream: each group's slices are cast to the compute dtype, its
output written into an output in v's dtype, and the backward recomputes the group), so
peak memory is the inputs, the output and O(group x (block + W)), in the forward and in
the backward, at any T.

The hybrid (LoLCATs, arXiv 2410.10254, eq. 6): query i sees the last `window` keys with
weight gamma_h exp(scale q_i.k_j - m_i) (m_i the window max, gradient flowing through it
as in the reference) and older keys j <= i - window with weight fq_i.fk_j, one shared
normalizer. In a block's band the older keys are the ones left of the window (a masked
(block, block + W) product); keys older than the band are in a state S = sum fk_j [v_j, 1]
(F x (V + 1)) per block, an exclusive cumulative sum of the blocks' contributions within
the group, carried from group to group.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from linbench.kernels.common import acc_dtype, augment_ones, check_positive, check_shapes, default_scale
from linbench.kernels.window.recurrent import window_cache, window_state
from linbench.kernels.window.stream import streamed

# Score elements (B * H * blocks * block * keys) per group of query blocks.
GROUP_SCORE_ELEMENTS = 1 << 22


def check_features(q, fq, fk) -> None:
    """The hybrid's features: fq, fk (B, T, H, F) beside q (B, T, H, K), or both feature
    maps (callables (B, n, H, K) -> (B, n, H, F), applied group by group)."""
    if callable(fq) and callable(fk):
        return
    if callable(fq) or callable(fk):
        raise ValueError("fq and fk must both be tensors or both be feature maps")
    if fq.shape != fk.shape or fq.dim() != 4 or fq.shape[:3] != q.shape[:3]:
        raise ValueError(f"feature shape mismatch: fq {tuple(fq.shape)}, fk {tuple(fk.shape)} "
                         f"(expected (B, T, H, F) beside q {tuple(q.shape)})")


def feature_dim(q, fq) -> int:
    """F of the features fq (a tensor, or a feature map tried on one token)."""
    if not callable(fq):
        return fq.shape[-1]
    with torch.no_grad():
        return fq(q[:, :1]).shape[-1]


def group_tokens(B: int, H: int, block: int, W: int) -> int:
    """Query tokens per group: whole blocks, about GROUP_SCORE_ELEMENTS scores."""
    return block * max(1, GROUP_SCORE_ELEMENTS // (B * H * block * (block + W)))


def _blocks(x, front: int, back: int, bq: int, W: int):
    """Keys (B, lead + L, H, D) -> bands (B, nb, H, D, bq + W): zero padded to W keys before
    the group and whole blocks after; block b's band starts W keys before its queries."""
    return F.pad(x, (0, 0, 0, 0, front, back)).unfold(1, bq + W, bq)


def _group(q, k, v, fq, fk, gamma, S, lead, *, W, bq, scale, eps, dt):
    """One group (linbench.kernels.window.stream): q (B, L, H, K), keys (B, lead + L, H, .).

    Key c of block b's band (c = 0 .. bq + W - 1) is W - c positions before query 0 of
    the block; query r sees it in the window when r < c <= r + W and linearly when c <= r.
    Returns y (B, L, H, V) in dt and (hybrid) the state after the group.
    """
    B, L, H, K = q.shape
    V = v.shape[-1]
    nb = -(-L // bq)
    front, back = W - lead, nb * bq - L
    qb = F.pad(q.to(dt), (0, 0, 0, 0, 0, back)).view(B, nb, bq, H, K)
    kb, vb = _blocks(k.to(dt), front, back, bq, W), _blocks(v.to(dt), front, back, bq, W)
    s = torch.einsum("bnrhk,bnhkc->bnhrc", qb * scale, kb)  # (B, nb, H, bq, bq + W)
    r = torch.arange(bq, device=q.device)[:, None]
    c = torch.arange(bq + W, device=q.device)[None, :]
    real = torch.arange(nb, device=q.device)[:, None] * bq + c >= front  # (nb, bq + W)
    win = (c > r) & (c <= r + W) & real[:, None]  # (nb, bq, bq + W)
    s = s.masked_fill(~win[None, :, None], float("-inf"))
    if fq is None:
        o = torch.einsum("bnhrc,bnhvc->bnrhv", s.softmax(-1), vb)
        return o.reshape(B, nb * bq, H, V)[:, :L], None
    Fd = fq.shape[-1]
    fqb = F.pad(fq.to(dt), (0, 0, 0, 0, 0, back)).view(B, nb, bq, H, Fd)
    fk_p = F.pad(fk.to(dt), (0, 0, 0, 0, front, back))  # (B, W + nb * bq, H, F)
    a_lin = torch.einsum("bnrhf,bnhfc->bnhrc", fqb, fk_p.unfold(1, bq + W, bq)) * (c <= r)
    a = torch.exp(s - s.amax(-1, keepdim=True)) * gamma.to(dt)[:, None, None] + a_lin
    num = torch.einsum("bnhrc,bnhvc->bnrhv", a, vb)  # (B, nb, bq, H, V)
    den = a.sum(-1).transpose(2, 3)[..., None]  # (B, nb, bq, H, 1)
    # keys older than each band: block b adds its band's first bq keys for the next block
    v1 = augment_ones(F.pad(v.to(dt), (0, 0, 0, 0, front, back))[:, :nb * bq])
    ds = torch.einsum("bnchf,bnchv->bnhfv", fk_p[:, :nb * bq].view(B, nb, bq, H, Fd),
                      v1.view(B, nb, bq, H, V + 1))  # (B, nb, H, F, V + 1)
    ends = S[:, None] + ds.cumsum(1)  # state after each block
    starts = torch.cat([S[:, None], ends[:, :-1]], 1)
    inter = torch.einsum("bnrhf,bnhfv->bnrhv", fqb, starts)  # (B, nb, bq, H, V + 1)
    y = (num + inter[..., :V]) / (den + inter[..., V:] + eps)
    return y.reshape(B, nb * bq, H, V)[:, :L], ends[:, -1]


def _run(q, k, v, fq, fk, gamma, *, window, scale, block, eps=0.0, initial_kv=None):
    B, T, H, K = q.shape
    if T == 0:
        return v.new_zeros(v.shape)
    W, bq = min(int(window), T), int(block)
    dt = acc_dtype(q)
    fn = functools.partial(_group, W=W, bq=bq, scale=scale, eps=eps, dt=dt)
    s0 = None if fq is None else q.new_zeros(B, H, feature_dim(q, fq), v.shape[-1] + 1, dtype=dt)
    if s0 is not None and initial_kv is not None:
        s0 = initial_kv.to(dt)
    return streamed(fn, q, k, v, fq, fk, gamma, s0, window=W, group=group_tokens(B, H, bq, W))


def sliding_window_attention_chunked(q, k, v, *, window=64, scale=None, block=64,
                                     output_final_state=False):
    """Softmax attention over the last `window` keys; same contract as
    linbench.kernels.window.reference.sliding_window_attention_ref (returns o). With
    output_final_state=True returns (o, WindowCache) for decoding.
    """
    check_positive(window=window, block=block)
    check_shapes(q, k, v)
    o = _run(q, k, v, None, None, None, window=window, scale=default_scale(q, scale), block=block)
    return (o, window_cache(k, v, window)) if output_final_state else o


def window_linear_attention_chunked(q, k, v, fq, fk, *, window=64, gamma, scale=None, eps=1e-6,
                                    output_final_state=False, block=64, initial_kv=None):
    """LoLCATs hybrid; same contract as
    linbench.kernels.window.reference.window_linear_attention_ref (returns y).

    q, k: (B, T, H, K); v: (B, T, H, V); fq, fk: (B, T, H, F) feature-mapped q, k, or the
    feature maps themselves (applied group by group: no (B, T, H, F) tensor at all);
    gamma: (H,) > 0 (the window weight). With output_final_state=True returns (y, WindowState) where
    kv (B, H, F, V + 1) fp32 sums fk_j [v_j, 1] over the tokens out of the window.
    initial_kv: that sum over keys before q (a continued prefill; default zeros).
    """
    check_positive(window=window, block=block)
    check_shapes(q, k, v)
    check_features(q, fq, fk)
    y = _run(q, k, v, fq, fk, gamma, window=window, scale=default_scale(q, scale), block=block,
             eps=eps, initial_kv=initial_kv)
    return (y, window_state(k, v, fk, window)) if output_final_state else y
