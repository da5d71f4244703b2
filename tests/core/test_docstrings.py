"""Every public function of the floor (danon.core) has a docstring with a runnable example.

The examples themselves run as pytest's doctests (--doctest-modules over danon/, pyproject.toml).
"""
from __future__ import annotations

import doctest
import importlib
import pkgutil

import danon.core


def _floor_modules():
    yield "danon.core"
    for info in pkgutil.iter_modules(danon.core.__path__):
        yield f"danon.core.{info.name}"


def test_every_public_function_of_the_floor_has_an_example():
    missing = []
    for name in _floor_modules():
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", ()):
            obj = getattr(module, attr)
            if hasattr(obj, "register_fake"):   # a custom op: its example is on the function it wraps
                continue
            if callable(obj) and not doctest.DocTestFinder(recurse=False).find(obj, attr)[0].examples:
                missing.append(f"{name}.{attr}")
    assert not missing, "public functions without an example: " + ", ".join(missing)
