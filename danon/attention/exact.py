"""The exact family: every visible key, no summaries."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .blocks import block_counts, key_visibility
from .plan import Plan


def exact_plan(q: Tensor, k: Tensor, *, causal: bool = False, key_padding_mask: Optional[Tensor] = None,
               block_size: int = 64) -> Plan:
    """The dense plan: E(i) = all visible keys, S(i) empty (executed without gathering).

    Example:
        >>> import torch
        >>> from danon.attention import exact_plan
        >>> exact_plan(torch.randn(1, 2, 100, 8), torch.randn(1, 2, 100, 8)).is_dense
        True
    """
    visible = key_visibility(key_padding_mask, q.shape[0], k.shape[2], block_size, q.device)
    return Plan("exact", block_size, causal, q.shape[2], k.shape[2],
                key_block_counts=block_counts(visible, block_size))
