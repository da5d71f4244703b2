"""The layer rule, as a ratchet: no import may point up a layer, except the ones listed in KNOWN_UPWARD.

Layers, bottom to top:
  0 floor     danon.core (core/: the op, the plan, the families' plan builders, argument checks)
  1 kernels   danon.kernels (executors)   and   passes: danon.passes (graph rewrites); neither imports the other
  2 backends  danon.backends (lowering)
  3 roof      the rest of danon (user API, models, CLI, benchmark, monitoring)

KNOWN_UPWARD is what the code does today and issue 18 is to empty; the test fails on any upward import
not in it, and on an entry that no longer occurs (remove it: the list only shrinks).
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = {"danon": "danon", "core": "danon.core", "passes": "danon.passes", "kernels": "danon.kernels", "backends": "danon.backends"}
FLOOR = ("danon.core",)

KNOWN_UPWARD: set = set()


def _modules():
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            yield ".".join([package, *parts]), path


def _is_module(name: str) -> bool:
    for folder, package in FOLDERS.items():
        if name == package or name.startswith(package + "."):
            rest = name[len(package):].lstrip(".").split(".") if name != package else []
            if folder == "danon" and rest and rest[0] in ("core", "passes", "kernels", "backends"):
                continue
            base = ROOT / folder / pathlib.Path(*rest) if rest else ROOT / folder
            return base.with_suffix(".py").exists() or (base / "__init__.py").exists()
    return False


def _imports(module: str, path: pathlib.Path):
    """Every danon module `module` imports (at top level or inside a function), resolved to its full name."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                kept = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(kept + ([base] if base else []))
            # `from danon.core import checks` imports the module danon.core.checks, not the package's namespace
            subs = [f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")]
            yield from (subs or [base])


def _layer(module: str) -> tuple:
    if module.startswith(FLOOR):
        return (0, "floor")
    for package, rank in (("danon.kernels", 1), ("danon.passes", 1), ("danon.backends", 2)):
        if module == package or module.startswith(package + "."):
            return (rank, package)
    return (3, "danon")


def _upward_imports() -> set:
    found = set()
    for module, path in _modules():
        mine = _layer(module)
        for target in _imports(module, path):
            if target != "danon" and not target.startswith("danon."):
                continue
            theirs = _layer(target)
            # up a layer, or sideways between kernels and passes (a pass never calls a kernel)
            if theirs[0] > mine[0] or (theirs[0] == mine[0] == 1 and theirs[1] != mine[1]):
                found.add((module, target))
    return found


def test_no_new_import_points_up_a_layer():
    new = _upward_imports() - KNOWN_UPWARD
    assert not new, "imports that point up a layer: " + ", ".join(f"{a} -> {b}" for a, b in sorted(new))


def test_the_list_of_known_upward_imports_only_shrinks():
    gone = KNOWN_UPWARD - _upward_imports()
    assert not gone, "no longer imported, remove from KNOWN_UPWARD: " + ", ".join(f"{a} -> {b}" for a, b in sorted(gone))


def test_the_walk_sees_imports_inside_functions_and_relative_ones():
    """The checker itself: a module known to import lazily and one using relative imports are read."""
    triton = dict(_modules())["danon.kernels.triton"]
    assert "danon.core.checks" in set(_imports("danon.kernels.triton", triton))
    msra = dict(_modules())["danon.core.msra"]
    assert {"danon.core.blocks", "danon.core.plan"} <= set(_imports("danon.core.msra", msra))
