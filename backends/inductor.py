"""Lowering targets for the rewritten graph: Inductor (default), eager, ONNX Runtime and TensorRT."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List

import torch
import torch.fx as fx


def lower(gm: fx.GraphModule, example_inputs: List[torch.Tensor], target: str) -> Callable:
    """Compile the rewritten graph for `target` ("inductor" | "eager" | "onnxrt" | "tensorrt").

    With Inductor the danon op stays an opaque extern call (it has a fake impl and autograd);
    plan building, projections and everything around it compile as usual. "onnxrt" and
    "tensorrt" live in backends/onnx.py and backends/tensorrt.py.

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
    from torch._inductor.compile_fx import compile_fx
    if not _has_symbolic_sizes(example_inputs):
        return compile_fx(gm, example_inputs)
    # Compile the backward now too, so that it is generated under the same workaround.
    with _no_cpu_loop_split_on_symbolic_sizes(), torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
        return compile_fx(gm, example_inputs)


def _has_symbolic_sizes(example_inputs: List) -> bool:
    return any(isinstance(x, torch.SymInt) or (isinstance(x, torch.Tensor) and any(
        isinstance(d, torch.SymInt) for d in x.shape)) for x in example_inputs)


@contextlib.contextmanager
def _no_cpu_loop_split_on_symbolic_sizes() -> Iterator[None]:
    """Skip the C++ codegen's loop split (an optional optimization) where a loop size is symbolic.

    torch 2.13's split of a loop whose index is divided by a constant (the plan builders' t // c^l)
    gives the outer loop the size floor(n / c^l); when the traced range of n lets that be 0, Inductor's
    bounds analysis fails with "ValueRangeError: Invalid ranges [0:-1]" (pytorch/pytorch#188422).
    """
    try:
        from torch._inductor.codegen.cpp import CppScheduling
    except ImportError:     # another Inductor layout: nothing to patch
        yield
        return
    original = getattr(CppScheduling, "try_loop_split", None)
    if original is None:
        yield
        return

    def try_loop_split(self, nodes):
        if any(getattr(size, "free_symbols", None) for node in nodes for sizes in node.group[1] for size in sizes):
            return nodes
        return original(self, nodes)

    CppScheduling.try_loop_split = try_loop_split
    try:
        yield
    finally:
        CppScheduling.try_loop_split = original
