"""The layering of docs/ARCHITECTURE.md, checked against the code.

The layer table and the exception table are parsed from the document itself, so the page and
the rule cannot drift apart. Every module under divco/ and kernels/ (installed as divco.kernels)
is parsed with ast; every import it makes - at the top or inside a function, and
``importlib.import_module`` with a literal name - must go to its own layer, a layer its row
allows, or the package root.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
PACKAGE_DIRS = {"divco": ROOT / "divco", "divco.kernels": ROOT / "kernels"}


def _table(marker: str) -> list[list[str]]:
    """The rows (cells, backticks removed) of the markdown table after ``<!-- marker ...``."""
    lines = ARCHITECTURE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"<!-- {marker}:"))
    rows = []
    for line in lines[start + 3:]:  # the comment, the header, the separator
        if not line.startswith("|"):
            break
        rows.append([cell.strip().replace("`", "") for cell in line.strip().strip("|").split("|")])
    return rows


def _names(cell: str) -> list[str]:
    return [] if cell == "-" else [name.strip() for name in cell.split(",")]


def layers() -> dict[str, tuple[list[str], list[str]]]:
    """layer -> (its top-level modules of divco, the layers it may import), bottom first."""
    return {row[0]: (_names(row[1]), _names(row[2])) for row in _table("layers")}


def exceptions() -> dict[str, set[str]]:
    """module path (relative to the repository) -> the layers it may import besides its row's."""
    return {row[0]: set(_names(row[1])) for row in _table("exceptions")}


def layer_of_top_level() -> dict[str, str]:
    return {module: layer for layer, (modules, _) in layers().items() for module in modules}


def module_files() -> list[tuple[str, Path]]:
    """(dotted module name, file) of every Python module of the package."""
    found = []
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found.append((".".join([package, *parts]), path))
    return found


def _lazy_root_names() -> dict[str, str]:
    """divco.__getattr__'s table: public name -> module it loads (``divco.stack`` -> divco.stacking)."""
    tree = ast.parse((ROOT / "divco" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign):
            target = node.target
        elif isinstance(node, ast.Assign):
            target = node.targets[0]
        else:
            continue
        if isinstance(target, ast.Name) and target.id == "_LAZY":
            return {name: module for name, (module, _) in ast.literal_eval(node.value).items()}
    return {}


def imported_modules(module: str, path: Path) -> list[tuple[str, int]]:
    """(absolute dotted name, line) of everything ``module`` imports, wherever in the file."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            # `from X import name`: name may be a submodule (from .. import ops) or an attribute.
            found += [(f"{source}.{alias.name}", node.lineno) for alias in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args):
            argument = node.args[0]
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                found.append((argument.value, node.lineno))
            elif isinstance(argument, ast.JoinedStr) and isinstance(argument.values[0], ast.Constant):
                found.append((argument.values[0].value.rstrip("."), node.lineno))  # f"divco.commands.{name}"
    return found


def target_top_level(name: str, lazy: dict[str, str]) -> str | None:
    """The top-level divco module ``name`` loads ("ops" for divco.ops.backends), "" for the
    package root, None outside divco."""
    parts = name.split(".")
    if parts[0] == "kernels":  # the source tree's name of divco.kernels (kernels/ imports itself so)
        return "kernels"
    if parts[0] != "divco":
        return None
    if len(parts) == 1:
        return ""
    if parts[1] in layer_of_top_level():
        return parts[1]
    if parts[1] in lazy:  # from divco import stack: loads divco.stacking
        return lazy[parts[1]].split(".")[1]
    return ""  # an attribute of the root (__version__)


def violations() -> list[str]:
    table = layers()
    owner = layer_of_top_level()
    allowed_extra = exceptions()
    lazy = _lazy_root_names()
    found = []
    for module, path in module_files():
        source = target_top_level(module, lazy)
        source_layer = owner[source] if source else None
        relative = str(path.relative_to(ROOT))
        may = set(table[source_layer][1]) if source_layer else set()
        may |= allowed_extra.get(relative, set())
        for name, line in imported_modules(module, path):
            target = target_top_level(name, lazy)
            if target is None or target == "":
                if target == "" and source == "" and name != "divco.__version__":
                    found.append(f"{relative}:{line}: the package root imports {name} eagerly")
                continue
            target_layer = owner[target]
            if source_layer is not None and target_layer != source_layer and target_layer not in may:
                found.append(f"{relative}:{line}: {source_layer} imports {name} ({target_layer}); "
                             f"{source_layer} may import {sorted(may) or 'nothing'}")
    return found


def test_every_module_has_a_layer():
    owner = layer_of_top_level()
    missing = sorted({module.split(".")[1] for module, _ in module_files()
                      if module.count(".") >= 1 and module.split(".")[1] not in owner})
    assert not missing, f"top-level modules not in the layer table of {ARCHITECTURE.name}: {missing}"


def test_layers_only_import_lower_layers_they_are_allowed():
    assert violations() == []


def test_the_table_is_layered_bottom_up():
    """Every layer a row may import is defined in an earlier row: the table has no cycle, and
    "lower" means "earlier in the table"."""
    seen: set[str] = set()
    for layer, (_, may) in layers().items():
        assert set(may) <= seen, f"layer {layer} may import {sorted(set(may) - seen)}, not below it"
        seen.add(layer)


def test_exceptions_name_existing_files_and_layers():
    for relative, extra in exceptions().items():
        assert (ROOT / relative).is_file(), relative
        assert extra <= set(layers()), (relative, extra)


def test_readme_links_the_architecture_page():
    development = (ROOT / "README.md").read_text().split("## Development", 1)[1].split("\n## ", 1)[0]
    assert "docs/ARCHITECTURE.md" in development


@pytest.mark.parametrize("source, name, expected", [
    ("divco.models.base", "divco.stacking", "model_tools"),  # a higher layer imported lazily counts
    ("divco.nn.norm", "divco.train.step", "train"),
])
def test_a_violation_is_reported(source, name, expected, monkeypatch):
    """The checker finds an upward import (so the main test can fail)."""
    real = imported_modules

    def with_extra(module, path):
        return real(module, path) + ([(name, 1)] if module == source else [])

    monkeypatch.setattr(sys.modules[__name__], "imported_modules", with_extra)
    found = violations()
    assert len(found) == 1 and f"imports {name} ({expected})" in found[0]


def test_relative_and_lazy_imports_resolve(tmp_path):
    path = tmp_path / "step.py"
    path.write_text("from .. import ops\ndef f():\n    from ..benchmark import steps\n"
                    "    importlib.import_module(f'divco.commands.{x}')\n")
    names = [name for name, _ in imported_modules("divco.train.step", path)]
    assert sorted(names) == ["divco.benchmark.steps", "divco.commands", "divco.ops"]
    assert [target_top_level(n, {}) for n in sorted(names)] == ["benchmark", "commands", "ops"]
