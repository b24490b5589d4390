"""Sequence-mixing kernels and the dispatcher that picks a backend for each call.

One folder per op, each with its forms side by side (reference.py, chunked.py,
recurrent.py, triton.py): linear/ (plain, decayed, normalized linear attention), gla/,
delta/, window/ (window softmax and the window + linear hybrid). dispatch.py holds the
public API below and picks the backend. Shared helpers:
common.py (torch) and triton_common.py (Triton); varlen.py packs sequences; check.py is
the GPU device check. Conventions: linbench.kernels.common.

Public API (tensors (B, T, H, D), fp32 states):

    linear_attention, gated_linear_attention, delta_rule          -> (o, final_state | None)
    sliding_window_attention, window_linear_attention              -> o  (or (o, state) with
                                                                       output_final_state=True)
    *_step: one-token decode, -> (o, new_state);  WindowCache, WindowState

Every full-sequence function takes `backend`:
  "reference" - the quadratic torch references <op>/reference.py (slow, obviously correct);
  "torch"     - chunked torch <op>/chunked.py (linear in T, CPU or GPU);
  "triton"    - <op>/triton.py through linbench.kernels.triton.<name>, imported on first
                use (error if missing);
  "auto"      - triton when q is on a CUDA device and that kernel is available, else torch.
The linear three also take `cu_seqlens` (packed sequences, see kernels.varlen) and all
take `chunk_size` (chunk of the torch form; query block for the window ones; passed to a
Triton kernel only if it accepts it). Importing this package does not import triton.
"""
from __future__ import annotations

if __name__ != "linbench.kernels":
    # Found as the top-level name `kernels`: the checkout's root is on sys.path (python -c,
    # python -m or pytest run from it). That is also the name of the Hugging Face Hub package
    # that transformers (5.25 and later) imports, so hand the import over to the installed
    # package; where none is installed, `import kernels` fails as it would without this folder.
    import sys as _sys
    from pathlib import Path as _Path

    _root, _saved = _Path(__file__).resolve().parent.parent, _sys.path[:]
    del _sys.modules[__name__]
    _sys.path[:] = [p for p in _saved if _Path(p or ".").resolve() != _root]
    try:
        import kernels as _hub
    finally:
        _sys.path[:] = _saved
    _sys.modules[__name__] = _hub  # what the import statement returns
else:
    from linbench.kernels.dispatch import *  # noqa: F401,F403
    from linbench.kernels.dispatch import __all__  # noqa: F401
