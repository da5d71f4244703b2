"""What a rewritten attention site calls: the functional API, with the backend's decision applied.

The attention pass replaces each site with a call to `attention_site`; it runs when the graph is
traced for lowering, so the family choice by sequence length (`min_seq_len`) is made on the
traced shapes (and guarded on when they are symbolic).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from danon import functional


def attention_site(q: Tensor, k: Tensor, v: Tensor, *, family: str, causal: bool = False,
                   attn_mask: Optional[Tensor] = None, scale: Optional[float] = None, min_seq_len: int = 0,
                   **family_options) -> Tensor:
    """Run one attention site as `family`, or exactly when its key length is below `min_seq_len`.

    Example:
        >>> q = torch.randn(1, 2, 64, 8)
        >>> attention_site(q, q, q, family="msra", causal=True, min_seq_len=4096).shape   # short: exact
        torch.Size([1, 2, 64, 8])
    """
    if family != "exact" and k.shape[2] >= min_seq_len:
        return functional.attention(q, k, v, kind=family, causal=causal, scale=scale, **family_options)
    return functional.exact_attention(q, k, v, causal=causal, attn_mask=attn_mask, scale=scale)
