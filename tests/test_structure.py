"""The code's shape: utils/ by concern, no import cycle, short functions.

Read from the source with ``ast``, so these checks cost no imports and no model.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "utils")
# The only modules directly under utils/: cross-cutting pieces every concern uses.
UTILS_TOP = {"__init__.py", "errors.py", "precision.py"}
MAX_FUNCTION_LINES = 60


def project_modules() -> dict[str, Path]:
    """Dotted name -> file of main.py, inference.py and every module of the packages."""
    found = {"main": REPO / "main.py", "inference": REPO / "inference.py"}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that ``name`` imports anywhere in its file (function-level imports too:
    a lazy import does not hide a cycle)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import sub` imports the module pkg.sub; `from mod import name` imports mod
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in modules and t != name)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` as a list of modules, or []."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_utils_is_grouped_by_concern():
    loose = sorted(p.name for p in (REPO / "utils").glob("*.py") if p.name not in UTILS_TOP)
    assert loose == [], f"modules directly under utils/ (put them in the subpackage of their concern): {loose}"
    for package in sorted(p for p in (REPO / "utils").iterdir() if p.is_dir() and p.name != "__pycache__"):
        init = package / "__init__.py"
        assert init.is_file(), f"{package} has no __init__.py"
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init} does not say what the package holds"


def test_every_module_says_what_it_holds():
    for name, path in project_modules().items():
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path.relative_to(REPO)} has no module docstring"


def test_no_import_cycle():
    modules = project_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert graph["main"] and graph["utils.checkpoint.training"], "the import graph came out empty"
    cycle = find_cycle(graph)
    assert cycle == [], "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


@pytest.mark.parametrize("name", ["main", "inference", "models", "utils"])
def test_functions_are_short(name):
    paths = [REPO / f"{name}.py"] if name in ("main", "inference") else sorted((REPO / name).rglob("*.py"))
    long = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == [], f"functions over {MAX_FUNCTION_LINES} lines: {long}"
