"""The package's shape, read from its source with ``ast``: no import circles, layers that depend one way
(platform -> pipelines -> models), a model layer free of Ray and MLflow, and functions short enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "evadlab"
# A function longer than this must be a flat table of definitions (the developers' guide says about 60 lines).
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str) -> set[str]:
    """Every module ``name`` imports, at module level or inside functions, resolved to absolute names."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            # "from evadlab.platform import train" imports the module evadlab.platform.train.
            found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES}
    return found


def internal_imports(name: str) -> set[str]:
    return {other for other in imported_modules(name) if other in MODULES and other != name}


def test_there_are_no_import_circles():
    graph = {name: internal_imports(name) for name in MODULES}
    visiting, done, circles = [], set(), []

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            circles.append(" -> ".join(visiting[visiting.index(name):] + [name]))
            return
        visiting.append(name)
        for other in sorted(graph[name]):
            visit(other)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert not circles, circles


@pytest.mark.parametrize(("layer", "forbidden"), [
    ("evadlab.models", ("evadlab.pipelines", "evadlab.platform", "evadlab.cli", "ray", "mlflow")),
    ("evadlab.pipelines", ("evadlab.platform", "evadlab.cli", "mlflow")),
    ("evadlab.platform", ("evadlab.cli",)),
])
def test_layers_depend_one_way(layer, forbidden):
    offending = {
        f"{name} imports {other}"
        for name in MODULES if name == layer or name.startswith(f"{layer}.")
        for other in imported_modules(name)
        if any(other == prefix or other.startswith(f"{prefix}.") for prefix in forbidden)
    }
    assert not offending, sorted(offending)


def test_functions_are_short():
    long_functions = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}: {length} lines")
    assert not long_functions, long_functions
