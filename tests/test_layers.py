"""The import structure: layers import one way, no module circle, no I/O client in the math.

Reads every product module's imports (function-level ones included) from its source, so a
change that makes an import run back up a layer, or two modules import each other, fails here.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
# bottom to top; a package may import its own layer's package and those below it
LAYER = {
    "driftrec.contract": 0,
    "driftrec.models": 1,
    "driftrec.storage": 2,
    "driftrec.streams": 3,
    "driftrec.serving": 3,
    "driftrec": 4,
}
IO_CLIENTS = ("redis", "kafka", "aiokafka", "faust", "fastapi", "starlette", "uvicorn", "httpx")


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted((REPO / folder).glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _package(module: str) -> str:
    return max((p for p in LAYER if module == p or module.startswith(p + ".")), key=len)


MODULES = _modules()
GRAPH = {m: {i for i in _imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}


def test_every_package_folder_is_a_known_layer() -> None:
    assert set(PACKAGES) == set(LAYER)
    assert len(MODULES) > 30


def test_imports_run_one_way() -> None:
    back = []
    for module, targets in GRAPH.items():
        src = _package(module)
        for target in targets:
            dst = _package(target)
            if dst == src:
                continue
            if LAYER[dst] >= LAYER[src]:  # up, or sideways between streams and serving
                back.append(f"{module} -> {target}")
    assert not back, "imports that run back up (or between streams and serving):\n" + "\n".join(sorted(back))


def test_no_module_circles() -> None:
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import circle: " + " -> ".join([*path[path.index(module) :], module]))
        if module in done:
            return
        for target in sorted(GRAPH[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(GRAPH):
        visit(module, [])


def test_the_math_imports_no_io_client() -> None:
    for module, path in MODULES.items():
        if _package(module) in ("driftrec.models", "driftrec.contract"):
            bad = {i for i in _imports(path) if i.split(".")[0] in IO_CLIENTS}
            assert not bad, f"{module} imports {sorted(bad)}"
