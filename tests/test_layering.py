"""The package's layers, read from the source (no imports run): every import statement, at the top of a module
or inside a function, every importlib.import_module("t2i_fast....") with a literal name, and every registry
entry "t2i_fast.module:Name" (a string that is imported by name later, as methods.REGISTRY is).

    app layer   t2i_fast.cli, t2i_fast.app           may import anything below
    toy world   t2i_fast.toy.*, t2i_fast.testing     may import the core
    core        everything else                      imports neither of the layers above

and no module of the package takes part in an import cycle, lazy imports included (a cycle hidden in a
function body still fixes the order in which modules must be written and read)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import t2i_fast

PACKAGE = Path(t2i_fast.__file__).resolve().parent
APP = {"t2i_fast.cli", "t2i_fast.app"}
TOY_WORLD_PREFIXES = ("t2i_fast.toy", "t2i_fast.testing")
REGISTRY_ENTRY = re.compile(r"(t2i_fast(?:\.\w+)+):\w+")


def module_files() -> dict[str, Path]:
    """{dotted name: file} of every module under t2i_fast/ (a package under its own name, not __init__)."""
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("t2i_fast",) + path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def ours(name: str, modules) -> str | None:
    """The module of ours that importing `name` loads: itself, or its nearest known parent (t2i_fast.kernels
    serves the kernels/ folder, whose modules are not under t2i_fast/)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imported(module: str, path: Path, modules) -> set[str]:
    """The modules of ours that `module` imports anywhere in its file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # `from . import x` imports the module t2i_fast.x where there is one, else a name of the package
            names += [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                      for alias in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.append(node.args[0].value)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if entry := REGISTRY_ENTRY.fullmatch(node.value):
                names.append(entry.group(1))
    return {m for m in (ours(n, modules) for n in names if n.startswith("t2i_fast")) if m and m != module}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {m: imported(m, path, modules) for m, path in modules.items()}


def is_core(module: str) -> bool:
    return module not in APP and not module.startswith(TOY_WORLD_PREFIXES)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_analyzer_sees_lazy_relative_and_importlib_imports(graph):
    assert "t2i_fast.testing" in graph["t2i_fast.app"]  # inside a function: `from .testing import ...`
    assert "t2i_fast.run_folder" in graph["t2i_fast.trainer"]  # `from . import __version__, run_folder`
    assert "t2i_fast.kernels" in graph["t2i_fast.trainer"]  # `from .kernels._dispatch import ...`
    assert "t2i_fast.methods.two_stage" in graph["t2i_fast.methods"]  # REGISTRY's "module:Class" strings


def test_the_core_imports_neither_the_toy_world_nor_the_app(graph):
    upward = sorted(f"{m} -> {n}" for m, targets in graph.items() if is_core(m)
                    for n in targets if not is_core(n))
    assert not upward, "core modules importing the toy world, testing.py, the CLI or the app: " + ", ".join(upward)


def test_the_analyzer_sees_importlib_and_registry_strings(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text('import importlib\n'
                      'def f():\n    return importlib.import_module("t2i_fast.sampling")\n'
                      'REGISTRY = {"x": "t2i_fast.methods.lora:LoRA", "note": "t2i_fast.sampling is not an entry"}\n')
    modules = module_files()
    assert imported("t2i_fast.somewhere", source, modules) == {"t2i_fast.sampling", "t2i_fast.methods.lora"}


def test_the_toy_world_does_not_import_the_app(graph):
    upward = sorted(f"{m} -> {n}" for m, targets in graph.items() if m.startswith(TOY_WORLD_PREFIXES)
                    for n in targets if n in APP)
    assert not upward, ", ".join(upward)


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
