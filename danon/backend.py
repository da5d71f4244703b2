"""The `danon` torch.compile backend: capture -> the passes (danon/passes/pipeline.py: attention, checkpoint,
quantize) -> lower, with a compile report.

`backend="danon"` is registered through the `torch_dynamo_backends` entry point, so it works in a
fresh interpreter that never imported danon.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Dict, List, Optional

import torch

from danon.backends.inductor import lower
from danon.passes.options import DanonConfig
from danon.passes.pipeline import run_pipeline
from danon.passes.report import CompileReport

_collectors: List[CompileReport] = []   # reports of the graphs compiled inside `collect_reports()`


@contextlib.contextmanager
def collect_reports():
    """Gather the CompileReport of every graph the danon backend compiles inside the block."""
    report = CompileReport(graphs=0)
    _collectors.append(report)
    try:
        yield report
    finally:
        _collectors.remove(report)


def danon_backend(gm: torch.fx.GraphModule, example_inputs, options: Optional[Dict[str, Any]] = None):
    """The backend behind `torch.compile(model, backend="danon", options={...})`.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> f = lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=True)
        >>> q = torch.randn(1, 2, 64, 8)
        >>> out = torch.compile(f, backend="danon", options={"target": "eager"})(q)
        >>> torch.allclose(out, f(q), atol=1e-6)
        True
    """
    config = DanonConfig.from_options(options)
    run = run_pipeline(gm, example_inputs, config)
    # checkpointing happens inside lowering: AOTAutograd's partitioner runs while the graph compiles
    compiled = run.lower(lower)
    for collector in _collectors:
        collector.extend(run.report)
    if config.report:
        print(run.report)
    return compiled


def split_explain_keywords(model, options: Optional[Dict[str, Any]], keywords: Dict[str, Any]):
    """(danon options, the model's keyword inputs) of a `danon.explain` call.

    With `options` given, every keyword is an input of the model. Without it, a keyword that names a
    danon option (DanonConfig.option_names) is one, a keyword that names a parameter of
    `model.forward` is an input; a name that is both, or neither, is an error, so that no option and
    no input is dropped without a word.

    Example:
        >>> import torch
        >>> class M(torch.nn.Module):
        ...     def forward(self, input_ids, attention_mask=None): ...
        >>> split_explain_keywords(M(), None, {"attention_mask": 1, "attention": "msra"})
        ({'attention': 'msra'}, {'attention_mask': 1})
        >>> split_explain_keywords(M(), {"attention": "msra"}, {"attention_mask": 1})
        ({'attention': 'msra'}, {'attention_mask': 1})
    """
    if options is not None:
        if not isinstance(options, dict):
            raise TypeError(f"danon.explain: options must be a dict of danon options, got {type(options).__name__}")
        return dict(options), dict(keywords)
    forward = getattr(model, "forward", model)
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):     # a builtin or C callable: no names to match
        parameters = {}
    inputs = {n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    danon_names = set(DanonConfig.option_names())
    split: Dict[str, Dict[str, Any]] = {"options": {}, "inputs": {}}
    for name, value in keywords.items():
        if name in danon_names and name in inputs:
            raise TypeError(f"danon.explain: {name!r} is both a danon option and a parameter of "
                            f"{type(model).__name__}.forward; pass danon's options as options={{...}}, and every "
                            "other keyword goes to the model")
        if name not in danon_names and name not in inputs:
            raise TypeError(f"danon.explain: {name!r} is neither a danon option ({', '.join(sorted(danon_names))}) "
                            f"nor a parameter of {type(model).__name__}.forward "
                            f"({', '.join(sorted(inputs)) or 'none'}); to pass it to the model anyway, give "
                            "danon's options as options={...}")
        split["options" if name in danon_names else "inputs"][name] = value
    return split["options"], split["inputs"]


def explain(model, *args, options: Optional[Dict[str, Any]] = None, **keywords) -> CompileReport:
    """Compile `model` with the danon backend, run it once on `args` (and its keyword inputs), and return
    the compile report.

    Keywords that name danon options (``attention="msra"``, ``window=512``, ``target="eager"``, ...)
    configure the backend; keywords that name parameters of ``model.forward`` (``attention_mask=...``)
    are passed to the model. Or give the options as one dict, ``options={...}``: then every keyword
    goes to the model (the way to pass an input whose name is also a danon option's).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> class Attn(torch.nn.Module):
        ...     def forward(self, q, mask=None):
        ...         return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        >>> q = torch.randn(1, 2, 64, 8)
        >>> report = explain(Attn(), q, target="eager")
        >>> report.to_dict()["sites"][0]["replaced"]
        True
        >>> mask = torch.ones(64, 64, dtype=torch.bool).tril()
        >>> len(explain(Attn(), q, mask=mask, options={"target": "eager"}).sites)
        1
    """
    options, inputs = split_explain_keywords(model, options, keywords)
    DanonConfig.from_options(options)       # a bad option fails here, in the caller's words, not in Dynamo

    def backend(gm, example_inputs):   # a backend of its own: Dynamo compiles afresh instead of reusing a cache
        return danon_backend(gm, example_inputs, options)

    with collect_reports() as report:
        torch.compile(model, backend=backend)(*args, **inputs)
    if report.graphs == 0:
        raise RuntimeError("danon.explain: Dynamo compiled no graph (its cache answered, or the model reached "
                           "torch._dynamo.config.recompile_limit); call torch._dynamo.reset() and try again")
    return report
