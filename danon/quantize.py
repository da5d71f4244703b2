"""`danon.quantize`: the quantize pass's decision, applied to a module outside torch.compile (for export).

The same rules as `options={"quantize": ...}` (danon/passes/weight_quantization.py): every `nn.Linear` is a candidate;
small layers (`min_features`), layers whose name matches `skip`, and, with `tolerance`, the layers that
would push the output error on `example_inputs` past it stay in full precision. The chosen layers are
quantized in place with torchao's `quantize_` (their weights become torchao tensors).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from danon.passes.options import QUANTIZE_CHOICES
from danon.passes.weight_quantization import decide, output_error, quantized_weight, torchao_config
from danon.passes.report import QuantizeReport

MODES = tuple(m for m in QUANTIZE_CHOICES if m != "none")


def _check(mode, min_features, skip, tolerance, example_inputs):
    if mode not in MODES:
        raise ValueError(f"danon.quantize: mode must be one of {', '.join(MODES)}; got {mode!r}")
    if min_features is not None and (isinstance(min_features, bool) or not isinstance(min_features, int)
                                     or min_features < 0):
        raise ValueError(f"danon.quantize: min_features must be an integer >= 0, got {min_features!r}")
    skip = (skip,) if isinstance(skip, str) else skip
    if not isinstance(skip, (list, tuple)) or not all(isinstance(p, str) and p for p in skip):
        raise ValueError(f"danon.quantize: skip must be a module-name pattern or a list of them, got {skip!r}")
    if tolerance is not None:
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
            raise ValueError(f"danon.quantize: tolerance must be a number > 0 (relative output error), "
                             f"got {tolerance!r}")
        if example_inputs is None:
            raise ValueError("danon.quantize: tolerance needs example_inputs to measure each layer's sensitivity")
    return tuple(skip)


def quantize(model: nn.Module, mode: str = "int8-weight", *, example_inputs: Optional[Union[tuple, torch.Tensor]] = None,
             tolerance: Optional[float] = None, min_features: Optional[int] = None,
             skip: Union[str, Sequence[str]] = ()) -> QuantizeReport:
    """Quantize the weights of `model`'s linear layers in place; returns what was done, layer by layer.

    mode: "int8-weight" (CPU and CUDA) | "fp8-weight" (CUDA, compute capability >= 8.9).
    example_inputs: arguments of `model` (a tuple, or one tensor) to measure the output error on; needed
        with `tolerance`.
    tolerance: the largest relative output error allowed on the example inputs; layers are taken least
        sensitive first while the error stays within it.
    min_features: keep layers whose in_features or out_features is smaller. skip: module-name patterns
        to keep (fnmatch; a plain name also matches as a suffix, e.g. "lm_head").

    Example:
        >>> import torch
        >>> from danon.quantize import quantize
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))
        >>> x = torch.randn(4, 64)
        >>> report = quantize(model, "int8-weight", example_inputs=(x,), min_features=16)
        >>> [(r.name, r.quantized) for r in report.layers], report.output_error < 2e-2
        ([('0', True), ('2', False)], True)
        >>> type(model[0].weight).__name__
        'Int8Tensor'
    """
    skip = _check(mode, min_features, skip, tolerance, example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    measure = reference = None
    if example_inputs is not None:
        with torch.no_grad():
            reference = model(*example_inputs)
        measure = _swap_measure(model, linears, example_inputs, reference)
    rows, chosen, _ = decide([(name, m.weight) for name, m in linears], mode, min_features=min_features,
                             skip=skip, tolerance=tolerance, measure=measure)
    ties = _tied(model)
    for i in chosen:
        name, module = linears[i]
        if id(module.weight) in ties and len(ties[id(module.weight)]) > 1:
            others = [n for n in ties[id(module.weight)] if n != name + ".weight"]
            rows[i].reason += f"; its weight is tied to {', '.join(others)}, which keeps full precision"
    names = {linears[i][0] for i in chosen}
    if names:
        from torchao.quantization import quantize_
        quantize_(model, torchao_config(mode), filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in names)
    error = None
    if reference is not None:
        with torch.no_grad():
            error = output_error(reference, model(*example_inputs))
    return QuantizeReport(layers=rows, mode=mode, output_error=error)


def _swap_measure(model, linears, example_inputs, reference):
    """measure({index: quantized weight}): the output error with those layers' weights swapped in, then put back."""
    def measure(quantized):
        originals = {i: linears[i][1].weight for i in quantized}
        try:
            for i, q in quantized.items():
                linears[i][1].weight = nn.Parameter(q, requires_grad=False)
            with torch.no_grad():
                return output_error(reference, model(*example_inputs))
        finally:
            for i, w in originals.items():
                linears[i][1].weight = w
    return measure


def _tied(model: nn.Module) -> dict:
    """id(parameter) -> every name it is registered under (tied weights have several)."""
    names: dict = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


__all__ = ["quantize", "quantized_weight"]
