"""The layer rule: every import points down a layer (docs/design.md section 1).

Layers, bottom to top:
  0 floor     danon.core (danon/core/: the op and its argument list, the executor registry, the plan and its
              builders, the family specs, argument checks, private torch APIs); imports only torch
  1 kernels   danon.kernels (executors)   and   passes: danon.passes (graph passes); neither imports the other
  2 backends  danon.backends (lowering)
  3 roof      the modules directly in danon/ (user API, models, CLI, benchmark, monitoring); nothing imports them
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLOOR = ("danon.core",)


def _modules():
    for path in sorted((ROOT / "danon").rglob("*.py")):
        parts = [p for p in path.relative_to(ROOT).with_suffix("").parts if p != "__init__"]
        yield ".".join(parts), path


def _is_module(name: str) -> bool:
    base = ROOT / pathlib.Path(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


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


def test_no_import_points_up_a_layer():
    found = _upward_imports()
    assert not found, "imports that point up a layer: " + ", ".join(f"{a} -> {b}" for a, b in sorted(found))


def test_the_floor_imports_only_torch_and_the_standard_library():
    import sys
    allowed = {"torch", "danon", "__future__"} | set(sys.stdlib_module_names)
    outside = {(module, name) for module, path in _modules() if module.startswith(FLOOR)
               for name in _imports(module, path) if name and name.split(".")[0] not in allowed}
    assert not outside, "the floor imports: " + ", ".join(f"{a} -> {b}" for a, b in sorted(outside))


def test_the_walk_finds_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a floor module that imported the roof would be reported."""
    fake = tmp_path / "danon" / "core"
    fake.mkdir(parents=True)
    (tmp_path / "danon" / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "bad.py").write_text("def f():\n    from danon.functional import attention\n")
    (tmp_path / "danon" / "functional.py").write_text("")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert _upward_imports() == {("danon.core.bad", "danon.functional")}


def test_the_walk_sees_imports_inside_functions_and_relative_ones():
    """The checker itself: a module known to import lazily and one using relative imports are read."""
    triton = dict(_modules())["danon.kernels.triton"]
    assert "danon.core.checks" in set(_imports("danon.kernels.triton", triton))
    msra = dict(_modules())["danon.core.msra"]
    assert {"danon.core.blocks", "danon.core.plan"} <= set(_imports("danon.core.msra", msra))
