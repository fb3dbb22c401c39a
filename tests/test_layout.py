"""The package layout has no import circles, and every module imports on its own.

The graph is read from the source with `ast`: an edge A → B for every ``import r2m_fast.B`` /
``from r2m_fast import B`` / ``from r2m_fast.B import ...`` in A. Imports under ``if TYPE_CHECKING:``
(annotations only) and under ``if __name__ == "__main__":`` (A run as a script is not the module A)
are not edges.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "r2m_fast"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))

def _imports(body: list[ast.stmt], module_level_only: bool) -> set[str]:
    found: set[str] = set()
    for node in body:
        if isinstance(node, ast.If):
            test = ast.unparse(node.test)
            if "TYPE_CHECKING" in test or "__name__" in test:
                continue
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "r2m_fast":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("r2m_fast."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("r2m_fast."))
        for field in ("body", "orelse", "finalbody", "handlers"):
            children = getattr(node, field, None)
            if not isinstance(children, list):
                continue
            if module_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue  # runs when called, not when the module is imported
            found |= _imports([c for c in children if isinstance(c, ast.AST)], module_level_only)
    return found & set(MODULES)


def import_graph(module_level_only: bool) -> dict[str, set[str]]:
    graph = {}
    for name in MODULES:
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        graph[name] = _imports(tree.body, module_level_only) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of `graph` as [a, b, ..., a], or [] when it has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_at_module_level():
    assert find_cycle(import_graph(module_level_only=True)) == []


def test_no_import_circles_even_through_lazy_imports():
    """Imports inside functions close no circle either: the layout is a layering, not a web."""
    assert find_cycle(import_graph(module_level_only=False)) == []


def test_every_module_imports_in_a_fresh_interpreter():
    """Every module imports in an interpreter that has imported nothing of r2m_fast before (an import
    cycle at module level shows up as a partially initialized module)."""
    names = ["r2m_fast"] + [f"r2m_fast.{m}" for m in MODULES if m not in ("__init__", "__main__")]
    run = subprocess.run([sys.executable, "-c", "; ".join(f"import {n}" for n in names)],
                         capture_output=True, text=True, cwd=PACKAGE.parent)
    assert run.returncode == 0, run.stderr[-2000:]


def _callers(function: str) -> set[str]:
    """Modules of r2m_fast (and, in engine, the functions) that call `function` by name."""
    found = set()
    for name in MODULES:
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        for outer in ast.walk(tree):
            if not isinstance(outer, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(outer):
                if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == function:
                    found.add(f"{name}.{outer.name}")
    return found


def test_the_pass_sequence_is_written_once():
    """Passes 2 and 3 and the N×N solve are called from engine.run_passes only: a fresh merge, an add,
    a remove and a distributed merge are variants it takes (a pass 1, an Exchange), not copies."""
    for step in ("solve_real_subspace", "factor_pass", "accumulate_pass", "residual_norms_from_kept"):
        assert _callers(step) <= {"engine.run_passes", "engine.residual_norms"}, step


def test_one_output_folder_transaction():
    """Temporary output folders are made, and outputs moved into place, by output.OutputFolder only."""
    assert _callers("make_temp_dir") == {"output.__enter__", "output.commit"}
    assert {c.split(".")[0] for c in _callers("OutputFolder")} <= {"file_merge", "distributed"}
