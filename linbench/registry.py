"""Name -> plugin registries with lazy imports (lm-eval style "module:attr" entries).

The harness core never names a method or suite: built-ins are listed here as import
strings, third-party plugins arrive through the entry-point groups `linbench.methods`
and `linbench.suites`. Nothing heavy is imported until a plugin is asked for.
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from linbench.errors import one_of

BUILTIN = {
    "methods": {
        "softmax": "linbench.methods.softmax:Softmax",
        "swa": "linbench.methods.swa:SWA",
        "hedgehog": "linbench.methods.hedgehog:Hedgehog",
        "lolcats": "linbench.methods.lolcats:Lolcats",
        "liger": "linbench.methods.liger:Liger",
        "gla": "linbench.methods.gla:GLA",
        "deltanet": "linbench.methods.deltanet:DeltaNet",
        "gated_deltanet": "linbench.methods.gated_deltanet:GatedDeltaNet",
        "lightning": "linbench.methods.lightning:Lightning",
    },
    "suites": {
        "mmlu5": "linbench.suites.mmlu5:MMLU5",
        "mmlu_cloze": "linbench.suites.mmlu_cloze:MMLUCloze",
        "commonsense": "linbench.suites.commonsense:Commonsense",
        "ppl": "linbench.suites.ppl:Perplexity",
        "recall": "linbench.suites.recall:Recall",
    },
}


class Registry:
    def __init__(self, kind: str):
        self.kind = kind  # "methods" | "suites"
        self._extra: dict[str, object] = {}

    def register(self, name: str, target) -> None:
        """Register a class or a "module:attr" string under `name` (used by tests/plugins)."""
        self._extra[name] = target

    def unregister(self, name: str) -> None:
        self._extra.pop(name, None)

    def _table(self) -> dict[str, object]:
        table: dict[str, object] = dict(BUILTIN[self.kind])
        for ep in entry_points(group=f"linbench.{self.kind}"):
            table.setdefault(ep.name, ep)
        table.update(self._extra)
        return table

    def names(self) -> list[str]:
        return sorted(self._table())

    def check(self, name: str) -> None:
        """Raise the standard one-line error for an unknown name, importing nothing."""
        table = self._table()
        if name not in table:
            raise one_of(self.kind[:-1], name, table)

    def get(self, name: str):
        table = self._table()
        if name not in table:
            raise one_of(self.kind[:-1], name, table)
        target = table[name]
        if isinstance(target, str):
            module, attr = target.split(":")
            return getattr(importlib.import_module(module), attr)
        if hasattr(target, "load"):  # an entry point
            return target.load()
        return target


methods = Registry("methods")
suites = Registry("suites")
