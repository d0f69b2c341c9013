"""The house rules of metrank/ (see the README's module map): an acyclic import graph, no function-level imports
of metrank modules (the usual way to hide a cycle), lower rooms never importing higher ones, and Ray only in
metrank.scale."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "metrank"

# room -> rooms it must never import (a lower room never imports a higher one)
FORBIDDEN = {
    "metrank.errors": ("metrank.",),
    "metrank.validation": ("metrank.pairs", "metrank.losses", "metrank.training", "metrank.search"),
    "metrank.pairs": ("metrank.losses", "metrank.miners", "metrank.training"),
    "metrank.losses": ("metrank.training", "metrank.search", "metrank.scale", "metrank.commands"),
    "metrank.miners": ("metrank.losses", "metrank.training", "metrank.search"),
    "metrank.samplers": ("metrank.losses", "metrank.training", "metrank.search"),
    "metrank.index": ("metrank.metrics", "metrank.search", "metrank.training"),
    "metrank.metrics": ("metrank.search", "metrank.training", "metrank.scale"),
    "metrank.encoders": ("metrank.training", "metrank.search", "metrank.scale"),
    "metrank.data": ("metrank.training", "metrank.search", "metrank.scale"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> tuple[set[str], list[tuple[int, str]]]:
    """(module-level metrank imports, function-level metrank imports as (line, module))."""
    tree = ast.parse(path.read_text())
    top, nested = set(), []

    def names(node: ast.AST) -> list[str]:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            return [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        return []

    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            top.update(n for n in names(node) if n.startswith("metrank"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                nested += [(sub.lineno, n) for n in names(sub) if n.startswith("metrank") or n == "ray"]
    return top, nested


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        top, _ = imports(path)
        edges[name] = {t for t in top if t in modules and t != name}
    return edges


def test_import_graph_has_no_cycle():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_no_function_level_imports_of_metrank_modules():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parts[-2] == "scale":
            continue  # metrank.scale imports ray lazily (an optional dependency) and nothing else
        found += [f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}" for line, name in imports(path)[1]]
    assert not found, "\n".join(found)


def test_lower_rooms_never_import_higher_ones():
    bad = []
    for module, targets in graph().items():
        for room, forbidden in FORBIDDEN.items():
            if module == room or module.startswith(room + "."):
                bad += [f"{module} imports {t}" for t in targets if t.startswith(forbidden) and not t.startswith(room)]
    assert not bad, "\n".join(bad)


def test_only_scale_imports_ray():
    for path in PACKAGE.rglob("*.py"):
        if path.parts[-2] != "scale":
            source = path.read_text()
            assert "import ray" not in source and "from ray" not in source, path
