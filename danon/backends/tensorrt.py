"""TensorRT lowering: the rewritten graph with every danon op decomposed to ATen, to torch_tensorrt.

TensorRT cannot call a custom op, so `danon::attention` becomes the gather-based ATen computation
of danon/kernels/aten.py (dense plans: SDPA, which TensorRT converts). torch-tensorrt is an
optional extra and needs CUDA; without either, compiling fails at once with one clear error.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, List

import torch
import torch.fx as fx

from danon.kernels.aten import all_decompositions

__all__ = ["missing_requirements", "decompose_for_tensorrt", "compile_tensorrt"]


def missing_requirements() -> List[str]:
    """What the tensorrt target lacks on this machine: [] when it can run.

    Example:
        >>> isinstance(missing_requirements(), list)
        True
    """
    missing = []
    if importlib.util.find_spec("torch_tensorrt") is None:
        missing.append("the torch-tensorrt package")
    if not torch.cuda.is_available():
        missing.append("a CUDA device")
    return missing


class _Bound(torch.nn.Module):
    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, *args):
        return self.gm(*args)


def decompose_for_tensorrt(gm: torch.nn.Module, example_inputs) -> torch.export.ExportedProgram:
    """The program handed to TensorRT: `gm` (the rewritten graph, or any module) exported, no danon op left.

    Example:
        >>> import torch, danon
        >>> class Attn(torch.nn.Module):
        ...     def forward(self, q):
        ...         return danon.ucsa_attention(q, q, q, causal=True, block_size=16, local_window_size=16,
        ...                                     global_tokens=16, top_k_blocks=1)
        >>> q = torch.randn(1, 2, 64, 8)
        >>> ep = decompose_for_tensorrt(Attn(), [q])
        >>> any("danon" in str(n.target) for n in ep.graph.nodes)
        False
        >>> bool(torch.allclose(ep.module()(q), Attn()(q), atol=1e-5))
        True
    """
    with torch.no_grad():
        program = torch.export.export(_Bound(gm), tuple(example_inputs))
        return program.run_decompositions(all_decompositions())


def compile_tensorrt(gm: fx.GraphModule, example_inputs) -> Callable:
    """The `tensorrt` lowering: decompose the danon ops, then `torch_tensorrt.dynamo.compile`."""
    missing = missing_requirements()
    if missing:
        raise RuntimeError(f"danon target='tensorrt' needs {' and '.join(missing)}: install it with "
                           "pip install \"danon[tensorrt]\" on a machine with an NVIDIA GPU, or choose "
                           "target='inductor' or 'onnxrt'")
    import torch_tensorrt

    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    if len(tensors) != len(example_inputs):
        raise RuntimeError("danon target='tensorrt' compiles static shapes: compile with dynamic=False")
    program = decompose_for_tensorrt(gm, example_inputs)
    return torch_tensorrt.dynamo.compile(program, inputs=tensors)
