"""Private torch APIs are used in one module only: danon/core/torch_internals.py (checked against one torch version).

The walk reads every module's AST: `import torch._x`, `from torch._x import ...`, `from torch.utils._pytree
import ...` and attribute chains such as `torch._dynamo.reset` count (a name part with one leading underscore
after `torch`); `torch.ops.aten._foo` does not (an operator's name, not a Python module), nor does text in
strings.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
HOME = ROOT / "danon" / "core" / "torch_internals.py"



def _private(dotted: str) -> bool:
    parts = dotted.split(".")
    if parts[0] != "torch" or (len(parts) > 1 and parts[1] == "ops"):
        return False
    return any(p.startswith("_") and not p.startswith("__") for p in parts[1:])


def _dotted(node: ast.AST):
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(names)])
    return None


def private_uses(path: pathlib.Path):
    """(line, name) of every private torch API the module reaches."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if _private(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                      if _private(f"{node.module}.{a.name}")]
        elif isinstance(node, ast.Attribute):   # inner parts of a chain are visited too: duplicates, no misses
            name = _dotted(node)
            if name and _private(name):
                found.append((node.lineno, name))
    return found


def _files():
    return sorted((ROOT / "danon").rglob("*.py"))


def _offenders():
    return {str(p.relative_to(ROOT)): private_uses(p) for p in _files() if p != HOME and private_uses(p)}


def test_no_private_torch_api_outside_torch_internals():
    new = _offenders()
    assert not new, "private torch APIs outside danon/core/torch_internals.py: " + "; ".join(
        f"{path}: " + ", ".join(f"line {line} {name}" for line, name in uses) for path, uses in new.items())


@pytest.mark.parametrize("source,expected", [
    ("import torch._dynamo", ["torch._dynamo"]),
    ("from torch._inductor.compile_fx import compile_fx", ["torch._inductor.compile_fx.compile_fx"]),
    ("from torch.utils._pytree import tree_leaves", ["torch.utils._pytree.tree_leaves"]),
    ("x = torch._C._nn.linear", ["torch._C._nn.linear"]),
    ("y = torch.ops.aten._softmax.default", []),
    ("s = 'torch._dynamo.reset()'", []),
    ("from torch.utils.checkpoint import CheckpointPolicy", []),
])
def test_the_walk_finds_private_uses(tmp_path, source, expected):
    path = tmp_path / "m.py"
    path.write_text(source + "\n")
    assert [name for _, name in private_uses(path)][:1] == expected[:1]


def test_torch_internals_names_the_torch_version_it_was_checked_against():
    from danon.core import torch_internals
    assert all(part.isdigit() for part in torch_internals.TORCH_CHECKED.split(".")) and \
        torch_internals.TORCH_CHECKED.count(".") == 2
