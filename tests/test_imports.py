"""The import structure of the project's packages: no cycles, no reaching into another
module's private names (STYLE.md: two modules that need each other's internals are one
component cut in the wrong place).

Every `import` and `from ... import` counts, wherever it stands in the file (inside a
function, under `if TYPE_CHECKING:`): a deferred import hides a cycle, it does not cut it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shared", "factory", "trainer")


@dataclass(frozen=True, slots=True)
class Import:
    importer: str
    target: str  # a project module
    name: str | None  # for `from target import name`, when name is not a submodule
    where: str  # file:line

    def __str__(self) -> str:
        what = f"from {self.target} import {self.name}" if self.name else f"import {self.target}"
        return f"{self.where}: {what}"


def find_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    modules = {}
    for package in packages:
        for file in sorted((root / package).rglob("*.py")):
            parts = file.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return modules


def find_imports(root: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import of a project module by a project module, relative ones resolved;
    `from package import submodule` imports the submodule."""
    found = []
    for module, file in modules.items():
        where = file.relative_to(root)
        package = module if file.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if (target := _known_prefix(alias.name, modules)) is not None:
                        found.append(Import(module, target, None, f"{where}:{node.lineno}"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(parent + ([base] if base else []))
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:
                        found.append(Import(module, f"{base}.{alias.name}", None, f"{where}:{node.lineno}"))
                    elif base in modules:
                        found.append(Import(module, base, alias.name, f"{where}:{node.lineno}"))
    return found


def _known_prefix(dotted: str, modules: dict[str, Path]) -> str | None:
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def find_cycles(imports: list[Import]) -> list[list[Import]]:
    """One cycle (as the imports along it) per strongly connected group of modules."""
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports:
        if imp.target != imp.importer:
            edges.setdefault(imp.importer, {}).setdefault(imp.target, imp)
    cycles = []
    for group in _strongly_connected(edges):
        start = min(group)
        paths = {start: []}  # breadth first, inside the group, back to start
        queue = [start]
        while queue:
            module = queue.pop(0)
            for target, imp in sorted(edges.get(module, {}).items()):
                if target == start:
                    cycles.append(paths[module] + [imp])
                    queue = []
                    break
                if target in group and target not in paths:
                    paths[target] = paths[module] + [imp]
                    queue.append(target)
    return cycles


def _strongly_connected(edges: dict[str, dict[str, Import]]) -> list[set[str]]:
    """Tarjan's algorithm; groups of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in edges.get(module, {}):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(group)

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return groups


def describe(cycle: list[Import]) -> str:
    chain = " -> ".join([cycle[0].importer, *(imp.target for imp in cycle)])
    return chain + "\n" + "\n".join(f"    {imp}" for imp in cycle)


def private_imports(imports: list[Import]) -> list[Import]:
    return [imp for imp in imports if imp.name and imp.name.startswith("_") and not imp.name.startswith("__")
            and imp.target != imp.importer]


def project_imports() -> list[Import]:
    modules = find_modules(ROOT, PACKAGES)
    assert {"shared.shards", "factory.pipeline", "trainer.train"} <= modules.keys(), "the packages moved?"
    return find_imports(ROOT, modules)


def test_project_modules_import_one_another_without_a_cycle():
    cycles = find_cycles(project_imports())
    assert not cycles, "import cycles (move what both sides need into a module they both import):\n" + \
        "\n".join(map(describe, cycles))


def test_no_module_imports_another_modules_private_name():
    offending = private_imports(project_imports())
    assert not offending, "imports of another module's private names (give them a public name):\n" + \
        "\n".join(f"    {imp}" for imp in offending)


def test_the_checks_see_deferred_relative_and_submodule_imports(tmp_path):
    """The two checks on a made-up package, so that they cannot pass by seeing nothing."""
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "def f():\n    from pkg.sub import b\n",  # deferred, a submodule: a -> pkg.sub.b
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n",  # b -> c
        "pkg/sub/c.py": "from ..a import _helper\n",  # relative: c -> pkg.a, a private name
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    imports = find_imports(tmp_path, find_modules(tmp_path, ("pkg",)))
    cycles = find_cycles(imports)
    assert [describe(c).splitlines()[0] for c in cycles] == ["pkg.a -> pkg.sub.b -> pkg.sub.c -> pkg.a"]
    assert [str(i) for i in private_imports(imports)] == ["pkg/sub/c.py:1: from pkg.a import _helper"]
