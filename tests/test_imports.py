"""The import rules of the package layout, checked on the source (no imports run).

- no cycles between modules (module-level and function-level imports alike);
- kernels/ imports nothing of the harness (kernels/check.py, the device check CLI on top of
  the kernels, may use speed's one timing loop, roofline model and fla peer list);
- methods/ imports only kernels, methods and the ground floor (errors, registry, units,
  assets): never recovery, run, speed or report;
- suites/ never imports recovery, run, speed or report;
- report/ reads records only: records, units and errors;
- records/ and assets/ import only the ground floor;
- at most 10 top-level modules in linbench/.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"linbench": ROOT / "linbench", "linbench.kernels": ROOT / "kernels",
           "linbench.methods": ROOT / "methods", "linbench.suites": ROOT / "suites"}
GROUND = ("linbench", "linbench.errors", "linbench.registry", "linbench.units")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in FOLDERS.items():
        for f in folder.rglob("*.py"):
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "linbench" and parts and f"linbench.{parts[0]}" in FOLDERS:
                continue
            out[name] = f
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every linbench module this file imports, resolved to a module of MODULES."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    here = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    # importing a.b.c imports the packages a and a.b too; only count the deepest one
    return {t for t in found if not any(o != t and o.startswith(t + ".") for o in found)}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_graph_is_not_empty():
    assert "linbench.methods.base" in GRAPH and "linbench.kernels" in GRAPH
    assert "linbench.methods.linearize" in GRAPH["linbench.methods.base"] or \
        "linbench.errors" in GRAPH["linbench.methods.base"]


def test_no_import_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)


RULES = [  # (importer prefix, allowed import prefixes, exempt modules)
    ("linbench.kernels", ("linbench.kernels",), {"linbench.kernels.check"}),
    ("linbench.methods", ("linbench.methods", "linbench.kernels", "linbench.assets", *GROUND), set()),
    ("linbench.suites", ("linbench.suites", "linbench.assets", "linbench.records", *GROUND), set()),
    ("linbench.report", ("linbench.report", "linbench.records", "linbench.errors",
                         "linbench.units", "linbench"), set()),
    ("linbench.records", ("linbench.records", "linbench.errors", "linbench.units", "linbench"),
     set()),
    ("linbench.assets", ("linbench.assets", "linbench.errors", "linbench.units", "linbench"),
     set()),
]


@pytest.mark.parametrize("prefix,allowed,exempt", RULES, ids=[r[0] for r in RULES])
def test_layer_rules(prefix, allowed, exempt):
    bad = [f"{m} imports {t}" for m, ts in sorted(GRAPH.items())
           if _under(m, prefix) and m not in exempt
           for t in sorted(ts) if not (t == "linbench" or _under(t, *allowed))]
    assert not bad, "\n".join(bad)


def test_the_device_check_uses_only_speeds_timing():
    extra = {t for t in GRAPH["linbench.kernels.check"] if not _under(t, "linbench.kernels")}
    assert extra <= {"linbench.speed.timing", "linbench.speed.roofline", "linbench.speed.peers",
                     "linbench.units"}, extra


def test_at_most_ten_top_level_modules():
    top = sorted(p.name for p in (ROOT / "linbench").glob("*.py"))
    assert len(top) <= 10, top


def test_nothing_refers_to_docs_outside_the_repository():
    import re
    pattern = re.compile(r"\b(DESIGN|EVAL|METHODS)\.md\b")
    files = [p for p in ROOT.rglob("*") if p.suffix in (".py", ".md", ".toml", ".yaml")
             and ".venv" not in p.parts and ".git" not in p.parts and p != Path(__file__)]
    bad = [str(p.relative_to(ROOT)) for p in files if pattern.search(p.read_text(errors="ignore"))]
    assert not bad, bad
