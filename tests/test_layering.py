"""Imports run down only: a subpackage imports from its own floor or the floors below it.

Data flows raw -> converted -> preprocessed -> generator -> synthesizer -> trainer; an import that runs
back up that chain couples a lower layer to a higher one (and has caused defects before). The floors are
those listed in ``nnunet_promptlesion/__init__.py``. Every import is checked, including the ones inside
functions, because the package defers heavy imports.
"""
from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import nnunet_promptlesion

PACKAGE_ROOT = Path(nnunet_promptlesion.__file__).parent

# Lowest floor first. Subpackages on one floor may not import each other either: they are siblings.
FLOORS = {
    "utils": 0,
    "lesions": 1,
    "generator": 2,
    "placement": 2,
    "synthesis": 3,
    "trainers": 4,
    "dataset_conversion": 4,
    "evaluation": 5,
    "experiments": 6,
    "cli": 7,
}


def _module_name(path: Path, root: Path) -> list[str]:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imported_modules(path: Path, root: Path) -> list[tuple[int, list[str]]]:
    """(line, absolute module parts) for every import of this package in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path, root)
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
            else:
                target = (node.module or "").split(".")
            if target[0] != "nnunet_promptlesion":
                continue
            if len(target) == 1:  # "from .. import x": x may itself be a subpackage
                for alias in node.names:
                    found.append((node.lineno, target + [alias.name]))
            else:
                found.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "nnunet_promptlesion":
                    found.append((node.lineno, parts))
    return found


def layering_violations(root: Path = PACKAGE_ROOT) -> list[str]:
    violations = []
    for path in sorted(root.rglob("*.py")):
        here = _module_name(path, root)
        if len(here) < 2 or here[1] not in FLOORS:
            continue  # the root package and the nnU-Net re-export shim are not on a floor
        own = here[1]
        for line, target in _imported_modules(path, root):
            if len(target) < 2 or target[1] not in FLOORS or target[1] == own:
                continue  # root-level names (__version__) and same-subpackage imports are fine
            if FLOORS[target[1]] >= FLOORS[own]:
                kind = "upward" if FLOORS[target[1]] > FLOORS[own] else "sideways"
                violations.append(
                    f"{path.relative_to(root.parent)}:{line}: {own} (floor {FLOORS[own]}) imports "
                    f"{'.'.join(target)} ({target[1]}, floor {FLOORS[target[1]]}): {kind}"
                )
    return violations


def _type_checking_lines(path: Path) -> set[int]:
    """Lines inside ``if TYPE_CHECKING:`` blocks: those imports never run, so they form no circle (the layering
    check above still counts them: an annotation that names a higher floor couples the code all the same)."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def import_graph(root: Path = PACKAGE_ROOT) -> dict[str, dict[str, int]]:
    """Module -> {imported module of this package: first line}, every import counted (also inside functions).

    ``from pkg import name`` is an import of the module ``pkg.name`` when that is a module or subpackage,
    otherwise of ``pkg`` itself; a package is the module of its ``__init__.py``. Imports under
    ``if TYPE_CHECKING:`` are left out (they never run)."""
    files = {".".join(_module_name(p, root)): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, dict[str, int]] = {}
    for here, path in files.items():
        edges = graph.setdefault(here, {})
        annotations_only = _type_checking_lines(path)
        for line, target in _imported_modules(path, root):
            if line in annotations_only:
                continue
            name = ".".join(target)
            while name not in files and "." in name:  # an imported function or class: its module
                name = name.rsplit(".", 1)[0]
            if name in files and name != here:
                edges.setdefault(name, line)
        tree = ast.parse(path.read_text(), filename=str(path))
        package = _module_name(path, root) if path.name == "__init__.py" else _module_name(path, root)[:-1]
        for node in ast.walk(tree):
            # "from .pkg import mod": _imported_modules names pkg; mod may itself be a module
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(root.name)):
                base = (package[: len(package) - (node.level - 1)] if node.level else []) + \
                    (node.module.split(".") if node.module else [])
                for alias in node.names:
                    name = ".".join(base + [alias.name])
                    if name in files and name != here and node.lineno not in annotations_only:
                        edges.setdefault(name, node.lineno)
    return graph


def import_cycles(root: Path = PACKAGE_ROOT) -> list[list[str]]:
    """One cycle per group of modules that import each other (directly or around a circle), as a path
    ``[a, b, ..., a]`` starting at the group's first module by name; empty when there is none."""
    graph = import_graph(root)
    return [_cycle_through(graph, group) for group in _import_groups(graph)]


def _import_groups(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), members sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(groups)


