"""The package's shape, checked from its source with ``ast``: dependencies flow one way (cli ->
stages/tools -> library -> config), so no module imports ``lmforge.cli`` (only ``__main__`` does) and
no import cycle exists between lmforge modules — counting imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

SRC = ROOT / "src" / "lmforge"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The lmforge modules ``path`` imports (``from lmforge.x import y`` counts x.y when y is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # a name inside a module -> the module
                name = name.rpartition(".")[0]
            if name.startswith("lmforge"):
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    edges = {m: imports_of(p, set(files)) - {m} for m, p in files.items()}
    # a package's __init__ runs on import of any submodule: ignore edges to bare packages
    packages = {m for m, p in files.items() if p.name == "__init__.py"}
    return {m: {d for d in deps if d not in packages or files[d].read_text().strip().count("\n") > 2} for m, deps in edges.items()}


def test_nothing_but_main_imports_the_cli():
    offenders = sorted(m for m, deps in graph().items() if "lmforge.cli" in deps and m != "lmforge.__main__")
    assert not offenders, f"library modules import the CLI: {offenders}"


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_check_sees_imports_inside_functions():
    """The walker is not blind: the loop imports the evaluation module and the CLI imports the recipe dispatch."""
    g = graph()
    assert "lmforge.train.evaluate" in g["lmforge.train.loop"]
    assert "lmforge.recipe" in g["lmforge.cli"]
