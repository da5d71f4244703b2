"""danon.kernels: executors of an attention plan, registered with the op's executor registry on import.

- "cpu" (danon/kernels/cpu.py: the fused CPU flash kernel, the gathered sparse path, the reference path):
  claims every call, at the lowest priority (its reference path runs on any device);
- "triton" (danon/kernels/triton.py): claims CUDA tensors it supports; `prefer("triton")` runs it on CPU
  tensors too, interpreted. Importing it does not import Triton (the kernels load on first launch).

It also registers the C++ scan that routes DALA's tokens for eager CPU tensors (danon/kernels/routing_cpu.py).

Example:
    >>> import danon
    >>> from danon.core.executors import registered
    >>> registered()
    ('triton', 'cpu')
"""
from danon.core.dala import register_routing_kernel
from danon.core.executors import register_executor

from . import cpu as _cpu_executor
from . import routing_cpu as _routing_cpu
from . import triton as _triton_executor

__all__ = ["triton_attention", "triton_attention_backward"]

register_executor("cpu", priority=0, forward=_cpu_executor.attention_forward,
                  backward=_cpu_executor.attention_backward)
register_executor("triton", priority=10, devices=("cuda",), supports=_triton_executor.supports,
                  forward=_triton_executor.attention_forward, backward=_triton_executor.attention_backward)

register_routing_kernel("cpu", _routing_cpu.routed_tokens)

triton_attention = _triton_executor.triton_attention
triton_attention_backward = _triton_executor.triton_attention_backward
