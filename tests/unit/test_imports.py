"""The import graph of `src/lorakit` (issue 25): no cycle, and no lorakit import hidden in a function.

Read from the source with `ast`, never by importing: every `import lorakit.x`, `from lorakit.x import
y` and relative import, at the top of a module or inside a function, is an edge from the importing
module to the module it runs:

- `import lorakit.a.b` and `from lorakit.a.b import name` run `lorakit.a.b` (its `__init__.py` when it
  is a package);
- `from lorakit.a import b`, where `lorakit.a.b` is a module, runs `lorakit.a.b` only: the package
  `lorakit.a` is its parent, which Python has imported (or is importing) before anything in it, so
  the parent's own imports never wait on it.

Imports under `if TYPE_CHECKING:` never run and are not edges.
"""

from __future__ import annotations

import ast
import itertools
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO

SRC = REPO / "src"
PACKAGE = "lorakit"

# Function-level imports of lorakit modules that are deliberate: (importing module, imported module)
# -> why. Every other import of a lorakit module belongs at the top of the module, where the graph
# below can see its order.
FUNCTION_LEVEL_ALLOWED: dict[tuple[str, str], str] = {
    ("lorakit.serve.server", "lorakit.serve.api"): (
        "the FastAPI layer imports fastapi and pydantic at its top; it is imported once `lorakit serve` "
        "starts, so `lorakit serve --help` imports no extra (docs/design.md, 'A lean core'; tests/cli/test_startup.py)"
    ),
}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the lorakit module the statement runs
    line: int
    in_function: bool


def _modules(src: Path = SRC) -> dict[str, Path]:
    """Dotted name -> file, for every module under src/lorakit (a package by its __init__.py)."""
    found = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement that can run, with whether it sits inside a function."""
    out: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child, in_function)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append((node, in_function))
        inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(tree, False)
    return out


def _imports(modules: dict[str, Path]) -> list[Import]:
    found = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node, in_function in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:  # relative: from the package of `name` (itself when it is a package)
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    origin = ".".join([*base, node.module] if node.module else base)
                else:
                    origin = node.module or ""
                for alias in node.names:
                    submodule = f"{origin}.{alias.name}"
                    targets.append(submodule if submodule in modules else origin)
            for target in dict.fromkeys(targets):
                if target == PACKAGE or target.startswith(PACKAGE + "."):
                    found.append(Import(name, target, node.lineno, in_function))
    return found


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Closed chains a -> ... -> a that between them pass through every module on a cycle: Tarjan's
    strongly connected components, then in each a shortest cycle through each module not yet shown."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)

    cycles = []
    for component in components:
        members = set(component)
        if len(component) == 1 and component[0] not in edges.get(component[0], ()):
            continue
        covered: set[str] = set()
        for start in component:  # a shortest cycle through each module no chain has shown yet
            if start in covered:
                continue
            chain = _shortest_cycle(edges, members, start)
            covered.update(chain)
            cycles.append(chain)
    return cycles


def _shortest_cycle(edges: dict[str, set[str]], members: set[str], start: str) -> list[str]:
    """start -> ... -> start, breadth-first inside one strongly connected component (so one exists)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while start not in parents:
        following = []
        for v in frontier:
            for w in sorted(edges.get(v, set()) & members):
                if w not in parents:
                    parents[w] = v
                    following.append(w)
        frontier = following
    chain = [start]
    v = parents[start]
    while v != start:
        chain.append(v)
        v = parents[v]
    chain.append(start)
    return chain[::-1]


def _where(imports: list[Import], source: str, target: str) -> str:
    """`source -> target (line 12, 40 in a function)`: where `source` imports `target`."""
    found = sorted({(i.line, i.in_function) for i in imports if i.source == source and i.target == target})
    lines = ", ".join(f"{line} in a function" if in_function else str(line) for line, in_function in found)
    return f"{source} -> {target} (line {lines})"


def test_the_parser_reads_every_kind_of_import(tmp_path):
    """The reader on a small package of its own: absolute, relative, package and function-level."""
    pkg = tmp_path / "src" / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from lorakit.a import f\n")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nfrom . import b\nimport lorakit.sub.c\n"
        "if TYPE_CHECKING:\n    from lorakit.sub import d\n"
        "def f():\n    from .sub import g\n    import lorakit\n"
    )
    (pkg / "b.py").write_text("from .sub.c import x\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from .. import a\nx = 1\n")
    (pkg / "sub" / "d.py").write_text("")
    (pkg / "sub" / "g.py").write_text("")
    modules = _modules(tmp_path / "src")
    imports = _imports(modules)
    assert set(modules) == {"lorakit", "lorakit.a", "lorakit.b", "lorakit.sub", "lorakit.sub.c", "lorakit.sub.d",
                            "lorakit.sub.g"}  # fmt: skip
    assert {(i.source, i.target, i.in_function) for i in imports} == {
        ("lorakit", "lorakit.a", False),
        ("lorakit.a", "lorakit.b", False),  # `from . import b`: the module b, not the package
        ("lorakit.a", "lorakit.sub.c", False),
        ("lorakit.a", "lorakit.sub.g", True),
        ("lorakit.a", "lorakit", True),  # a package is its __init__
        ("lorakit.b", "lorakit.sub.c", False),
        ("lorakit.sub.c", "lorakit.a", False),
    }  # lorakit.sub.d is imported only under TYPE_CHECKING
    edges: dict[str, set[str]] = {}
    for i in imports:
        edges.setdefault(i.source, set()).add(i.target)
    # One tangle of four modules, shown as two shortest chains that between them pass through all four.
    assert _cycles(edges) == [
        ["lorakit", "lorakit.a", "lorakit"],
        ["lorakit.b", "lorakit.sub.c", "lorakit.a", "lorakit.b"],
    ]
    assert _cycles({"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}) == [["x", "y", "z", "x"]]
    assert _cycles({"x": {"y"}, "y": set()}) == []


def test_no_import_cycle_among_lorakit_modules():
    imports = _imports(_modules())
    edges: dict[str, set[str]] = {}
    for i in imports:
        if i.target != i.source:
            edges.setdefault(i.source, set()).add(i.target)
    cycles = _cycles(edges)
    report = [
        " -> ".join(chain) + "\n    " + "\n    ".join(_where(imports, a, b) for a, b in itertools.pairwise(chain))
        for chain in cycles
    ]
    assert not cycles, f"{len(cycles)} import cycle(s), one chain each:\n" + "\n".join(report)


def test_no_function_level_import_of_a_lorakit_module():
    imports = _imports(_modules())
    hidden = sorted(
        {
            _where(imports, i.source, i.target)
            for i in imports
            if i.in_function and (i.source, i.target) not in FUNCTION_LEVEL_ALLOWED
        }
    )
    assert not hidden, f"{len(hidden)} pair(s) of lorakit modules imported inside functions:\n" + "\n".join(hidden)
    stale = set(FUNCTION_LEVEL_ALLOWED) - {(i.source, i.target) for i in imports if i.in_function}
    assert not stale, f"FUNCTION_LEVEL_ALLOWED names imports that are no longer inside functions: {sorted(stale)}"
