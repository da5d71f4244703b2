"""Which executor runs a `danon::attention` call: a registry where each executor claims what it supports.

In the manner of Thunder's `register_implementation`: an executor registers a name, a priority, the
device types it claims and a `supports(args)` predicate; a call runs on the highest-priority executor
that claims its device and supports it. danon/kernels/ registers its executors when `danon` is imported
(the floor imports no executor: every import points down). `prefer(name)` makes the calls in its
scope try that executor first whatever the device (how `danon.kernels.triton_attention` runs the
Triton kernels on CPU tensors, interpreted).

Example:
    >>> import torch, danon
    >>> from danon.core.attention_args import attention_args
    >>> from danon.core.executors import executor_for
    >>> q = torch.randn(1, 2, 32, 8)
    >>> executor_for(attention_args(q, q, q, scale=0.3)).name
    'cpu'
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Callable, Dict, Optional, Tuple

from .attention_args import AttentionArgs, BackwardArgs

__all__ = ["Executor", "register_executor", "registered", "executor_for", "prefer", "preferred"]


@dataclasses.dataclass(frozen=True)
class Executor:
    """One way to run the op: forward(a) -> (out, lse); backward(a, g) -> the seven gradients (GRADIENTS order).

    Example:
        >>> import danon
        >>> from danon.core import executors
        >>> executors._EXECUTORS["triton"].devices
        ('cuda',)
    """

    name: str
    priority: int
    devices: Optional[Tuple[str, ...]]          # device types it claims; None: every device
    supports: Callable[[AttentionArgs], bool]
    forward: Callable[[AttentionArgs], tuple]
    backward: Callable[[AttentionArgs, BackwardArgs], tuple]


_EXECUTORS: Dict[str, Executor] = {}
_preferred = threading.local()


def register_executor(name: str, *, priority: int, forward, backward, supports=lambda a: True,
                      devices: Optional[Tuple[str, ...]] = None) -> Executor:
    """Register (or replace) the executor `name`; returns it.

    Example (an executor that claims fp64 CPU calls and runs them on the CPU executor):
        >>> import torch, danon
        >>> from danon.core import executors
        >>> cpu = executors._EXECUTORS["cpu"]
        >>> ex = register_executor("fp64", priority=5, devices=("cpu",), supports=lambda a: a.q.dtype == torch.float64,
        ...                        forward=cpu.forward, backward=cpu.backward)
        >>> q = torch.randn(1, 1, 8, 4, dtype=torch.float64)
        >>> from danon.core.attention_args import attention_args
        >>> executor_for(attention_args(q, q, q, scale=0.5)).name
        'fp64'
        >>> del executors._EXECUTORS["fp64"]
    """
    executor = Executor(name, priority, None if devices is None else tuple(devices), supports, forward, backward)
    _EXECUTORS[name] = executor
    return executor


def registered() -> Tuple[str, ...]:
    """The registered executors' names, highest priority first.

    Example:
        >>> import danon
        >>> registered()
        ('triton', 'cpu')
    """
    return tuple(e.name for e in sorted(_EXECUTORS.values(), key=lambda e: -e.priority))


@contextlib.contextmanager
def prefer(name: str):
    """Within this scope, calls try executor `name` first, on any device it supports.

    Example:
        >>> import torch, danon
        >>> from danon.core.attention_args import attention_args
        >>> q = torch.randn(1, 1, 16, 16)
        >>> with prefer("triton"):
        ...     executor_for(attention_args(q, q, q, scale=0.25)).name
        'triton'
    """
    if name not in _EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; registered: {', '.join(registered()) or 'none'}")
    before = getattr(_preferred, "name", None)
    _preferred.name = name
    try:
        yield
    finally:
        _preferred.name = before


def preferred() -> Optional[str]:
    """The executor `prefer` asks for in this thread, or None.

    Example:
        >>> import danon
        >>> preferred() is None
        True
    """
    return getattr(_preferred, "name", None)


def executor_for(a: AttentionArgs) -> Executor:
    """The executor that runs this call.

    Example:
        >>> import torch, danon
        >>> from danon.core.attention_args import attention_args
        >>> q = torch.randn(1, 1, 16, 16, dtype=torch.float64)
        >>> executor_for(attention_args(q, q, q, scale=0.25)).name
        'cpu'
    """
    name = preferred()
    if name is not None and _EXECUTORS[name].supports(a):
        return _EXECUTORS[name]
    device = a.q.device.type
    for executor in sorted(_EXECUTORS.values(), key=lambda e: -e.priority):
        if (executor.devices is None or device in executor.devices) and executor.supports(a):
            return executor
    raise RuntimeError(f"no registered executor runs danon::attention on {device} tensors of dtype {a.q.dtype} "
                       f"(registered: {', '.join(registered()) or 'none'}; `import danon` registers the CPU and "
                       f"Triton executors)")
