"""linbench: linearize pretrained transformers and compare the methods fairly."""
__version__ = "0.1.0"

# transformers' AutoModelForCausalLM loads linearized checkpoints (cheap: a post-import hook)
from linbench.methods.hf import install as _install_auto_classes  # noqa: E402

_install_auto_classes()
