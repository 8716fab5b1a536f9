"""The import graph of client/ and server/ has no cycles and no import of another package's
private module.

Every import statement counts: module level, under ``if TYPE_CHECKING:`` and inside functions
(ast, not the import machinery). A package is ``floworacle``, ``floworacle.protocol`` or a room
of the server (``floworacle_server.<room>``); a module whose name starts with "_" is private to
its package, which offers what others may use in its ``__init__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for base in ("client", "server"):
        for path in (ROOT / base).rglob("*.py"):
            if path.name.endswith("_pb2.py") or path.name.endswith("_pb2_grpc.py"):
                continue
            parts = list(path.relative_to(ROOT / base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _package(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "floworacle_server" or parts[:2] == ["floworacle", "protocol"]:
        return ".".join(parts[:2])
    return parts[0]


def _imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``module`` imports (an imported name that is a module counts as that module)."""
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join([*here, *([node.module] if node.module else [])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for target in targets:
            while target and target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != module:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {m: _imports(m, p, known) for m, p in known.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            advanced = False
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_graph_is_read_as_intended() -> None:
    graph = _graph()
    # a few edges that must be seen (module level, function-local, relative-free package imports)
    assert "floworacle.protocol._query" in graph["floworacle.protocol"]
    assert "floworacle_server.engine" in graph["floworacle_server.service._compute"]
    assert "floworacle_server.data" in graph["floworacle_server.engine._batch"]
    assert any("floworacle_server.engine" in deps for deps in graph.values())
    assert len(graph) > 60


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_of_another_packages_private_module() -> None:
    bad = []
    for module, deps in _graph().items():
        for dep in deps:
            leaf = dep.rsplit(".", 1)[-1]
            if leaf.startswith("_") and _package(dep) != _package(module):
                bad.append(f"{module} -> {dep}")
    assert bad == [], "import what the package's __init__ offers instead:\n" + "\n".join(sorted(bad))
