"""`--set KEY=VALUE`: override a method's config fields from the command line.

KEY is `method.field` (that method only) or `field` (every selected method that has the
field; an error if none has it). VALUE is parsed as a Python literal when it is one
(`7`, `0.5`, `true`/`false`, `none`, `(0, 5)`, `1,2`), else kept as a string; lists
become tuples. The value must fit the field's type: an int field takes an int, and so on.
A method run with overrides is stored and reported as `method[field=value,...]`.
"""
from __future__ import annotations

import ast
import dataclasses

from linbench import registry
from linbench.errors import LinbenchError


def parse_value(text: str):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return tuple(value) if isinstance(value, list) else value


def parse(items: list[str]) -> list[tuple[str | None, str, object]]:
    """['liger.softmax_every=7', 'window=128'] -> [('liger', 'softmax_every', 7), (None, ...)]."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LinbenchError(f"bad --set {item!r}: expected KEY=VALUE, e.g. liger.softmax_every=7")
        method, _, field = key.strip().rpartition(".")
        out.append((method or None, field, parse_value(value)))
    return out


def _fits(default, value) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, tuple) and isinstance(value, (str, int)):
        return True
    return isinstance(value, type(default))


def resolve(methods: list[str], items: list[str]) -> dict[str, dict]:
    """{method: {field: value}} for the selected methods; one-line errors otherwise."""
    parsed = parse(items)
    fields = {m: {f.name: f for f in dataclasses.fields(registry.methods.get(m).config_cls)}
              for m in methods}
    out: dict[str, dict] = {m: {} for m in methods}
    for method, field, value in parsed:
        if method is not None and method not in methods:
            raise LinbenchError(f"--set {method}.{field}: {method!r} is not among --methods "
                                f"({', '.join(methods)})")
        targets = [method] if method else [m for m in methods if field in fields[m]]
        if not targets:
            raise LinbenchError(f"--set {field}: no selected method has that field")
        for m in targets:
            if field not in fields[m]:
                raise LinbenchError(f"--set {m}.{field}: unknown field; valid: {', '.join(sorted(fields[m]))}")
            default = registry.methods.get(m).config_cls().__dict__[field]
            if isinstance(default, tuple) and isinstance(value, (str, int)):
                value = (value,)
            if not _fits(default, value):
                raise LinbenchError(f"--set {m}.{field}={value!r}: expected {type(default).__name__} "
                                    f"like {default!r}")
            out[m][field] = value
    return out
