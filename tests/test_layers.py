"""The package's import layers (docs/architecture.md): every galbayes module imports only
modules of its own layer or below, and the module graph has no cycles.

The check reads the source (an AST walk, no imports executed): ``import galbayes.x`` and
``from .x import y`` anywhere in a module — at the top or inside a function — count. The one
exception is the body of a module-level ``__getattr__``: that is where a deprecated name is
forwarded to its new home for one release, and it runs only when the old name is used.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "galbayes"

#: Lowest first. A module may import modules of its own layer or of a lower one.
LAYERS = [
    # foundations: no galbayes imports but each other's
    ("base", ["errors", "params", "_sersic_nu_coeffs", "special", "geometry", "likelihood", "status",
              "results", "cache", "traced", "compiled"]),
    ("profiles", ["profiles", "profiles.builtin", "psf"]),
    ("data", ["noise", "data", "initial", "datasets"]),
    ("model", ["model"]),
    ("batching", ["batching", "devices"]),
    ("inference", ["inference", "inference.map", "inference.laplace", "inference.bootstrap",
                   "inference.nuts"]),
    ("io", ["catalog", "recipe", "prepare", "mocks", "reference", "compare"]),
    ("pipeline", ["fitting", "runner", "pipeline", "sampling"]),
    ("front", ["plot", "cli", "__main__"]),
]
#: Within a layer, the order in which modules may build on each other (no cycles).
ORDER = {name: (i, j) for i, (_, names) in enumerate(LAYERS) for j, name in enumerate(names)}


def _module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, root: Path = PACKAGE) -> set[str]:
    """galbayes modules imported by the file (names relative to the package)."""
    name = _module_name(path, root)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    tree = ast.parse(path.read_text())
    shims = {id(n) for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "__getattr__"
             for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in shims:
            continue
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else package
                mod = ".".join([*base, node.module] if node.module else base)
                targets.append(mod)
                targets += [f"{mod}.{a.name}" if mod else a.name for a in node.names]
            elif (node.module or "").split(".")[0] == "galbayes":
                mod = node.module[len("galbayes"):].lstrip(".")
                targets.append(mod)
                targets += [f"{mod}.{a.name}" if mod else a.name for a in node.names]
        elif isinstance(node, ast.Import):
            targets += [a.name[len("galbayes"):].lstrip(".") for a in node.names
                        if a.name.split(".")[0] == "galbayes"]
        found.update(t for t in targets if t in ORDER and t != name)
    return found


def _graph() -> dict:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer():
    missing = sorted(set(_graph()) - set(ORDER) - {""})
    assert not missing, f"modules without a layer in tests/test_layers.py (and docs/architecture.md): {missing}"


def test_imports_go_only_downward():
    upward = []
    for mod, deps in _graph().items():
        if mod not in ORDER:
            continue
        for dep in deps:
            if dep.startswith(mod + ".") or mod == "inference" and dep.startswith("inference."):
                continue                                   # a package's __init__ re-exports its modules
            if ORDER[dep] > ORDER[mod]:
                upward.append(f"{mod} ({LAYERS[ORDER[mod][0]][0]}) imports {dep} ({LAYERS[ORDER[dep][0]][0]})")
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = _graph()
    state: dict = {}
    cycles = []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if dep.startswith(node + ".") or not dep:
                continue
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]) if dep in stack else f"{node} -> {dep}")
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("source, expected", [
    ("from .pipeline import fit\n", {"pipeline"}),
    ("def f():\n    from ..catalog import read_catalog\n", {"catalog"}),
    ("import galbayes.runner\n", {"runner"}),
    ("def __getattr__(name):\n    from .sampling import sample_results\n", set()),
])
def test_the_walk_sees_imports_anywhere_but_deprecation_shims(tmp_path, source, expected):
    """The checker itself: function-level imports count, ``__getattr__`` shims do not."""
    pkg = tmp_path / "galbayes"
    (pkg / "inference").mkdir(parents=True)
    where = pkg / "inference" / "nuts.py" if source.startswith("def f") else pkg / "model.py"
    where.write_text(source)
    assert _imports(where, pkg) == expected
