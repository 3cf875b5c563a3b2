"""Static (ast-only) view of histolab's own imports, for tests/test_import_structure.py.

Nothing here imports the package: the checker must work on a tree that would not even import
(that is when a cycle bites).  Imports inside functions count as edges too: a lazy import
hides a circle from the interpreter but not from the reader, and the flow data -> encoders ->
adapters -> pipeline -> generation -> ui/cli is a design rule, not an import-time accident.
Only imports under ``if TYPE_CHECKING:`` are left out, because they never execute.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Graph:
    root: str
    edges: dict[str, set[str]] = field(default_factory=dict)
    # (importer, imported module, private name, line)
    private: list[tuple[str, str, str, int]] = field(default_factory=list)


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package."""
    root = package_dir.name
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join([root, *parts])] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Yield Import/ImportFrom nodes, skipping ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def build(package_dir: Path) -> Graph:
    modules = module_names(package_dir)
    graph = Graph(root=package_dir.name)
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets: set[str] = set()
        aliases: dict[str, str] = {}  # local name -> histolab module it is bound to
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        targets.add(alias.name)
                        if alias.asname:
                            aliases[alias.asname] = alias.name
                continue
            if node.level:
                base_parts = here.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base not in modules:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:  # `from pkg import submodule`
                    targets.add(sub)
                    aliases[alias.asname or alias.name] = sub
                else:
                    targets.add(base)
                    if _private(alias.name) and base != name:
                        graph.private.append((name, base, alias.name, node.lineno))
        # `import histolab.pipeline as p; p._assemble(...)` is the same private reach.
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and _private(node.attr)
                and aliases[node.value.id] != name
            ):
                graph.private.append((name, aliases[node.value.id], node.attr, node.lineno))
        targets.discard(name)
        graph.edges[name] = targets
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """Every strongly connected component with more than one module, each as one cycle path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.edges.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph.edges):
        if v not in index:
            strongconnect(v)
    return [_cycle_path(graph, set(c)) for c in components]


def _cycle_path(graph: Graph, members: set[str]) -> list[str]:
    """One concrete loop through a component (breadth-first back to its first member)."""
    start = min(members)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.edges[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(members)
