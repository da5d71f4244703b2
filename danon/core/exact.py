"""The exact family: every visible key, no summaries."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .blocks import block_counts, key_visibility
from .plan import Plan


def exact_plan(q: Tensor, k: Tensor, *, causal: bool = False, key_padding_mask: Optional[Tensor] = None,
               block_size: int, sliding_window: Optional[int]) -> Plan:
    """The dense plan: E(i) = all visible keys, S(i) empty (executed without gathering).

    The family's parameters have no defaults here: their defaults live in its spec (core/families.py), which
    passes every one.

    With sliding_window w, E(i) = visible keys with |i - j| < w (and j <= i under causal masking):
    the banded plan, whose near window covers exactly the blocks the band reaches, so it costs O(N w).

    Example:
        >>> import torch
        >>> from danon.core import exact_plan
        >>> exact_plan(torch.randn(1, 2, 100, 8), torch.randn(1, 2, 100, 8), block_size=64, sliding_window=None).is_dense
        True
        >>> exact_plan(torch.randn(1, 2, 100, 8), torch.randn(1, 2, 100, 8), block_size=16, sliding_window=20).window
        2
    """
    visible = key_visibility(key_padding_mask, q.shape[0], k.shape[2], block_size, q.device)
    plan = Plan("exact", block_size, causal, q.shape[2], k.shape[2], key_block_counts=block_counts(visible, block_size))
    if sliding_window is not None:
        plan.window = -(-(sliding_window - 1) // block_size)     # blocks the band reaches: ceil((w - 1) / b)
        plan.band = sliding_window
    return plan
