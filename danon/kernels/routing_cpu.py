"""DALA's routed tokens on CPU through danon's C++ scan (csrc/routing_cpu.cpp), for eager tensors.

danon/kernels/__init__.py registers `routed_tokens` with core/dala.py, whose `_routed_tokens` calls it outside
traces; torch.compile and exports keep the traceable tree (`_routed_tokens_tree`), which gives the same lists.

Example:
    >>> import torch
    >>> from danon.kernels.routing_cpu import routed_tokens
    >>> scores = torch.tensor([[[0.1, 0.9, 0.5, 0.7, 0.2, 0.3, 0.8, 0.4]]])
    >>> routed_tokens(scores, 2, 2, 1, True, 0, 4)   # block 2 sees block 0, block 3 blocks 0 and 1
    tensor([[[[-1, -1],
              [-1, -1],
              [ 1,  0],
              [ 1,  3]]]], dtype=torch.int32)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import native_cpu

__all__ = ["routed_tokens"]


def routed_tokens(scores: Tensor, block_size: int, m: int, window: int, causal: bool, first: int,
                  count: int) -> Optional[Tensor]:
    """The m highest-scoring tokens outside each query block's window ([0, t - window) and, without causal
    masking, [t + window + 1, Tk) in blocks), ranked: int32 [B, Hkv, count, m]. None where the C++ extension is
    unavailable, the scores are not float32/float64 or the window is negative (the caller then builds the tree).

    Example:
        >>> import torch
        >>> routed_tokens(torch.tensor([[[3.0, 1.0, 2.0, 0.0]]]), 1, 2, 0, True, 0, 4)   # blocks of one token
        tensor([[[[-1, -1],
                  [ 0, -1],
                  [ 0,  1],
                  [ 0,  2]]]], dtype=torch.int32)
    """
    if scores.dtype not in (torch.float32, torch.float64) or window < 0:
        return None
    ops = native_cpu.load()
    if ops is None:
        return None
    return ops.routed_tokens(scores, block_size, m, window, causal, first, count)
