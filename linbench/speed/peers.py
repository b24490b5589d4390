"""The one list of fla peers: flash-linear-attention's chunk ops, timed beside linbench's
kernels by `linbench speed --methods fla:<name>` and by the device check
(`python -m linbench.kernels.check`). GPU only: fla's Triton kernels do not run on a CPU.

A peer is an fla.ops function, the linbench.kernels function it stands beside, and how to
build its inputs after q, k, v (B, T, H, D). fla is imported only when a peer is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Peer:
    op: str            # function of fla.ops
    kernel: str        # the linbench.kernels function it is compared with
    extra: Callable    # (B, T, H, D, dtype, device) -> inputs after q, k, v
    kwargs: dict = field(default_factory=dict)

    def inputs(self, B, T, H, D, dtype, device) -> list[torch.Tensor]:
        """q, k, v (B, T, H, D) standard normal, then the extra inputs."""
        qkv = [torch.randn(B, T, H, D, dtype=dtype, device=device) for _ in range(3)]
        return qkv + list(self.extra(B, T, H, D, dtype, device))

    def function(self) -> Callable:
        """inputs -> o: the fla op with this peer's keywords (imports fla)."""
        import fla.ops
        op = getattr(fla.ops, self.op)
        return lambda *xs: op(*xs, **self.kwargs)[0]


FLA_PEERS = {
    "fla:linear": Peer("chunk_linear_attn", "linear_attention",
                       lambda B, T, H, D, dt, dev: [], {"normalize": False}),
    "fla:simple_gla": Peer("chunk_simple_gla", "linear_attention",  # scalar gate g (B, T, H)
                           lambda B, T, H, D, dt, dev: [
                               F.logsigmoid(torch.randn(B, T, H, device=dev)).to(dt)]),
    "fla:gla": Peer("chunk_gla", "gated_linear_attention",  # per-channel gate g (B, T, H, K)
                    lambda B, T, H, D, dt, dev: [
                        (F.logsigmoid(torch.randn(B, T, H, D, device=dev)) / 16).to(dt)]),
    "fla:delta": Peer("chunk_delta_rule", "delta_rule",  # beta (B, T, H); fla L2-normalizes q, k
                      lambda B, T, H, D, dt, dev: [torch.rand(B, T, H, device=dev).to(dt)],
                      {"use_qk_l2norm_in_kernel": True}),
}


def fla_available(device) -> bool:
    """True on a CUDA device where `import fla.ops` works."""
    if torch.device(device).type != "cuda":
        return False
    try:
        import fla.ops  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means no peer rows
        return False
    return True


def fla_version() -> str | None:
    try:
        import fla
    except Exception:  # noqa: BLE001 - optional
        return None
    return getattr(fla, "__version__", None)
