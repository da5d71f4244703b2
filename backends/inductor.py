"""Lowering targets for the rewritten graph: Inductor (default) and eager."""
from __future__ import annotations

from typing import Callable, List

import torch
import torch.fx as fx


def lower(gm: fx.GraphModule, example_inputs: List[torch.Tensor], target: str) -> Callable:
    """Compile the rewritten graph for `target` ("inductor" | "eager").

    With Inductor the danon op stays an opaque extern call (it has a fake impl and autograd);
    plan building, projections and everything around it compile as usual.

    Example:
        >>> import torch
        >>> gm = torch.fx.symbolic_trace(torch.nn.ReLU())
        >>> lower(gm, [torch.randn(3)], "eager")(torch.tensor([-1.0]))
        tensor([0.])
    """
    if target == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx
    return compile_fx(gm, example_inputs)
