"""What every op's Triton form shares: tile addressing, launch configs, dot precision.

Layout everywhere: x (B, T, H, D) contiguous, element (b, t, h, d) at ((b*T + t)*H + h)*D + d;
states (B, H, K, V) fp32 contiguous. Row offsets are computed in int64 (B*T*H*D passes
2**31 at 2M tokens).

Launch configs: in the Triton CPU interpreter (TRITON_INTERPRET=1) there is no autotuner,
so every kernel runs one fixed config. On GPU the same fixed config is used
unless LINBENCH_TRITON_AUTOTUNE=1, which autotunes over a small list (keyed on K, V).
Both environment variables are read once, at import.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = (not INTERPRET) and os.environ.get("LINBENCH_TRITON_AUTOTUNE") == "1"


@triton.jit
def mm(a, b, PREC: tl.constexpr):
    """a @ b with fp32 accumulation; PREC "ieee" keeps fp32 operands out of TF32."""
    return tl.dot(a, b, input_precision=PREC)


def pow2(n: int, lo: int = 16) -> int:
    """Smallest power of two >= n and >= lo (tl.dot needs every dim >= 16)."""
    return max(lo, triton.next_power_of_2(n))


def dot_precision(dtype: torch.dtype) -> str:
    """Tensor-core dot precision. fp32 inputs: "tf32x3" (three tf32 products, about fp32
    accuracy; "ieee" compiles 2-4x slower and runs on CUDA cores). Half inputs: "tf32", whose
    10-bit mantissa is as fine as the inputs' own (bf16: 7 bits, fp16: 10 bits).
    The interpreter ignores it (numpy fp32)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


class _Fixed:
    """Stands in for triton.autotune: launches with one fixed config."""

    def __init__(self, fn, meta: dict, num_warps: int, num_stages: int):
        self.fn, self.meta = fn, meta
        self.opts = {} if INTERPRET else {"num_warps": num_warps, "num_stages": num_stages}

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            meta = dict(self.meta)
            g = grid(meta) if callable(grid) else grid
            return self.fn[g](*args, **kwargs, **meta, **self.opts)
        return launch


def tuned(name: str, fixed: int, choices=(16, 32, 64), key=("K", "V"), restore=(), zero=()):
    """Decorator: block size `name` (a constexpr of the kernel) is `fixed` (8 warps,
    2 stages) unless autotuning is on, then it is tuned over `choices` x {4, 8} warps.
    8 warps: at K = V = 128 the kernels spill registers with 4 (ptxas, sm_90a).
    `restore`: arguments the kernel updates in place (restored between tuning runs);
    `zero`: outputs whose unwritten slots must read 0 (zeroed before every run)."""
    def wrap(fn):
        if not AUTOTUNE:
            return _Fixed(fn, {name: fixed}, num_warps=8, num_stages=2)
        configs = [triton.Config({name: c}, num_warps=w, num_stages=2)
                   for c in choices for w in (4, 8)]
        return triton.autotune(configs, key=list(key), restore_value=list(restore) or None,
                               reset_to_zero=list(zero) or None)(fn)
    return wrap


@triton.jit
def tile(b, h, t0, T, H, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, d0):
    """Offsets (BT, BD) and mask of rows t0.. and columns d0.. of a (B, T, H, D) tensor."""
    t = t0 + tl.arange(0, BT)
    d = d0 + tl.arange(0, BD)
    row = ((b * T + t).to(tl.int64) * H + h) * D  # (BT,)
    return row[:, None] + d[None, :], (t < T)[:, None] & (d < D)[None, :]


@triton.jit
def load_tile(x, b, h, t0, T, H, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, d0):
    """Rows t0.. and columns d0.. of x (B, T, H, D) as fp32, zero outside the tensor."""
    off, mask = tile(b, h, t0, T, H, D, BT, BD, d0)
    return tl.load(x + off, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_tile(x, val, b, h, t0, T, H, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, d0):
    off, mask = tile(b, h, t0, T, H, D, BT, BD, d0)
    tl.store(x + off, val.to(x.dtype.element_ty), mask=mask)


@triton.jit
def state_tile(bh, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, k0, v0):
    """Offsets (BK, BV) and mask of a block of a (B, H, K, V) state, bh = b * H + h."""
    i = k0 + tl.arange(0, BK)
    j = v0 + tl.arange(0, BV)
    return bh * K * V + i[:, None] * V + j[None, :], (i < K)[:, None] & (j < V)[None, :]


@triton.jit
def init_state(x, bh, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               k0, v0, LOAD: tl.constexpr):
    """A (BK, BV) fp32 block of a (B, H, K, V) state: x's block when LOAD, else zeros.
    Also returns the block's offsets and mask (to store a final state or its gradient)."""
    off, mask = state_tile(bh, K, V, BK, BV, k0, v0)
    S = tl.zeros((BK, BV), tl.float32)
    if LOAD:
        S += tl.load(x + off, mask=mask, other=0.0)
    return S, off, mask
