"""The package's import graph read from the source with ``ast``: every ``import`` statement of every
module of ``fedpers`` and ``strategies``, at the top level and inside functions alike (those under
``if TYPE_CHECKING:`` run never and are skipped).

An edge ``a -> b`` means module ``a`` imports module ``b``. ``from pkg import name`` points at the
submodule ``pkg.name`` when there is one, else at the module that defines ``name`` (so a package's lazy
re-exports, as in ``fedpers.data``, count as imports of the module that holds the object)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedpers", "strategies")


def module_files() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                for n in ast.walk(sub):
                    skip.add(id(n))
    return skip


def _owner(pkg: str, name: str, modules: dict[str, Path]) -> str:
    if f"{pkg}.{name}" in modules:
        return f"{pkg}.{name}"
    try:
        obj = getattr(importlib.import_module(pkg), name)
    except Exception:  # noqa: BLE001  (an unresolvable name stays an edge to the package itself)
        return pkg
    mod = getattr(obj, "__module__", None) if not isinstance(obj, type(importlib)) else obj.__name__
    return mod if mod in modules else pkg


def imports_of(module: str, modules: dict[str, Path]) -> set[str]:
    path = modules[module]
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_nodes(tree)
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PACKAGES:
                    out.add(a.name if a.name in modules else a.name.rsplit(".", 1)[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            if src.split(".")[0] not in PACKAGES:
                continue
            for a in node.names:
                out.add(_owner(src, a.name, modules))
    out.discard(module)
    return {m for m in out if m in modules}


def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {m: imports_of(m, modules) for m in modules}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    import sys

    sys.setrecursionlimit(10000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return out
