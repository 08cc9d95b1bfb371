"""The package's layering rules, read from the code's own imports.

Every import is counted: at module level, inside functions, and under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "phxbroker"

# Lowest first. A module may import its own layer and the layers below it, never above.
LAYERS = (
    "protocol",
    "broker",
    "auth",
    "config",
    "hooks",
    "cluster",
    "transport",
    "ops",
    "daemon",
    "cli",
)
# Modules outside the layer folders, and where they stand.
TOP_LEVEL = {"phxbroker": "protocol", "phxbroker.__main__": "cli"}
SANS_IO = ("protocol", "broker")
IO_MODULES = ("trio", "ssl", "jwt", "cryptography", "h11", "wsproto", "socket")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports() -> dict[str, set[str]]:
    """Every phxbroker module and the phxbroker modules it imports."""
    graph: dict[str, set[str]] = {}
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                imported.add(base)
                # `from phxbroker.ops import logs` imports the module phxbroker.ops.logs.
                imported.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def layer_of(module: str) -> str:
    if module in TOP_LEVEL:
        return TOP_LEVEL[module]
    layer = module.split(".")[1]
    assert layer in LAYERS, f"{module} is in no layer; add its folder to LAYERS"
    return layer


def test_every_module_belongs_to_a_layer_folder() -> None:
    for module in package_imports():
        layer_of(module)


def test_no_import_cycle() -> None:
    graph = package_imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_lower_layers_never_import_higher_ones() -> None:
    rank = {layer: index for index, layer in enumerate(LAYERS)}
    wrong = [
        f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
        for module, targets in package_imports().items()
        for target in targets
        if rank[layer_of(target)] > rank[layer_of(module)]
    ]
    assert not wrong, "\n".join(sorted(wrong))


@pytest.mark.parametrize("layer", SANS_IO)
def test_sans_io_layers_load_no_io_library(layer: str) -> None:
    modules = sorted(m for m in package_imports() if m.startswith(f"phxbroker.{layer}"))
    script = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + f"print(sorted(m for m in sys.modules if m.split('.')[0] in {IO_MODULES!r}))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "[]", f"importing phxbroker.{layer} loads {loaded}"


def test_no_test_module_imports_another() -> None:
    tests = Path(__file__).resolve().parent
    for path in tests.rglob("*.py"):
        if "node_modules" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.split(".")[0].startswith(("test_", "conftest")), (
                    f"{path.relative_to(tests)} imports {name}: shared helpers go in tests/support/"
                )
