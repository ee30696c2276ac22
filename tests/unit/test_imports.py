"""The package's imports form no cycle.

A cycle makes what a module sees depend on which one was imported first (a half-initialised
module, names missing at import time), and it hides which of two modules is the lower layer.
The graph is built with `ast` from every import statement of a module, wherever it stands
(inside functions and `if TYPE_CHECKING:` too: a deferred import still ties the two modules
together), resolving `from . import x` to the submodule `x`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "python"


def _modules() -> dict[str, Path]:
    out = {}
    for path in (ROOT / "minisgl").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules its execution imports (target and its parent packages,
    except the importer's own parents, which are already initialising when it runs)."""
    modules, graph = _modules(), {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        targets = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
                continue
            if not isinstance(node, ast.ImportFrom):
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets.append(base)
            targets += [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
        own_parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        edges = set()
        for t in targets:
            parts = t.split(".")
            for i in range(1, len(parts) + 1):
                mod = ".".join(parts[:i])
                if mod in modules and mod != name and mod not in own_parents:
                    edges.add(mod)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_find_cycle_reports_one() -> None:
    """find_cycle returns a cycle as the path that closes on its first module (a -> b -> c -> a) and
    None for a graph without one."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_resolves_relative_imports() -> None:
    """The import graph has an edge for each kind of import: scheduler.scheduler -> core, `from
    .radix import ...` in kvcache's __init__ -> kvcache.radix, and `from ..kernel import x` resolved
    to the submodule kernel.triton_ops."""
    graph = import_graph()
    assert "minisgl.core" in graph["minisgl.scheduler.scheduler"]
    assert "minisgl.kvcache.radix" in graph["minisgl.kvcache"]  # `from .radix import ...`
    assert "minisgl.kernel.triton_ops" in graph["minisgl.engine.graph"]  # `from ..kernel import x`


def test_package_imports_are_acyclic() -> None:
    """The imports between minisgl's modules form no cycle; a failure names the cycle found."""
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
