"""The `danon` torch.compile backend: capture -> attention pass -> checkpoint and quantize passes -> lower,
with a compile report.

`backend="danon"` is registered through the `torch_dynamo_backends` entry point, so it works in a
fresh interpreter that never imported danon.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional

import torch

from danon.backends.inductor import lower
from danon.compile_config import DanonConfig
from danon.passes.attention import rewrite_attention
from danon.passes.checkpoint import checkpoint_lowering
from danon.passes.quantize import quantize_graph
from danon.report import CompileReport

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
    gm, sites = rewrite_attention(gm, config)
    report = CompileReport(sites)
    extra: list = []
    if config.quantize != "none":      # inference only: raises for a graph that needs a backward
        gm, extra, report.linears = quantize_graph(gm, example_inputs, config)
    inputs = list(example_inputs) + extra
    # checkpointing happens inside lowering: AOTAutograd's partitioner runs while the graph compiles
    compiled, report.checkpoint = checkpoint_lowering(gm, inputs, config, lower)
    for collector in _collectors:
        collector.extend(report)
    if config.report:
        print(report)
    if not extra:
        return compiled

    def run(*args):     # the quantized weights are inputs of the rewritten graph after Dynamo's own
        return compiled(*args, *extra)
    return run


def explain(model, *args, **options) -> CompileReport:
    """Compile `model` with the danon backend, run it once on `args`, and return the compile report.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> class Attn(torch.nn.Module):
        ...     def forward(self, q):
        ...         return F.scaled_dot_product_attention(q, q, q, is_causal=True)
        >>> report = explain(Attn(), torch.randn(1, 2, 64, 8), target="eager")
        >>> report.to_dict()["sites"][0]["replaced"]
        True
    """
    def backend(gm, example_inputs):   # a backend of its own: Dynamo compiles afresh instead of reusing a cache
        return danon_backend(gm, example_inputs, options)

    with collect_reports() as report:
        torch.compile(model, backend=backend)(*args)
    if report.graphs == 0:
        raise RuntimeError("danon.explain: Dynamo compiled no graph (its cache answered, or the model reached "
                           "torch._dynamo.config.recompile_limit); call torch._dynamo.reset() and try again")
    return report
