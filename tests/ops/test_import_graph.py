"""The modules of divco.ops import each other without a circle (top-level and lazy imports
alike): each can be read, loaded and tested on its own, from the bottom up."""

import ast
from pathlib import Path

import divco.ops

OPS = Path(divco.ops.__file__).parent


def ops_imports(path: Path) -> set[str]:
    """The divco.ops modules (file stems) that ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:  # from .reference import x
                found.add(node.module.split(".")[0])
            else:  # from . import backends, reference
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("divco.ops."):
            found.add(node.module.split(".")[2])
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in OPS.glob("*.py") if p.stem != "__init__"}
    return {name: ops_imports(path) & modules.keys() for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of ``graph`` (a list of modules, the first repeated last), or []."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_divco_ops_has_no_import_circle():
    graph = import_graph()
    assert "reference" in graph and "cotrain_loss" in graph
    assert find_cycle(graph) == []
