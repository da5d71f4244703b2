"""Lowering targets for the rewritten graph: Inductor (default), eager, ONNX Runtime and TensorRT."""
from __future__ import annotations

from typing import Callable, List

import torch
import torch.fx as fx

from danon.core.torch_internals import compile_with_inductor, functorch_config_patch, no_cpu_loop_split_on_symbolic_sizes


def lower(gm: fx.GraphModule, example_inputs: List[torch.Tensor], target: str) -> Callable:
    """Compile the rewritten graph for `target` ("inductor" | "eager" | "onnxrt" | "tensorrt").

    With Inductor the danon op stays an opaque extern call (it has a fake impl and autograd);
    plan building, projections and everything around it compile as usual. "onnxrt" and
    "tensorrt" live in danon/backends/onnx.py and danon/backends/tensorrt.py.

    Example:
        >>> import torch
        >>> gm = torch.fx.symbolic_trace(torch.nn.ReLU())
        >>> lower(gm, [torch.randn(3)], "eager")(torch.tensor([-1.0]))
        tensor([0.])
    """
    if target == "eager":
        return gm.forward
    if target == "onnxrt":
        from danon.backends.onnx import compile_onnxrt
        return compile_onnxrt(gm, example_inputs)
    if target == "tensorrt":
        from danon.backends.tensorrt import compile_tensorrt
        return compile_tensorrt(gm, example_inputs)
    if target != "inductor":
        raise ValueError(f"danon option 'target' must be one of inductor, eager, onnxrt, tensorrt; got {target!r}")
    if not _has_symbolic_sizes(example_inputs):
        return compile_with_inductor(gm, example_inputs)
    # Compile the backward now too, so that it is generated under the same workaround.
    with no_cpu_loop_split_on_symbolic_sizes(), functorch_config_patch(force_non_lazy_backward_lowering=True):
        return compile_with_inductor(gm, example_inputs)


def _has_symbolic_sizes(example_inputs: List) -> bool:
    return any(isinstance(x, torch.SymInt) or (isinstance(x, torch.Tensor) and any(
        isinstance(d, torch.SymInt) for d in x.shape)) for x in example_inputs)
