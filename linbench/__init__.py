"""linbench: linearize pretrained transformers and compare the methods fairly."""
__version__ = "0.1.0"



def _hub_kernels_first() -> None:
    """transformers (5.25 and later) imports the Hugging Face Hub package `kernels`. This
    checkout's own kernels/ folder (installed as linbench.kernels) has the same top-level
    name, so wherever the checkout's root is on sys.path (pytest, `python -m` run from
    it) it shadows that package and every model load fails (`cannot import name
    'CUDAProperties' from 'kernels'`). Import the installed one first, with the root out
    of sys.path for that one import; nothing happens when it is not installed."""
    import importlib.metadata
    import sys
    from pathlib import Path
    if "kernels" in sys.modules:
        return
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    root = Path(__file__).resolve().parent.parent
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if Path(p or ".").resolve() != root]
    try:
        import kernels  # noqa: F401
    finally:
        sys.path[:] = saved


_hub_kernels_first()

# transformers' AutoModelForCausalLM loads linearized checkpoints (cheap: a post-import hook)
from linbench.methods.hf import install as _install_auto_classes  # noqa: E402

_install_auto_classes()
