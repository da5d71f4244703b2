"""The sizes and dtypes of a family's plan tensors, in closed form, without building the plan.

Why: `danon::plan`'s fake impl must give the plan's shapes to Dynamo, AOTAutograd and Inductor about a
dozen times per compile. Running the builder on fake tensors with symbolic sizes costs seconds (sympy on
every op's meta function); these formulas cost microseconds. Each function mirrors its builder's
arithmetic (same names as in msra.py, ucsa.py, dala.py; UCSA's list capacity is the builder's own
function); tests/core/test_plan_op.py checks them against
the built plans at many lengths and options, and `torch.library.opcheck` checks the op's fake against
its kernel. Size comparisons are torch.sym_min, as in the builders: the same number, and no guard on
a symbolic length (a guard would recompile where, say, the global blocks outnumber Tk).

Example:
    >>> import torch
    >>> from danon.core.plan_shapes import plan_shapes
    >>> q = torch.randn(1, 2, 512, 16)
    >>> plan_shapes("msra", q, q, q, None, dict(causal=True, block_size=16, window=16,
    ...                                               num_levels=2, compression_factor=2))["summary_k"]
    ((1, 2, 56, 16), torch.float32)
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .blocks import num_blocks, query_layout, summary_dtype, window_blocks
from .msra import auto_levels
from .ucsa import list_capacity

__all__ = ["plan_shapes"]

Shape = Tuple[object, ...]


def _counts_dtype(key_padding_mask: Optional[Tensor]) -> torch.dtype:
    # key_visibility: torch.ones (the default dtype) without a mask, the mask as float32 with one
    return torch.get_default_dtype() if key_padding_mask is None else torch.float32


def _msra(q, k, v, key_padding_mask, *, causal, block_size, window, num_levels, compression_factor):
    B, _, nq, D = q.shape
    Hkv, nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    b, c = block_size, compression_factor
    tq, tk = query_layout(nq, nk, b)[2], num_blocks(nk, b)
    w = window_blocks(window, b)
    levels = auto_levels(tk, w, c) if num_levels == "auto" else int(num_levels)
    near_width = w + 1 if causal else 2 * w + 1
    spans = [tk]
    for _ in range(levels):
        spans.append(num_blocks(spans[-1], c))                        # _coarsen
    capacity = sum(torch.sym_min(near_width * c, s) for s in spans[:-1]) + spans[-1]   # compact's widths
    total = sum(spans)
    acc_k, acc_v = summary_dtype(k), summary_dtype(v)
    return {"summary_idx": ((B, Hkv, tq, capacity), torch.int32),
            "summary_k": ((B, Hkv, total, D), acc_k),
            "summary_v": ((B, Hkv, total, Dv), acc_v),
            "summary_count": ((B, Hkv, total), acc_k),
            "key_block_counts": ((B, tk), _counts_dtype(key_padding_mask))}


def _ucsa(q, k, v, key_padding_mask, *, causal, block_size, local_window_size, global_tokens, top_k_blocks,
          sparsity_factor, compress, gamma, scale=None):
    B, _, nq, D = q.shape
    Hkv, nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    b = block_size
    tq, tk = query_layout(nq, nk, b)[2], num_blocks(nk, b)
    g, top_k, _, lists = list_capacity(tk, b, global_tokens, top_k_blocks, sparsity_factor)
    acc_k, acc_v = summary_dtype(k), summary_dtype(v)
    shapes = {"key_block_counts": ((B, tk), _counts_dtype(key_padding_mask))}
    if lists:
        shapes["block_idx"] = ((B, Hkv, tq, torch.sym_min(g + top_k, tk)), torch.int32)
    if compress:
        shapes.update({"summary_idx": ((B, Hkv, tq, tk), torch.int32),
                       "summary_k": ((B, Hkv, tk, D), acc_k),
                       "summary_v": ((B, Hkv, tk, Dv), acc_v),
                       "summary_count": ((B, Hkv, tk), acc_k)})
    return shapes


def _dala(q, k, v, key_padding_mask, *, causal, block_size, window, memory_size, decay, compress_rest):
    B = q.shape[0]
    Hkv, nk, D, Dv = k.shape[1], k.shape[2], k.shape[3], v.shape[3]
    b = block_size
    tq, tk = query_layout(q.shape[2], nk, b)[2], num_blocks(nk, b)
    acc = summary_dtype(k)
    shapes = {"key_block_counts": ((B, tk), _counts_dtype(key_padding_mask))}
    if memory_size > 0:           # routed = min(memory_size, nk) > 0 exactly when memory_size > 0 (nk >= 1)
        # one routed list per query block (_routed_tokens)
        shapes["token_idx"] = ((B, Hkv, tq, torch.sym_min(memory_size, nk)), torch.int32)
    if compress_rest:
        shapes.update({"summary_k": ((B, Hkv, tq, D), acc),
                       "summary_v": ((B, Hkv, tq, Dv), acc),
                       "summary_count": ((B, Hkv, tq), acc),
                       "summary_pos": ((B, Hkv, tq), acc),
                       "summary_idx": ((B, Hkv, tq, 1), torch.int32)})
    return shapes


_SHAPES = {"msra": _msra, "ucsa": _ucsa, "dala": _dala}


def plan_shapes(kind: str, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                options: Dict) -> Dict[str, Tuple[Shape, torch.dtype]]:
    """{plan field: (shape, dtype)} of the plan `kind`'s builder would return for these inputs and keywords;
    fields the plan leaves None are absent. Sizes may be SymInts (shapes of fake tensors).

    Example:
        >>> import torch
        >>> q = torch.randn(1, 4, 100, 8); k = torch.randn(1, 2, 100, 8)
        >>> plan_shapes("dala", q, k, k, None, dict(causal=False, block_size=16, window=16, memory_size=8,
        ...                                            decay="alibi", compress_rest=True))["token_idx"]
        ((1, 2, 7, 8), torch.int32)
    """
    return _SHAPES[kind](q, k, v, key_padding_mask, **options)
