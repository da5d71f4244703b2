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
                   attn_mask: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
                   sliding_window: Optional[int] = None, scale: Optional[float] = None, softcap: Optional[float] = None,
                   min_seq_len: int = 0, **family_options) -> Tensor:
    """Run one attention site as `family`, or exactly when its key length is below `min_seq_len`.

    sliding_window: w such that query i sees keys i - w < j <= i (with causal): the banded exact plan,
    O(N w); folded into the mask when a general mask is present too. Family keywords such as
    MSRA's `window` pass through `family_options`.

    Example:
        >>> q = torch.randn(1, 2, 64, 8)
        >>> attention_site(q, q, q, family="msra", causal=True, min_seq_len=4096).shape   # short: exact
        torch.Size([1, 2, 64, 8])
    """
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(torch.bool)
    if family != "exact" and k.shape[2] >= min_seq_len:
        return functional.attention(q, k, v, kind=family, causal=causal, key_padding_mask=key_padding_mask,
                                    scale=scale, **family_options)
    if sliding_window is not None and attn_mask is None:
        return functional.exact_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                                          softcap=softcap, sliding_window=sliding_window)
    if sliding_window is not None:
        i = torch.arange(q.shape[2], device=q.device)[:, None]
        j = torch.arange(k.shape[2], device=q.device)[None, :]
        band = (i - j < sliding_window) & (j <= i) if causal else (i - j).abs() < sliding_window
        attn_mask = band if attn_mask is None else (attn_mask & band if attn_mask.dtype == torch.bool
                                                   else attn_mask.masked_fill(~band, float("-inf")))
        causal = False
    return functional.exact_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                                      attn_mask=attn_mask, scale=scale, softcap=softcap)
