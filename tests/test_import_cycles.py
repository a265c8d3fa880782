"""The packages of velotune import one way: no import cycle between them.

Every `import` and `from ... import` under src/velotune counts, including those inside functions
(a lazy import is still a dependency); only `if TYPE_CHECKING:` blocks, which never run, are left
out. A node is a top-level package (`models`, `loaders`, ...) or a top-level module (`errors`,
`estimate`); `velotune` itself is the public facade. A cycle fails the test with the import lines
that close it."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src" / "velotune"

Edges = dict[str, dict[str, list[str]]]   # node -> imported node -> "file:line" of each import


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def node_of(module: str) -> str:
    """The package-level node a module belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "velotune"


def imported_modules(tree: ast.Module, modules: set[str]) -> list[tuple[str, int]]:
    """(module, line) of every velotune import that can run."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "velotune":
            for alias in node.names:     # `from velotune import kernels` imports a submodule
                sub = f"{node.module}.{alias.name}"
                found.append((sub if sub in modules else node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "velotune")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def package_edges(root: Path = SOURCE) -> Edges:
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    edges: Edges = defaultdict(lambda: defaultdict(list))
    for module, path in files.items():
        source = node_of(module)
        for target, line in imported_modules(ast.parse(path.read_text(encoding="utf-8")), set(files)):
            node = node_of(target)
            if node != source:
                edges[source][node].append(f"{path.relative_to(root.parent)}:{line}")
    return edges


def find_cycle(edges: Edges) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}    # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle_between_packages():
    edges = package_edges()
    assert {"models", "loaders", "kernels"} <= set(edges["train"]) and "kernels" in edges["models"]   # it reads them
    cycle = find_cycle(edges)
    if cycle:
        steps = [f"{a} -> {b}: {', '.join(edges[a][b][:3])}" for a, b in zip(cycle, cycle[1:])]
        raise AssertionError("import cycle between velotune packages:\n  " + "\n  ".join(steps))


def test_the_cycle_finder_finds_a_planted_cycle(tmp_path):
    """The check above can fail: a three-package cycle written to disk is found and reported."""
    root = tmp_path / "velotune"
    for package, imports in {"a": "from velotune.b import x", "b": "import velotune.c.y",
                             "c": "def f():\n    from velotune.a import z"}.items():
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text(imports + "\n")
    (root / "__init__.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import velotune.a\n")
    edges = package_edges(root)
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert "velotune" not in edges      # TYPE_CHECKING imports never run
