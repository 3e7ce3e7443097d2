"""Imports point one way: flows -> tasks -> storage. Storage imports neither tasks nor flows, and tasks does
not import flows, not even inside a function; read from the source with `ast`, nothing is imported.

    .venv/bin/pytest tests/test_layering.py -q
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("storage", "tasks", "flows")  # bottom to top: a package may import only its own layer and those below


def imported_packages(path: Path) -> list[tuple[int, str, str]]:
    """(line, this repo's top-level package, the import as written) for every import in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
            found += [(node.lineno, name.split(".")[0], f"import {name}") for name in names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:  # relative: same package
            written = f"from {node.module} import {', '.join(alias.name for alias in node.names)}"
            found.append((node.lineno, node.module.split(".")[0], written))
    return [(line, package, written) for line, package, written in found if package in LAYERS]


def test_imports_point_from_flows_to_tasks_to_storage():
    wrong = []
    for layer in LAYERS:
        above = LAYERS[LAYERS.index(layer) + 1:]
        for path in sorted((REPO / layer).rglob("*.py")):
            wrong += [f"{path.relative_to(REPO)}:{line}: {written}  ({layer} must not import {package})"
                      for line, package, written in imported_packages(path) if package in above]
    assert not wrong, "imports against flows -> tasks -> storage:\n" + "\n".join(wrong)