def _cycle_through(graph: dict[str, dict[str, int]], group: list[str]) -> list[str]:
    """The shortest import path from the group's first module back to itself, inside the group."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    return paths[v] + [start]
                if w in members and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{group} is not a cycle")  # cannot happen for a strongly connected group


def _describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_every_subpackage_is_on_a_floor():
    subpackages = {p.name for p in PACKAGE_ROOT.iterdir() if (p / "__init__.py").exists()}
    assert subpackages <= set(FLOORS), f"add {sorted(subpackages - set(FLOORS))} to FLOORS and the package docstring"


def test_imports_only_run_down():
    violations = layering_violations()
    assert not violations, "imports that run up or sideways:\n" + "\n".join(violations)


def test_checker_catches_an_upward_import(tmp_path):
    # The check must be able to fail: a synthesis module importing the trainers is reported.
    pkg = tmp_path / "nnunet_promptlesion"
    for sub in ("synthesis", "trainers"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "trainers" / "errors.py").write_text("class E(Exception):\n    pass\n")
    (pkg / "synthesis" / "source.py").write_text("def f():\n    from ..trainers.errors import E\n    return E\n")
    violations = layering_violations(pkg)
    assert len(violations) == 1 and "synthesis" in violations[0] and "trainers.errors" in violations[0]


#: Import circles known and accepted, each listed by its modules; nothing else may form one. Empty since issue 26
#: split experiments/runner.py; the test also fails when a listed circle is gone, so the entry goes with it.
KNOWN_CYCLES: list[list[str]] = []


def test_no_import_cycle_between_modules():
    # A circle hidden behind an import inside a function still couples both modules (and breaks when one of the
    # imports moves to the top); every module must be importable before the ones that import it.
    graph = import_graph()
    groups = _import_groups(graph)
    new = [g for g in groups if g not in KNOWN_CYCLES]
    assert not new, "import cycles:\n" + "\n".join(
        f"{_describe(graph, _cycle_through(graph, g))}   (modules in the circle: {', '.join(g)})" for g in new)
    gone = [g for g in KNOWN_CYCLES if g not in groups]
    assert not gone, f"these circles are gone (or changed): remove them from KNOWN_CYCLES: {gone}"


def test_cycle_checker_reports_the_path(tmp_path):
    # The check must be able to fail: a -> b at the top, b -> a inside a function, and "from . import c" naming a
    # module, are found as one cycle with its path; a tree without the back edge has none.
    pkg = tmp_path / "nnunet_promptlesion"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from .b import g\n")
    (pkg / "sub" / "b.py").write_text("from . import c\n\ndef g():\n    return c\n")
    (pkg / "sub" / "c.py").write_text("def f():\n    from .a import g\n    return g\n")
    assert import_cycles(pkg) == [["nnunet_promptlesion.sub.a", "nnunet_promptlesion.sub.b",
                                   "nnunet_promptlesion.sub.c", "nnunet_promptlesion.sub.a"]]
    (pkg / "sub" / "c.py").write_text("def f():\n    return 1\n")
    assert import_cycles(pkg) == []


def uncommented_function_imports(root: Path = PACKAGE_ROOT) -> list[str]:
    """``path:line`` of every import inside a function that no comment explains.

    Imports belong at the top of a module; one inside a function is there for a measured start-up cost or an import
    cycle, and says which in a comment: on the import's lines, on the comment lines directly above it, or anywhere in
    the contiguous run of imports it belongs to (one comment may cover a block of imports with one reason)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        comments = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(text).readline)
                    if tok.type == tokenize.COMMENT}

        def explained(block: list[ast.stmt]) -> bool:
            first, last = block[0].lineno, block[-1].end_lineno or block[-1].lineno
            if comments & set(range(first, last + 1)):
                return True
            above = first - 1
            return above in comments and lines[above - 1].lstrip().startswith("#")

        def visit(node: ast.AST, in_function: bool) -> None:
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                stmts = getattr(node, field, None)
                if not isinstance(stmts, list):
                    continue
                block: list[ast.stmt] = []
                for stmt in stmts + [None]:
                    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                        block.append(stmt)
                        continue
                    if in_function and block and not explained(block):
                        found.extend(f"{path.relative_to(root.parent)}:{s.lineno}" for s in block)
                    block = []
            for child in ast.iter_child_nodes(node):
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        visit(ast.parse(text, filename=str(path)), False)
    return found


def test_imports_inside_functions_say_why():
    # Issue 26: imports at module top, unless a measured start-up cost (a CLI's --help, the experiment runner's
    # re-runs) or an import cycle keeps one inside a function; a comment there says which, so the next reader
    # does not move it back up (or down) blindly.
    found = uncommented_function_imports()
    assert not found, ("imports inside a function with no comment saying why (move them to the module top, or "
                       "say which start-up cost or cycle keeps them there):\n" + "\n".join(found))


def test_function_import_checker_needs_a_comment(tmp_path):
    # The check must be able to fail: a bare import inside a function is reported; a comment above a block of
    # imports covers the block; an import after other code needs its own comment; module-top imports need none.
    pkg = tmp_path / "nnunet_promptlesion"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import json\n")
    (pkg / "a.py").write_text("import os\n\n\ndef f():\n    import json\n    return json\n")
    assert uncommented_function_imports(pkg) == ["nnunet_promptlesion/a.py:5"]
    (pkg / "a.py").write_text(
        "def f():\n"
        "    # deferred: json is slow\n"
        "    import json\n"
        "    from os import path\n"
        "    x = path\n"
        "    import re\n"
        "    if x:\n"
        "        import shlex  # deferred: as above\n"
        "    return json, re, shlex\n")
    assert uncommented_function_imports(pkg) == ["nnunet_promptlesion/a.py:6"]
