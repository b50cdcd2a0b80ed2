"""The import graph of ``gateway`` and ``adapters``, read from the source, has no cycle.

Every ``import`` and ``from … import`` of a gateway or adapters module is an edge, those
inside functions too (a lazy import that dodges a cycle at run time is still a cycle in
the design). ``from gateway.x import name`` is an edge to ``gateway.x.name`` when that is
a module, else to ``gateway.x``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "adapters")

# Cycles known today, each the exact set of its modules with the reason it is kept: a new
# cycle, or a known one that grows or shrinks, fails.
KNOWN: dict[frozenset[str], str] = {}  # none: keep it so


def _modules() -> dict[str, Path]:
    """Every module of the packages, by dotted name (a package by its ``__init__``)."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imported(node: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """The dotted names one import statement asks for (candidates, not yet resolved)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
    elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: from the module's own package upwards
            base = module.split(".")
            if not is_package:
                base.pop()
            base = base[: len(base) - (node.level - 1)]
            source = ".".join([*base, *([node.module] if node.module else [])])
        else:
            source = node.module or ""
        for alias in node.names:
            yield f"{source}.{alias.name}"
        yield source


def import_graph() -> dict[str, set[str]]:
    """Module → the gateway/adapters modules it imports."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            candidates = list(_imported(node, name, is_package))
            if isinstance(node, ast.ImportFrom):
                *names, source = candidates
                targets = [n if n in modules else source for n in names]
            else:
                targets = candidates
            for target in targets:
                # ``import gateway.x.y`` of a name that is not a module: its nearest module.
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Tarjan's components of more than one module (each one a cycle, or several)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    counter = 0

    def visit(start: str) -> None:  # iterative, so a deep graph cannot hit the limit
        nonlocal counter
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(frozenset(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return found


def _cycle_path(graph: dict[str, set[str]], component: frozenset[str]) -> str:
    """One cycle through the component, as ``a -> b -> a``, for the failure message."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & component):
            if nxt == start:
                return " -> ".join([*paths[node], start])
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                queue.append(nxt)
    return ", ".join(sorted(component))  # pragma: no cover - a component has a cycle


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    """The tree's import graph, parsed once for this module's tests (about 2 s of ast)."""
    return import_graph()


def test_the_graph_sees_modules_and_their_imports(graph: dict[str, set[str]]) -> None:
    """The graph is read from the source: it knows the pipeline imports the errors."""
    assert "gateway.exchange.pipeline" in graph
    assert "adapters.base" in graph
    assert "gateway.errors" in graph["gateway.exchange.pipeline"]


def test_a_cycle_is_found_and_named() -> None:
    """The detector finds a three-module cycle, and no cycle in a chain."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [frozenset("abc")]
    assert _cycle_path(graph, frozenset("abc")) == "a -> b -> c -> a"
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_gateway_or_adapters(graph: dict[str, set[str]]) -> None:
    """No module of gateway/ or adapters/ reaches itself through imports, except KNOWN."""
    new = [c for c in strongly_connected(graph) if c not in KNOWN]
    assert not new, "import cycles:\n" + "\n".join(_cycle_path(graph, c) for c in new)


def test_the_known_cycles_still_exist(graph: dict[str, set[str]]) -> None:
    """A known cycle that is broken leaves the allow-list (it cannot come back unseen)."""
    components = set(strongly_connected(graph))
    gone = [sorted(c) for c in KNOWN if c not in components]
    assert not gone, f"no longer cycles, remove from KNOWN: {gone}"


# The rooms of the house, lowest first (docs/architecture.md draws them): a module may
# import its own room and the rooms below it, never one above. The floor is gateway's
# top-level modules (errors, encoding, states, masking, formats, problem, validation) and
# adapters.base, the interface every adapter implements.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("floor",),
    ("gateway.crypto",),
    ("gateway.signing",),
    ("gateway.config",),
    ("gateway.store", "adapters"),
    ("gateway.runtime",),
    ("gateway.observe",),
    ("gateway.audit",),
    ("gateway.federation",),
    ("gateway.exchange",),
    ("gateway.admin",),
    ("gateway.serve",),
    ("gateway.cli",),
)
RANK = {room: rank for rank, rooms in enumerate(LAYERS) for room in rooms}


def room_of(module: str) -> str:
    """The room a module lives in: its subpackage of gateway/, adapters, or the floor."""
    if module == "adapters.base" or module == "gateway" or module == "adapters":
        return "floor"
    if module.startswith("adapters."):
        return "adapters"
    parts = module.split(".")
    if len(parts) >= 2 and f"gateway.{parts[1]}" in RANK:
        return f"gateway.{parts[1]}"
    return "floor"


def test_every_subpackage_is_a_room() -> None:
    """Each subpackage of gateway/ has its place in LAYERS (a new one must be placed)."""
    packages = {p.name for p in (ROOT / "gateway").iterdir() if (p / "__init__.py").exists()}
    assert {f"gateway.{p}" for p in packages} <= set(RANK)


def test_no_module_imports_a_room_above_its_own() -> None:
    """Imports go down the house (or sideways within a room), never up."""
    graph = import_graph()
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if RANK[room_of(target)] > RANK[room_of(module)]
        or (RANK[room_of(target)] == RANK[room_of(module)] and room_of(target) != room_of(module))
    )
    assert not upward, "imports up the house:\n" + "\n".join(upward)
