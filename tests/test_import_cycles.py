"""No import cycles among divco's modules.

Every module under divco/ is parsed with ast; an edge A -> B is an import in A of the divco
module B (``from . import x`` and ``from .x import y`` resolve to the module they load). A
package's ``__init__`` is a module like the others, but the implicit load of a parent package
is not an edge (it is not a dependency the code wrote). Two graphs are checked: the top-level
imports of all of divco (those run when a module loads), and every import, lazy ones included,
inside divco.train (a lazy import only hides a circle there; it does not remove it). Imports
under ``if TYPE_CHECKING`` (for annotations) never run and are no edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "divco"


def modules() -> dict[str, Path]:
    """dotted name -> file of every module of divco (divco/kernels is the kernels' own tree: left out)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["divco", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[1] == "kernels":
            continue
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(module: str, path: Path, known: set[str], *, top_level_only: bool) -> set[str]:
    """The divco modules ``module`` imports (at the top of the file, or anywhere)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = _top_level_nodes(tree) if top_level_only else _all_nodes(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from X import y`: y is a submodule (loads X.y) or an attribute of X (loads X)
            names = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # divco.train.engine.train -> divco.train.engine
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _all_nodes(tree: ast.Module):
    """Every node but those of ``if TYPE_CHECKING`` blocks (imports for annotations only, never run)."""
    pending = [tree]
    while pending:
        node = pending.pop()
        yield node
        if _is_type_checking(node):
            pending.extend(node.orelse)
            continue
        pending.extend(ast.iter_child_nodes(node))


def _top_level_nodes(tree: ast.Module):
    """The statements run when the module loads: its body, into if/try blocks, not into functions,
    classes' methods or ``if TYPE_CHECKING`` blocks."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if _is_type_checking(node):
            pending.extend(node.orelse)
            continue
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            for block in ("body", "orelse", "finalbody", "handlers"):
                pending.extend(getattr(node, block, []))
            continue
        if isinstance(node, ast.ExceptHandler):
            pending.extend(node.body)
            continue
        if isinstance(node, ast.ClassDef):
            pending.extend(n for n in node.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
            continue
        yield node


def graph(*, top_level_only: bool, within: str = "divco") -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {m: {t for t in _imports(m, p, known, top_level_only=top_level_only)
                if t == within or t.startswith(within + ".")}
            for m, p in found.items() if m == within or m.startswith(within + ".")}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(components)


def test_no_import_cycles_among_top_level_imports():
    assert cycles(graph(top_level_only=True)) == []


def test_no_import_cycles_in_train_even_through_lazy_imports():
    assert cycles(graph(top_level_only=False, within="divco.train")) == []


def test_a_cycle_is_found():
    """The checker can fail: a circle of three and a self-contained pair are reported."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}
    assert cycles(edges) == [["a", "b", "c"], ["d", "e"]]


def test_relative_imports_resolve(tmp_path):
    """Relative imports resolve to modules; lazy ones count in the full graph; TYPE_CHECKING ones never."""
    path = tmp_path / "step.py"
    path.write_text("from typing import TYPE_CHECKING\nfrom . import recipe\nfrom .members import x\n"
                    "from .. import models\nif TYPE_CHECKING:\n    from .engine import Run\n"
                    "def f():\n    from .export import y\n")
    known = {"divco", "divco.models", "divco.train", "divco.train.recipe", "divco.train.members",
             "divco.train.export", "divco.train.engine", "divco.train.step"}
    loaded = {"divco.train.recipe", "divco.train.members", "divco.models"}
    assert _imports("divco.train.step", path, known, top_level_only=True) == loaded
    assert _imports("divco.train.step", path, known, top_level_only=False) == loaded | {"divco.train.export"}
