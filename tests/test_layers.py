"""The package is in layers: imports point down the data flow, and no module imports itself
back through others (README, "Development")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "orchestra"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> nx.DiGraph:
    """Every import between orchestra's modules: at module level, inside functions and
    under TYPE_CHECKING alike."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                # "from . import x" imports the module x when there is one
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            for target in targets:
                found = known(target)
                if found is not None and found != name:
                    graph.add_edge(name, found)
    return graph


LINT = "from importlinter.cli import lint_imports; exit(lint_imports(no_cache=True))"


def test_layers_contract_is_kept() -> None:
    """import-linter's layers contract (pyproject.toml) passes."""
    result = subprocess.run(
        [sys.executable, "-c", LINT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 1 kept, 0 broken." in result.stdout


def test_layers_no_import_cycle() -> None:
    """No strongly connected group of modules, counting every kind of import."""
    cycles = [sorted(c) for c in nx.strongly_connected_components(import_graph()) if len(c) > 1]
    assert cycles == []


def test_layers_scan_sees_every_kind_of_import() -> None:
    """The scan sees imports inside functions and under TYPE_CHECKING (so the test above
    can fail)."""
    graph = import_graph()
    assert graph.has_edge("orchestra.app", "orchestra.runtime.drivers")  # in-function import
    assert graph.has_edge("orchestra.runtime.executor", "orchestra.compile")  # TYPE_CHECKING


def test_layers_module_sizes() -> None:
    """No module is over 600 lines, and only the executor is over 450."""
    sizes = {module_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {m: n for m, n in sizes.items() if n > 600} == {}
    assert sorted(m for m, n in sizes.items() if n > 450) in ([], ["orchestra.runtime.executor"])
