"""The package's layering, as docs/architecture.md draws it.

import-linter (pyproject.toml, run by `make test`) checks python/softtool. The exporter lives in the top-level
export/ folder and ships as softtool.export through the wheel mapping, out of the import graph's sight, so its
layer is checked here from its source: it may use the runtime and everything below, never the commands above.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ABOVE_EXPORT = ("softtool.cli", "softtool.bench", "softtool.training", "softtool.evaluate")


def _softtool_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name == "softtool" or name.startswith("softtool.")]


def test_the_exporter_imports_only_the_runtime_and_layers_below_it():
    sources = sorted((REPO / "export").glob("*.py"))
    assert sources, "export/ has no Python files"
    upward = [
        f"{path.relative_to(REPO)}:{line} imports {name}"
        for path in sources
        for line, name in _softtool_imports(path)
        if name.startswith(ABOVE_EXPORT)
    ]
    assert not upward, upward


def test_nothing_below_the_exporter_imports_it():
    below = [p for p in (REPO / "python" / "softtool").rglob("*.py") if p.parts[-2] not in ("cli", "bench")]
    allowed = {"training", "evaluate.py"}  # above the exporter: may use it (today they do not)
    offenders = [
        f"{path.relative_to(REPO)}:{line} imports {name}"
        for path in below
        if not allowed & set(path.relative_to(REPO / "python" / "softtool").parts)
        for line, name in _softtool_imports(path)
        if name.startswith("softtool.export") and not name.startswith("softtool.export_meta")
    ]
    assert not offenders, offenders


def test_the_import_linter_contract_is_kept():
    linter = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if linter is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    proc = subprocess.run([linter], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:]


def test_no_module_imports_itself_through_a_circle():
    grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (pip install -e '.[test]')")
    graph = grimp.build_graph("softtool")
    circles = sorted(
        f"{a} -> {b} -> ... -> {a}"
        for a in graph.modules
        for b in graph.find_modules_directly_imported_by(a)
        if graph.chain_exists(importer=b, imported=a)
    )
    assert not circles, circles
