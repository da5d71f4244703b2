"""Argument helpers shared by the `danon` subcommands: model factories, NAME=VALUE pairs, example inputs."""
from __future__ import annotations

import argparse
import ast
import importlib
from typing import Any, Callable, Tuple


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


def model_and_example_ids(args) -> Tuple[Any, Any]:
    """The model from `args.factory` (with `args.model_arg`), in eval mode, and random token ids for it.

    Reads args.factory, model_arg, seed, seq_len, batch and vocab (the model's config.vocab_size when
    vocab is None).

    Example:
        >>> ns = argparse.Namespace(factory="danon:create_dense_model", model_arg=[("hidden_size", 32),
        ...     ("num_heads", 2), ("num_layers", 1), ("vocab_size", 50)], seed=0, seq_len=8, batch=1, vocab=None)
        >>> model, ids = model_and_example_ids(ns)
        >>> ids.shape, int(ids.max()) < 50
        (torch.Size([1, 8]), True)
    """
    import torch

    if args.seq_len < 1 or args.batch < 1:
        raise ValueError(f"--seq-len and --batch must be >= 1, got {args.seq_len} and {args.batch}")
    torch.manual_seed(args.seed)
    model = load_factory(args.factory)(**dict(args.model_arg))
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"factory {args.factory!r} returned {type(model).__name__}, not a torch.nn.Module")
    model.eval()
    vocab = args.vocab or getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        raise ValueError("--vocab is needed: the model has no config.vocab_size")
    return model, torch.randint(0, vocab, (args.batch, args.seq_len))
