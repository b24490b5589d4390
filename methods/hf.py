"""transformers' Auto classes for linearized checkpoints: after `import linbench`,

    AutoModelForCausalLM.from_pretrained(dir)

loads a model written by linbench.methods.io.save_pretrained, with the same logits.

For each architecture linbench linearizes (linbench.assets.archs: llama, mistral, qwen2)
two classes are registered with transformers:
  Linbench<Family>Config         the family's config class under its own model_type
                                 "linbench_<arch>" (AutoConfig.register);
  Linbench<Family>ForCausalLM    its AutoModelForCausalLM entry (register). It loads
                                 through methods.io.from_pretrained, so the result is what
                                 linbench itself builds: the family's <Family>ForCausalLM
                                 with the recorded method's layers and every saved tensor
                                 (strict). from_config gives a fresh linearized model.

`import linbench` stays cheap: this module imports nothing of transformers (nor torch).
`install` registers at once when transformers' auto modules are already imported, and
otherwise adds a post-import hook to sys.meta_path that registers at the first safe point
after transformers imports them: when the outermost transformers import completes, in any
import order (see _AfterImport). Without `import linbench`, transformers refuses the
checkpoint: its model_type "linbench_llama" is unknown to it.
"""
from __future__ import annotations

import importlib.abc
import sys
import threading
import warnings

from linbench.assets.archs import SUPPORTED_ARCHS

_CONFIG_AUTO = "transformers.models.auto.configuration_auto"
_MODEL_AUTO = "transformers.models.auto.modeling_auto"
_done: set[str] = set()  # the auto modules whose registration has run


class _Loader:
    """AutoModelForCausalLM's entry for one linearized architecture (see the docstring)."""

    config_class = None  # set per architecture by `classes`

    @classmethod
    def from_pretrained(cls, path, *model_args, config=None, dtype=None, torch_dtype=None,
                        device_map=None, **hub_kwargs):
        """Load `path` (a local directory). dtype: a torch dtype, its name, or None / "auto"
        (the checkpoint's); device_map: one device (None: CPU; "auto": CUDA if available).
        Hub arguments are ignored."""
        import torch

        from linbench.methods import io
        if model_args:
            raise TypeError(f"{cls.__name__}.from_pretrained takes no model arguments, "
                            f"got {model_args!r}")
        if isinstance(device_map, dict):
            raise ValueError("device_map must be one device for a linearized model; "
                             "load it, then .to(device)")
        if device_map == "auto":
            device_map = "cuda" if torch.cuda.is_available() else "cpu"
        want = dtype if dtype is not None else torch_dtype
        if want is None or want == "auto":
            want = getattr(config, "dtype", None) or "float32"
        if isinstance(want, str):
            want = getattr(torch, want.replace("torch.", ""))
        return io.from_pretrained(path, dtype=want, device=device_map or "cpu")

    @classmethod
    def from_config(cls, config, **kwargs):
        """A fresh (randomly initialized) linearized model of this config."""
        from transformers import AutoModelForCausalLM

        from linbench.methods import io
        base = io.base_type(config.model_type)
        plain = io.base_config_class(base).from_dict(
            {**config.to_dict(), "model_type": base,
             "architectures": [f"{SUPPORTED_ARCHS[base]}ForCausalLM"]})
        return io.method_of(config).linearize(AutoModelForCausalLM.from_config(plain, **kwargs))

    _from_config = from_config


def classes(base_type: str):
    """(Linbench<Family>Config, Linbench<Family>ForCausalLM) for base model_type 'llama',
    ...; created on first use (this imports transformers' config class of the family)."""
    from linbench.methods import io
    family = SUPPORTED_ARCHS[base_type]
    name = f"Linbench{family}Config"
    if name not in globals():
        cfg = type(name, (io.base_config_class(base_type),), {
            "model_type": io.linearized_type(base_type), "__module__": __name__,
            "__doc__": f"{family}'s config for a linbench-linearized model."})
        loader = type(io.loader_name(base_type), (_Loader,), {
            "config_class": cfg, "__module__": __name__,
            "__doc__": f"Loads a linearized {family} checkpoint as a {family}ForCausalLM."})
        globals().update({name: cfg, loader.__name__: loader})  # importable by name (pickle)
    return globals()[name], globals()[io.loader_name(base_type)]


def _initializing(name: str) -> bool:
    """Whether module `name` is in sys.modules but its code has not finished running."""
    spec = getattr(sys.modules.get(name), "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def _register(finished: str | None = None) -> None:
    """Register with each auto module that is fully imported (`finished`: the one whose code
    just ran), once each. Raises when it cannot yet: registering imports the family's config
    classes (LlamaConfig, ...), which fails while one of them, or a module they need (the auto
    modules among them), is itself still being imported."""
    def ready(name):
        return name in sys.modules and (name == finished or not _initializing(name))
    if any(n in sys.modules and not ready(n) for n in (_CONFIG_AUTO, _MODEL_AUTO)):
        return  # retried at the next safe point (see _attempt)
    for name in (_CONFIG_AUTO, _MODEL_AUTO):
        if name in _done or not ready(name):
            continue
        auto = sys.modules[name]
        for base in SUPPORTED_ARCHS:
            cfg, loader = classes(base)
            if name == _CONFIG_AUTO:
                auto.AutoConfig.register(cfg.model_type, cfg, exist_ok=True)
            else:
                auto.AutoModelForCausalLM.register(cfg, loader, exist_ok=True)
        _done.add(name)


_state = threading.local()  # depth: transformers modules this thread is executing (hooked)
_busy = threading.Lock()    # held while registering (its own imports must not re-enter)


def _attempt(finished: str | None = None) -> None:
    """Register what is pending. A failure is not final: registration stays pending and is
    retried at the next safe point. It warns only when nothing of transformers was still
    being imported (then the failure is not one of import order)."""
    if len(_done) == 2 or not _busy.acquire(blocking=False):
        return
    try:
        _register(finished)
    except Exception as err:  # never break the import that triggered it
        if not any(_initializing(n) for n in list(sys.modules)
                   if n.partition(".")[0] == "transformers" and n != finished):
            warnings.warn(f"linbench could not register its Auto classes: {err!r}")
    finally:
        _busy.release()
    if len(_done) == 2:  # nothing left to do: leave the import system as it was
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AfterImport)]


class _AfterImport(importlib.abc.MetaPathFinder):
    """While registration is pending, finds every transformers module through the other
    finders and wraps its execution: when the outermost transformers import of this thread
    completes (a safe point: no module of transformers is half-imported by this import
    chain), it runs `_attempt`.

    Safe points rather than the auto modules' own completion: transformers imports them
    from inside other imports (`from transformers import LlamaConfig` runs
    configuration_llama, which imports modeling_auto, which imports configuration_auto), so
    when an auto module completes, LlamaConfig may not exist yet. By the time the outermost
    import completes, every module it started has."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] != "transformers" or len(_done) == 2:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or isinstance(loader, type) or not hasattr(loader, "exec_module"):
            return spec  # nothing of ours to wrap (a class is shared by many modules)
        run = loader.exec_module

        def exec_module(module):
            _state.depth = getattr(_state, "depth", 0) + 1
            try:
                run(module)
            finally:
                _state.depth -= 1
            if _state.depth == 0:
                _attempt(finished=name)
        try:
            loader.exec_module = exec_module
        except AttributeError:
            pass
        return spec


def install() -> None:
    """Register the Auto classes now, or at the first safe point after transformers imports
    its auto modules."""
    _attempt()
    if len(_done) < 2 and not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
