"""The one FLOP / bytes-moved model of a kernel call and the peaks of known GPUs: what the
GPU rows of `linbench speed` and the device check (`python -m linbench.kernels.check`)
report as TFLOP/s, GB/s and percent of peak.

FLOPs of one call, K = V = D:
  softmax  causal softmax attention, forward 2 B T^2 H D (QK^T and PV, causal half);
  linear   chunked linear attention with chunk C, forward B T H (2 C (K + V) + 4 K V)
           (intra-chunk QK^T and AV, then the state's K^T V and Q S), applied to every
           linear-state kernel (linear, GLA, delta rule) as the common yardstick.
Forward + backward: 3.5x the forward for softmax (backward 2.5x, FlashAttention-2's
count), 3x for the linear forms (backward 2x).
Bytes: the minimum traffic, each input read and each output written once (q, k, v, o
forward; the backward also reads q, k, v, o, do and writes dq, dk, dv); intermediate
state traffic is not counted.
"""
from __future__ import annotations

import re

import torch

# Dense peaks per device-name pattern: (bf16/fp16 tensor-core TFLOP/s, fp32 TFLOP/s, TB/s).
# H100 SXM and H200: NVIDIA H100/H200 datasheets (989 dense bf16, 67 fp32; 3.35 / 4.8 TB/s).
DEVICE_PEAKS = [
    (r"H200", (989.0, 67.0, 4.8)),
    (r"H100.*(PCIe)", (756.0, 51.0, 2.0)),
    (r"H100", (989.0, 67.0, 3.35)),
    (r"A100.*80GB", (312.0, 19.5, 2.039)),
    (r"A100", (312.0, 19.5, 1.555)),
]

FLOP_KINDS = ("softmax", "linear")
MODES = ("fwd", "fwdbwd")
_BACKWARD = {"softmax": 3.5, "linear": 3.0}  # fwd + bwd over fwd


def device_peaks(name: str, dtype: torch.dtype) -> tuple[float | None, float | None]:
    """(peak TFLOP/s for dtype, peak TB/s) of a GPU by name; (None, None) when unknown."""
    for pattern, (tc, fp32, tbs) in DEVICE_PEAKS:
        if re.search(pattern, name):
            return (fp32 if dtype == torch.float32 else tc), tbs
    return None, None


def kernel_flops(kind: str, B: int, T: int, H: int, D: int, mode: str, chunk: int = 64) -> float:
    """FLOPs of one call of a `kind` kernel in `mode` (the module docstring)."""
    if kind not in FLOP_KINDS or mode not in MODES:
        raise ValueError(f"no FLOP formula for kind {kind!r}, mode {mode!r} "
                         f"(kinds {', '.join(FLOP_KINDS)}; modes {', '.join(MODES)})")
    if kind == "softmax":
        fwd = 2.0 * B * T * T * H * D
    else:
        fwd = float(B * T * H * (2 * chunk * (D + D) + 4 * D * D))
    return fwd * (_BACKWARD[kind] if mode == "fwdbwd" else 1.0)


def kernel_io_bytes(B: int, T: int, H: int, D: int, elem: int, mode: str) -> int:
    """Minimum memory traffic of one call in bytes, elem bytes per element."""
    tensors = 4 + (8 if mode == "fwdbwd" else 0)
    return tensors * B * T * H * D * elem


def roofline(flops: float, io_bytes: float, seconds: float, device_name: str,
             dtype: torch.dtype) -> dict:
    """TFLOP/s, GB/s and their percent of the device's peaks (None where unknown)."""
    peak_tf, peak_tb = device_peaks(device_name, dtype)
    tflops = flops / seconds / 1e12
    gbps = io_bytes / seconds / 1e9
    return {"flops": flops, "tflops": tflops, "gbps": gbps,
            "pct_peak": 100 * tflops / peak_tf if peak_tf else None,
            "pct_peak_bw": 100 * gbps / (peak_tb * 1e3) if peak_tb else None}
