"""Feature maps phi: (B, T, H, D) -> (B, T, H, F), applied per query head.

Keys are repeated to the query heads before their map (one map per query head, as
LoLCATs does for grouped-query attention), so every map here sees H heads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HedgehogFeatureMap(nn.Module):
    """Hedgehog map (arXiv 2402.04347): phi(x) = [softmax(x W_h) ; softmax(-x W_h)].

    Each softmax runs over the f = feature_dim // 2 projected features, so phi has
    feature_dim features. W_h (head_dim, f) starts identity-like (`eye_`, LoLCATs'
    initialization, arXiv 2410.10254 code) and phi is clamped at 1e-12.
    """

    def __init__(self, heads: int, head_dim: int, feature_dim: int | None = None):
        super().__init__()
        f = (feature_dim or head_dim) // 2
        self.weight = nn.Parameter(torch.empty(heads, head_dim, f))  # (H, D, f)
        with torch.no_grad():
            for h in range(heads):
                nn.init.eye_(self.weight[h])

    @property
    def feature_dim(self) -> int:
        return 2 * self.weight.shape[-1]

    def forward(self, x):  # (B, T, H, D) -> (B, T, H, 2f)
        z = torch.einsum("bthd,hdf->bthf", x, self.weight.to(x.dtype))
        phi = torch.cat([z.softmax(-1), (-z).softmax(-1)], -1)
        return phi.clamp(min=1e-12)


class HedgehogJointFeatureMap(HedgehogFeatureMap):
    """fla's variant (`HedgehogFeatureMap` there): ONE softmax over cat[2 x W, -2 x W]."""

    def forward(self, x):
        z = torch.einsum("bthd,hdf->bthf", x, self.weight.to(x.dtype))
        return torch.cat([2 * z, -2 * z], -1).softmax(-1).clamp(min=1e-12)


class SoftmaxHeadDim(nn.Module):
    """Liger (arXiv 2503.01496): softmax over the head dimension; no parameters."""

    def forward(self, x):
        return x.softmax(-1)


class SiLUL2(nn.Module):
    """DeltaNet (arXiv 2406.06484): SiLU, then L2 normalization per head."""

    def forward(self, x):
        return F.normalize(F.silu(x), dim=-1, eps=1e-6)


class SiLU(nn.Module):
    """TransNormerLLM (arXiv 2307.14995): q and k through SiLU."""

    def forward(self, x):
        return F.silu(x)


FEATURE_MAPS = {
    "hedgehog": HedgehogFeatureMap,
    "hedgehog_joint": HedgehogJointFeatureMap,
    "softmax_head": SoftmaxHeadDim,
    "silu_l2": SiLUL2,
    "silu": SiLU,
    "identity": nn.Identity,
}


def make_feature_map(kind: str, heads: int, head_dim: int, feature_dim: int | None = None) -> nn.Module:
    if kind not in FEATURE_MAPS:
        raise ValueError(f"unknown feature map {kind!r}; valid: {', '.join(FEATURE_MAPS)}")
    cls = FEATURE_MAPS[kind]
    if issubclass(cls, HedgehogFeatureMap):
        return cls(heads, head_dim, feature_dim)
    return cls()


def make_feature_maps(kind: str, heads: int, head_dim: int, feature_dim: int | None = None):
    """Separate maps for queries and keys (Hedgehog and LoLCATs learn one of each)."""
    return (make_feature_map(kind, heads, head_dim, feature_dim),
            make_feature_map(kind, heads, head_dim, feature_dim))
