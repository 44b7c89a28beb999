"""Imports only point down (ARCHITECTURE, layers): services/ imports nothing of ours above
it and neither Flask nor Celery; tasks/ imports no part of the API."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

FORBIDDEN = {
    "services": {"tasks", "mailroom", "flask", "flask_openapi3", "celery", "kombu", "billiard"},
    "tasks": {"mailroom", "flask", "flask_openapi3"},
}


def imported_roots(path: Path) -> set[str]:
    """The top-level packages ``path`` imports, at module level or inside functions."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(layer: str) -> None:
    found = {
        str(path.relative_to(ROOT)): sorted(imported_roots(path) & FORBIDDEN[layer])
        for path in sorted((ROOT / layer).rglob("*.py"))
    }
    offending = {path: roots for path, roots in found.items() if roots}
    assert len(found) > 10
    assert offending == {}


def test_the_scan_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "import os\n\n\ndef f():\n    from tasks.dispatch import dispatch\n    import celery.app\n"
    )
    assert imported_roots(module) == {"os", "tasks", "celery"}
