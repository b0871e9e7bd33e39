"""The layout shows the architecture: every import between atelier's packages points down the
flow (LAYERS), so there is no import cycle and no upward import; no module file is over
MAX_LINES lines.

Every `import` counts, at module level or inside a function; only imports under
`if TYPE_CHECKING:` (annotations) do not.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from tests.helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "atelier"
MAX_LINES = 420

# atelier's packages (and top-level modules) in the order data flows through a run, each
# allowed to import only those before it. config holds what the config's choices and rules
# are made of (the network kinds, the sampler names, the sample-prompt syntax); runtime is
# the process around a run (signals, phase timing, the data-parallel rank, what jobs of one
# process share); launchers, sweeps and tools sit beside the run and drive it. assets holds
# the files shipped with the package. families holds what differs between model families
# (atelier.families.family), which every layer above asks instead of branching on the version;
# plugins holds each family's behaviour (atelier.plugins.plugin), choosing code of the layers
# below it, and is asked by the layers above.
LAYERS = (
    "assets", "errors", "utils", "families",
    "config", "runtime",
    "data", "conditioning", "models", "network", "objective", "optim", "sampling", "plugins",
    "outputs", "search", "loop", "fused",
    "report", "sweep", "launch", "tools", "cli",
)  # fmt: skip


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
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            for module in _imported(node, parts, path.name == "__init__.py"):
                names = module.split(".")
                if names[0] != "atelier" or len(names) < 2 or names[1] == source:
                    continue
                edges[(source, names[1])].append(f"{rel}:{node.lineno} imports {module}")
    return edges


def test_every_package_has_its_place_in_the_flow() -> None:
    found = {path.stem if path.is_file() else path.name
             for path in PACKAGE.iterdir()
             if (path.is_dir() and (path / "__init__.py").exists()) or (path.suffix == ".py" and path.stem != "__init__")}
    assert found == set(LAYERS), f"add to LAYERS, in its place: {sorted(found - set(LAYERS))}; gone: {sorted(set(LAYERS) - found)}"


def test_imports_point_down_the_flow() -> None:
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = [f"{source} -> {target}: {where}"
              for (source, target), places in sorted(package_edges().items())
              if rank[target] > rank[source]
              for where in places]  # fmt: skip
    assert not upward, "imports that point up the flow (move the code down, or the module up):\n" + "\n".join(upward)


def test_no_module_over_the_line_limit() -> None:
    lines = {path.relative_to(REPO_ROOT).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
             for path in sorted(PACKAGE.rglob("*.py"))}
    too_long = {path: n for path, n in lines.items() if n > MAX_LINES}
    assert not too_long, f"over {MAX_LINES} lines (split along a seam): {too_long}"
