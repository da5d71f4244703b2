"""The docstring examples of danon.core, danon.kernels, danon.passes and danon.backends, run under the modules'
installed names.

pytest's --doctest-modules would import core/x.py as `core.x`, a second copy next to `danon.core.x` (the folders
install under danon, pyproject.toml package-dir): a second copy of core/attention_op.py registers the danon ops
again, bound to a second, empty executor registry. So those folders are not collected by file; their examples
run here, from the modules `import danon` loaded. (danon/'s own modules are collected by pytest as usual.)
"""
from __future__ import annotations

import doctest
import importlib
import io
import pkgutil

import pytest

import danon  # noqa: F401  (registers the ops and executors, as every user's import does)

PACKAGES = ("danon.core", "danon.kernels", "danon.passes", "danon.backends")


def _modules():
    for name in PACKAGES:
        yield name
        for info in pkgutil.iter_modules(importlib.import_module(name).__path__):
            yield f"{name}.{info.name}"


@pytest.mark.parametrize("name", sorted(_modules()))
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    report = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)   # pytest's default doctest flags
    for test in doctest.DocTestFinder().find(module, name):
        runner.run(test, out=report.write, clear_globs=False)
    assert runner.failures == 0, report.getvalue()


def test_every_public_function_of_the_core_has_an_example():
    """A docstring with a runnable example on each public function (the project's code standard), for the floor."""
    missing = []
    for name in (n for n in _modules() if n.startswith("danon.core")):
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", ()):
            obj = getattr(module, attr)
            if hasattr(obj, "register_fake"):   # a custom op: its example is on the function it wraps
                continue
            if callable(obj) and not doctest.DocTestFinder(recurse=False).find(obj, attr)[0].examples:
                missing.append(f"{name}.{attr}")
    assert not missing, "public functions without an example: " + ", ".join(missing)
