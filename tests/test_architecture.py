"""The house rules, checked on the source: imports only go down the layers, no module imports another
that (directly or not) imports it back, and an import inside a function only defers a heavy dependency
and says which. ``LAYERS`` lists the layers, lowest first; a module may import its own layer and
those below it (README, "Code layout").
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "indexer", "api", "whymatch")
LAYERS = (
    ("engine.errors", "engine.images", "engine.config"),
    ("engine.data", "engine.verify"),
    ("engine.nn",),
    ("engine.explain",),
    ("engine.inference",),
    ("engine.eval",),
    ("engine.train",),
    ("engine.cli", "engine"),
    ("indexer",),
    ("api",),
    ("whymatch",),
)
DEFERRAL_MARK = "defers "


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


MODULES = project_modules()
# Parsed once, at collection, before any test starts threads: CPython 3.11.7 keeps the AST converter's recursion
# count in shared module state, so an ``ast.parse`` racing another thread's (Ray's, after the distributed tests)
# fails with "AST constructor recursion depth mismatch".
SYNTAX_TREES = {path: ast.parse(path.read_text()) for path in MODULES.values()}


def layer_of(module: str) -> int:
    """The layer of the longest prefix of ``module`` named in LAYERS."""
    best, best_length = None, -1
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = level, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return best


def imported_modules(node: ast.Import | ast.ImportFrom, importer: str) -> list[str]:
    """The project modules an import statement loads (``from pkg import mod`` names the module ``pkg.mod``)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            base = ".".join(importer.split(".")[: -node.level] + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
    return [name for name in names if name.split(".")[0] in PACKAGES]


def import_statements(path: Path) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement of a file, with whether it runs inside a function."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(SYNTAX_TREES[path], False)
    return found


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        graph[module] = {target for node, _ in import_statements(path) for target in imported_modules(node, module)
                         if target != module}
    return graph


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_imports_only_go_down():
    upward = [f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
              for module, targets in import_graph().items() for target in sorted(targets)
              if layer_of(target) > layer_of(module)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if target not in graph:
                continue
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import cycle: " + " → ".join(cycle))


def test_function_local_imports_say_what_they_defer():
    unexplained = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        for node, in_function in import_statements(path):
            if not in_function or not imported_modules(node, module):
                continue
            said = lines[node.lineno - 1] + lines[node.lineno - 2]
            if DEFERRAL_MARK not in said:
                unexplained.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not unexplained, ("function-local imports of project modules must defer a heavy dependency and say which "
                             f"(a comment with {DEFERRAL_MARK!r} on the line or the line above):\n" + "\n".join(unexplained))


def test_the_rules_catch_a_cycle_and_an_upward_import(monkeypatch):
    """The checks above would fail on a tree that breaks them (they are not vacuous)."""
    graph = {"engine.images": {"engine.inference"}, "engine.inference": {"engine.images"}}
    assert any(layer_of(t) > layer_of(m) for m, ts in graph.items() for t in ts)
    monkeypatch.setattr(sys.modules[__name__], "import_graph", lambda: graph)
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycle()
