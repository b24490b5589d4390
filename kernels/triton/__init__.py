"""Triton chunked kernels (forward + backward), imported lazily by name.

Each public function has the keyword signature of its torch reference in
linbench.kernels.reference. Importing this package does not import triton; asking for
a function imports its module.
"""
from __future__ import annotations

import importlib

_MODULES = {
    "linear_attention": "linear",
    "gated_linear_attention": "gla",
    "delta_rule": "delta",
    "sliding_window_attention": "window",
    "window_linear_attention": "window",
}

__all__ = list(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(name)
    module = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    return getattr(module, name)


def available(name: str) -> bool:
    """True when the Triton kernel for `name` exists and triton imports."""
    try:
        __getattr__(name)
        return True
    except (ImportError, AttributeError):
        return False
