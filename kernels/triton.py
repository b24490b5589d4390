"""The Triton form of every kernel, by name, imported on first use.

`linbench.kernels.triton.<name>` is `linbench.kernels.<op>.triton.<name>` (the op folder
from linbench.kernels.common.OPS); each has the keyword signature of its op's torch
reference. Importing this module does not import triton; asking for a kernel imports its
op's Triton module.
"""
from __future__ import annotations

import importlib

from linbench.kernels.common import OPS

__all__ = list(OPS)


def __getattr__(name: str):
    if name not in OPS:
        raise AttributeError(name)
    return getattr(importlib.import_module(f"linbench.kernels.{OPS[name]}.triton"), name)


def available(name: str) -> bool:
    """True when the Triton kernel for `name` exists and triton imports."""
    try:
        __getattr__(name)
        return True
    except (ImportError, AttributeError):
        return False
