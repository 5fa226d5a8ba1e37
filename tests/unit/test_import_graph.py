"""No import circles in server/ and adapters/: each module's module-level imports (those under
``if TYPE_CHECKING:`` included: a circle of types is still a circle to a reader) form a graph
without cycles. Imports inside functions are left out: they are how a module defers a heavy or
optional dependency until it is used."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    modules = {}
    for package in packages:
        for path in (root / package).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ``modules`` that ``name`` imports outside functions. ``from pkg import sub``
    names the submodule when there is one, else the package."""
    found: set[str] = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name in modules)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = ".".join(
                        package[: len(package) - child.level + 1] + ([child.module] if child.module else [])
                    )
                else:
                    base = child.module or ""
                for alias in child.names:
                    target = f"{base}.{alias.name}"
                    if target in modules:
                        found.add(target)
                    elif base in modules:
                        found.add(base)
            else:
                visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    found.discard(name)
    return found


def import_cycles(root: Path, packages: tuple[str, ...]) -> list[list[str]]:
    """Every import circle, each as the path of modules that closes it (a → b → … → a)."""
    modules = _modules(root, packages)
    graph = {name: sorted(_imports(name, path, modules)) for name, path in modules.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in graph[module]:
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                walk(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module)
    return cycles


def test_server_and_adapters_have_no_import_circles() -> None:
    cycles = import_cycles(ROOT, ("server", "adapters"))
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_check_finds_a_circle_through_type_checking_and_relative_imports(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import thing\n"
    )
    (package / "c.py").write_text("def later():\n    from pkg import a\n")  # lazy: not an edge
    (package / "d.py").write_text("import pkg.c\n")
    assert import_cycles(tmp_path, ("pkg",)) == [["pkg.a", "pkg.sub.b", "pkg.a"]]
    (package / "sub" / "b.py").write_text("")
    assert import_cycles(tmp_path, ("pkg",)) == []
