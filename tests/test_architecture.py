"""Structure rules of docs/ARCHITECTURE.md that a change can silently break: no import cycle among morphcache's
modules (top-level imports, and the deferred ones inside functions too, which only hide a cycle), and no library
function longer than about 80 lines."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "morphcache"
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def import_graph(deferred: bool) -> dict[str, set[str]]:
    """``{module: morphcache modules it imports}``: module-level imports (with ``deferred``, also those inside
    functions). ``from a import b`` counts ``a.b`` when that is a module; importing ``a.b.c`` runs the packages
    ``a`` and ``a.b`` too, so a package's ``__init__`` is an edge unless the importer lives inside it."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        nodes = ast.walk(tree) if deferred else [n for top in tree.body for n in ast.walk(top)
                                                 if not isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                         ast.ClassDef))]
        deps: set[str] = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
        with_parents = set()
        for dep in deps:
            parts = dep.split(".")
            with_parents.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        graph[name] = {d for d in with_parents
                       if d in mods and d != name and not name.startswith(d + ".") and d != "morphcache"}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        return list(err.args[1])
    return None


def test_the_checker_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("deferred", [False, True], ids=["module-level", "including-deferred"])
def test_no_import_cycle(deferred):
    graph = import_graph(deferred)
    assert len(graph) > 50
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_library_function_over_80_lines():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name} ({lines} lines)")
    assert not long, "split these: " + ", ".join(long)


def test_every_registering_module_is_a_listed_builtin():
    """morphcache.testing.registries imports BUILTIN_MODULES before a scratch registry: a module that registers
    parts but is missing there would lose its parts after the first test that registers a toy."""
    from morphcache.testing.registries import BUILTIN_MODULES

    registering = set()
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            func = node.func if isinstance(node, ast.Call) else None
            if (isinstance(func, ast.Attribute) and func.attr == "register" and isinstance(func.value, ast.Attribute)
                    and isinstance(func.value.value, ast.Name) and func.value.value.id == "registries"):
                registering.add(name)
    assert len(registering) >= 5
    assert registering == set(BUILTIN_MODULES)
