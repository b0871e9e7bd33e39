"""The layout shows the architecture: no import cycle between atelier's packages, no module
file over MAX_LINES lines.

Every `import` counts (at module level or inside a function); only imports under
`if TYPE_CHECKING:` do not. The few function-level imports that point up the flow
(config -> data -> conditioning -> models/network -> objective -> optim -> loop ->
outputs/report) and would close a cycle are listed in KNOWN_LATE, each with its reason; any
other one fails the test.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from tests.helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "atelier"
MAX_LINES = 420

# (importing file, imported package): function-level imports allowed to point upward.
KNOWN_LATE = {
    # The config boundary runs the data layer's own option checks (caption options, buckets,
    # image limits) and raises its DatasetError; imported when called (the data layer brings torch).
    ("atelier/config/schema/dataset.py", "data"),
    # network.module's own rules are the kinds registry's (NetworkSpec.from_config).
    ("atelier/config/schema/network.py", "network"),
    # network.weights is read with the outputs layer's LoRA file reader.
    ("atelier/network/factory.py", "outputs"),
    # A sweep writes its report when its jobs are done; the report reads the sweep's plan.
    ("atelier/sweep/sweeper.py", "report"),
}


def _module_parts(path: Path) -> list[str]:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    nodes: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            nodes.update(id(n) for n in ast.walk(node))
    return nodes


def _imported(node: ast.AST, parts: list[str], is_init: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = parts[: len(parts) - node.level + (1 if is_init else 0)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        if module == "atelier":
            return [f"atelier.{alias.name}" for alias in node.names]
        return [module]
    return []


def package_edges() -> dict[tuple[str, str], list[str]]:
    """(package, imported package) -> where, for every import between two of atelier's
    top-level packages (or modules: cli, errors)."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = _module_parts(path)
        if len(parts) < 2:
            continue
        source = parts[1]
        rel = path.relative_to(REPO_ROOT).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_nodes(tree)
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            for module in _imported(node, parts, path.name == "__init__.py"):
                names = module.split(".")
                if names[0] != "atelier" or len(names) < 2 or names[1] == source:
                    continue
                if id(node) not in top and (rel, names[1]) in KNOWN_LATE:
                    continue
                edges[(source, names[1])].append(f"{rel}:{node.lineno} imports {module}")
    return edges


def package_cycles(edges: dict[tuple[str, str], list[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one package (Tarjan)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_no_import_cycle_between_packages() -> None:
    edges = package_edges()
    cycles = package_cycles(edges)
    report = []
    for group in cycles:
        report.append(f"cycle among {', '.join(group)}:")
        for (a, b), where in sorted(edges.items()):
            if a in group and b in group:
                report.extend(f"  {a} -> {b}: {w}" for w in where)
    assert not cycles, "\n".join(report)


def test_known_late_imports_still_exist() -> None:
    """An entry of KNOWN_LATE whose import is gone is deleted from the list."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(REPO_ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            for module in _imported(node, _module_parts(path), path.name == "__init__.py"):
                names = module.split(".")
                if len(names) > 1 and names[0] == "atelier":
                    found.add((rel, names[1]))
    assert KNOWN_LATE <= found, sorted(KNOWN_LATE - found)


def test_no_module_over_the_line_limit() -> None:
    lines = {path.relative_to(REPO_ROOT).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
             for path in sorted(PACKAGE.rglob("*.py"))}
    too_long = {path: n for path, n in lines.items() if n > MAX_LINES}
    assert not too_long, f"over {MAX_LINES} lines (split along a seam): {too_long}"
