"""The package's modules and the imports each of them runs, read from the source: nothing is imported.

An import inside a function counts (it runs when the function does, and still makes the two
modules depend on each other); one under `if TYPE_CHECKING:` does not (its else branch does).
`importlib.import_module("name")` with a literal name is an import of that name."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ckptsync"


@dataclass(frozen=True)
class Import:
    name: str      # absolute; `from x import y` is x.y where that is a module of the package, else x
    line: int
    at_top: bool   # runs when the module is imported, not only when a function of it is called


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def sources() -> dict[str, Path]:
    """Module name -> its file, for every module of the package."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@cache
def tree(name: str) -> ast.Module:
    return ast.parse(sources()[name].read_text(encoding="utf-8"))


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _import_call(node: ast.AST) -> bool:
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)):
        return False
    func = node.func
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id in ("import_module", "__import__"))


def _runs(nodes, at_top: bool):
    """(import node, at_top) for every import below `nodes` that runs (not under TYPE_CHECKING)."""
    for node in nodes:
        if _type_checking(node):
            yield from _runs(node.orelse, at_top)
        elif isinstance(node, (ast.Import, ast.ImportFrom)) or _import_call(node):
            yield node, at_top
        else:
            inner = at_top and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from _runs(ast.iter_child_nodes(node), inner)


def imports_in(module: ast.Module, here: list[str], known: set[str] | dict) -> list[Import]:
    """The imports `module` runs; `here` is the package its relative imports start from."""
    found = []
    for node, at_top in _runs([module], True):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            names = [node.args[0].value]
        found += [Import(n, node.lineno, at_top) for n in names]
    return found


@cache
def imports(name: str) -> tuple[Import, ...]:
    """The imports module `name` of the package runs."""
    path = sources()[name]
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    return tuple(imports_in(tree(name), here, sources()))


def package_module(name: str) -> str | None:
    """The module of the package that importing `name` loads last, or None for another library."""
    while name and name not in sources():
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports. A module's own packages (whose __init__ Python
    loads first) are left out: that order is not a cycle."""
    graph: dict[str, set[str]] = {}
    for name in sources():
        deps = {package_module(i.name) for i in imports(name)} - {None, name}
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    return graph
