"""Imports run down only: a subpackage imports from its own floor or the floors below it.

Data flows raw -> converted -> preprocessed -> generator -> synthesizer -> trainer; an import that runs
back up that chain couples a lower layer to a higher one (and has caused defects before). The floors are
those listed in ``nnunet_promptlesion/__init__.py``. Every import is checked, including the ones inside
functions, because the package defers heavy imports.
"""
from __future__ import annotations

import ast
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
