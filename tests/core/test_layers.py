"""The layers import downwards only, and no modules import each other in a cycle.

Imports are read with ``ast`` from the source, all of them: module level, inside functions
and under ``if TYPE_CHECKING:``, since a cycle hidden behind either is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {"core": "lookalike/core", "models": "models", "index": "index",
            "evaluation": "evaluation", "service": "service"}
ALLOWED = {
    "core": set(),
    "models": {"core", "demo"},
    "index": {"core", "models"},
    "evaluation": {"core", "models", "index"},
    "service": {"core", "models", "index", "evaluation", "demo"},
}


def module_name(path: Path) -> str:
    """``lookalike.<package>.<module>`` of a source file, as installed."""
    for package, folder in PACKAGES.items():
        try:
            relative = path.relative_to(REPO / folder)
        except ValueError:
            continue
        parts = [package, *relative.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        return ".".join(["lookalike", *parts])
    raise AssertionError(path)


def import_graph() -> dict[str, set[str]]:
    files = [f for folder in PACKAGES.values() for f in (REPO / folder).rglob("*.py")]
    names = {module_name(f): f for f in files}
    graph: dict[str, set[str]] = {}
    for name, file in names.items():
        package = name.split(".") if file.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                module = ".".join([*base, *(node.module.split(".") if node.module else [])])
                targets.add(module)
                targets.update(f"{module}.{alias.name}" for alias in node.names)
        graph[name] = {target for target in targets if target in names and target != name}
    return graph


GRAPH = import_graph()


def layer(module: str) -> str:
    return module.split(".")[1]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_lower_layers(package: str) -> None:
    wrong = sorted(
        f"{source} -> {target}"
        for source, targets in GRAPH.items() if layer(source) == package
        for target in targets
        if layer(target) != package and layer(target) not in ALLOWED[package]
    )
    assert not wrong


def test_no_import_cycles() -> None:
    """Depth-first search for a back edge; the message names the cycle."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(GRAPH[node] - {m for m in GRAPH[node] if node.startswith(m + ".")}):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)


def test_the_graph_is_read() -> None:
    """The checks above see real edges (the parser is not silently finding nothing)."""
    assert "lookalike.models.runtime" in GRAPH["lookalike.models.export"]
    assert "lookalike.models.export" in GRAPH["lookalike.models.engines"]
    assert "lookalike.core.pairs" in GRAPH["lookalike.models.data"]
