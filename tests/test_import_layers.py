"""minseg's modules import each other without a cycle (so each can be read before the ones above it).

Static: parse every module of ``minseg/`` and ``kernels/``, collect every import of
a module of the two packages -- at the top *and* inside functions, since a deferred
import is still a dependency a reader must follow -- and fail on any cycle.
``from . import X`` counts as an import of the submodule ``X`` where one exists,
and importing a package means importing its ``__init__``.
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("minseg", "kernels")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module
            targets = [stem]
            targets += [f"{stem}.{alias.name}" for alias in node.names if f"{stem}.{alias.name}" in known]
            if not node.module and all(f"{stem}.{alias.name}" in known for alias in node.names):
                targets.remove(stem)  # `from . import x` loads the package only on the way to x
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a function/class: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(name, path, known) for name, path in modules.items()}
    # A package's __init__ re-exports its submodules; a submodule loading the package on its
    # way to a sibling is not a dependency on everything the __init__ re-exports.
    for name in graph:
        graph[name] = {t for t in graph[name] if not (modules[t].name == "__init__.py" and name.startswith(t + "."))}
    return graph


def test_no_import_cycle_in_minseg_or_kernels():
    graph = _graph()
    assert "minseg.tensor" in graph["minseg.functional"], "the parser missed an import it must see"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_core_layers_point_one_way():
    graph = _graph()
    assert graph["minseg.autograd"].isdisjoint({"minseg.tensor", "minseg.functional"})
    assert "minseg.functional" not in graph["minseg.tensor"]
    assert not any(t.startswith("minseg") for t in graph["kernels.shapes"])
