"""Argument helpers shared by the `danon` subcommands: model factories and NAME=VALUE pairs."""
from __future__ import annotations

import argparse
import ast
import importlib
from typing import Callable, Tuple


def load_factory(spec: str) -> Callable:
    """'package.module:function' -> the function (an importable model factory).

    Example:
        >>> load_factory("danon:create_dense_model").__name__
        'create_dense_model'
    """
    if spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"factory must be MODULE:FACTORY (e.g. danon:create_msra_model), got {spec!r}")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"factory {spec!r}: cannot import module {module_name!r} ({err})") from err
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ValueError(f"factory {spec!r}: module {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ValueError(f"factory {spec!r} is not callable")
    return factory


def parse_assignment(text: str) -> Tuple[str, object]:
    """'name=value' with a Python literal value (strings may be bare).

    Example:
        >>> parse_assignment("num_layers=2"), parse_assignment("num_levels=auto")
        (('num_layers', 2), ('num_levels', 'auto'))
    """
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    name, value = text.split("=", 1)
    try:
        return name.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name.strip(), value
