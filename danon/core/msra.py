"""MSRA: a multi-resolution partition of the keys, like the far field of a fast multipole method."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .blocks import (block_counts, block_sums, block_sums_backward, compact, compact_values, key_visibility, means,
                     near_spans, num_blocks, query_layout, strictly_past, summary_dtype, window_blocks)
from .plan import Plan


def auto_levels(num_key_blocks: int, w_blocks: int, factor: int) -> int:
    """The smallest L >= 1 for which ceil(num_key_blocks / c^L) <= 2W + 1.

    Example:
        >>> auto_levels(256, 4, 4)   # 256 / 4^2 = 16 > 9 summaries, 256 / 4^3 = 4 <= 9
        3
    """
    levels = 1
    while num_blocks(num_key_blocks, factor ** levels) > 2 * w_blocks + 1:
        levels += 1
    return levels


def _coarsen(x: Tensor, factor: int) -> Tensor:
    """Sum groups of `factor` consecutive spans along dim 2 (spans past the end count as empty)."""
    s = x.shape[2]
    pad = num_blocks(s, factor) * factor - s
    x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    return x.view(*x.shape[:2], -1, factor, *x.shape[3:]).sum(3)


def msra_summary_backward(plan: Plan, options: dict, key_padding_mask: Optional[Tensor], grad_summary_k: Tensor,
                          grad_summary_v: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """(dk, dv) of MSRA's summaries from their gradients, without rebuilding them under autograd.

    A level-l summary is the mean of the visible keys of c^l consecutive blocks, so dk[j] = visible[j] times the
    sum over levels of g_l[block of j // c^l], g = grad / count: one fresh [B, Hkv, N, D] tensor, where autograd
    through the plan adds one per level and op. `plan` is the forward's plan (danon::plan saves it), `options` the
    builder's keywords (its compression_factor); tests/core/test_gradients.py holds this to autograd in float64.

    Example:
        >>> import torch
        >>> k = torch.randn(1, 2, 256, 16)
        >>> plan = msra_plan(k, k, k, causal=True, block_size=16, window=16, num_levels=2, compression_factor=2)
        >>> g = torch.ones_like(plan.summary_k)
        >>> dk, dv = msra_summary_backward(plan, {"compression_factor": 2}, None, g, g, k, k)
        >>> dk.shape
        torch.Size([1, 2, 256, 16])
    """
    B, Hkv, nk, D = k.shape
    b, c, acc = plan.block_size, int(options["compression_factor"]), summary_dtype(k)
    tk = num_blocks(nk, b)
    sizes = [tk]                                     # spans per level: the summary table is their concatenation
    while sum(sizes) < plan.summary_count.shape[-1]:
        sizes.append(num_blocks(sizes[-1], c))
    assert sum(sizes) == plan.summary_count.shape[-1], "summary table does not match the levels"
    denom = plan.summary_count.to(acc).clamp(min=1)[..., None]                  # [B, Hkv, S, 1]
    visible = key_visibility(key_padding_mask, B, nk, b, k.device)

    def one(grad: Tensor, x: Tensor) -> Tensor:
        g = grad.to(acc) / denom
        per_block, offset = 0, 0
        for level, size in enumerate(sizes):         # a level-l span covers blocks [s c^l, (s + 1) c^l)
            per_block = per_block + g[:, :, offset:offset + size].repeat_interleave(c ** level, dim=2)[:, :, :tk]
            offset += size
        return block_sums_backward(per_block, visible, b, nk).to(x.dtype)

    return one(grad_summary_k, k), one(grad_summary_v, v)


def msra_plan(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, key_padding_mask=None, block_size: int,
              window: int, num_levels: Union[int, str], compression_factor: int) -> Plan:
    """Build the MSRA plan (DESIGN.md section 3).

    The family's parameters have no defaults here: their defaults live in its spec (core/families.py), which
    passes every one.

    Level-l spans are c^l consecutive blocks. Exact: the near blocks at level 0 (the plan's window). Summaries at
    level l < L: spans not near at l whose parent is near at l + 1; at level L: every visible span
    that is not near. Each visible key lands in exactly one exact block or one summary. Queries after a cache
    (Nq < Nk, causal) get the rows of their absolute query blocks (`query_layout`): the same lists as in one
    full-sequence call.

    Example:
        >>> import torch
        >>> from danon.core import msra_plan
        >>> q = torch.randn(1, 2, 512, 16)
        >>> p = msra_plan(q, q, q, causal=True, block_size=16, window=16, num_levels=2, compression_factor=2)
        >>> p.summary_k.shape  # levels 0, 1, 2 hold 32 + 16 + 8 spans
        torch.Size([1, 2, 56, 16])
    """
    B, _, nq, D = q.shape
    nk = k.shape[2]
    b = block_size
    _, first, tq = query_layout(nq, nk, b)
    visible = key_visibility(key_padding_mask, B, nk, b, q.device)
    masked = key_padding_mask is not None
    return msra_plan_from_block_sums(
        block_counts(visible, b), block_sums(k, visible, b, masked), block_sums(v, visible, b, masked),
        torch.arange(tq, device=q.device) + first, causal=causal, block_size=b, window=window, num_levels=num_levels,
        compression_factor=compression_factor, seq_len_q=nq, seq_len_k=nk)


def msra_plan_from_block_sums(counts: Tensor, k_sums: Tensor, v_sums: Tensor, t_q: Tensor, *, causal: bool,
                              block_size: int, window: int, num_levels: Union[int, str], compression_factor: int,
                              seq_len_q: int, seq_len_k: int) -> Plan:
    """The MSRA plan's rows for the absolute query blocks `t_q` from the keys' block statistics alone: visible keys
    per block `counts` [B, Tk] and the sums of their keys and values [B, Hkv, Tk, D]. What `msra_plan` builds from
    k and v, and what danon.context_parallel builds from statistics gathered from every rank.

    Example:
        >>> import torch
        >>> from danon.core.blocks import block_sums
        >>> k = torch.randn(1, 2, 512, 16); vis = torch.ones(1, 512)
        >>> full = msra_plan(k, k, k, causal=True, block_size=16, window=16, num_levels=2, compression_factor=2)
        >>> rows = msra_plan_from_block_sums(vis.view(1, 32, 16).sum(-1), block_sums(k, vis, 16), block_sums(k, vis, 16),
        ...                                  torch.arange(8, 12), causal=True, block_size=16, window=16, num_levels=2,
        ...                                  compression_factor=2, seq_len_q=512, seq_len_k=512)
        >>> bool(torch.equal(rows.summary_idx, full.summary_idx[:, :, 8:12]))
        True
    """
    B, Hkv, tk, _ = k_sums.shape
    b, c = block_size, compression_factor
    tq = t_q.shape[0]
    w = window_blocks(window, b)
    levels = auto_levels(tk, w, c) if num_levels == "auto" else int(num_levels)
    dev = k_sums.device
    near_width = w + 1 if causal else 2 * w + 1

    counts = [counts[:, None, :, None]]                                # [B, 1, S_l, 1]
    k_sums, v_sums = [k_sums], [v_sums]                                # [B, Hkv, S_l, D]
    for _ in range(levels):
        counts.append(_coarsen(counts[-1], c))
        k_sums.append(_coarsen(k_sums[-1], c))
        v_sums.append(_coarsen(v_sums[-1], c))

    summary_idx, offset = [], 0
    for l in range(levels + 1):
        spans = counts[l].shape[2]
        has_keys = counts[l][:, 0, :, 0] > 0                                    # [B, S_l]
        if l < levels:
            # the children of the near parents at level l + 1, as a [Tq, near_width * c] table of span indices:
            # memory O(N / b), where a [Tq, S_l] candidate table would be O(N^2 / b^2)
            width = near_width * c
            cand_spans = ((t_q // c ** (l + 1) - w) * c)[:, None] + torch.arange(width, device=dev)
            inside = (cand_spans >= 0) & (cand_spans < spans)
            d = (t_q // c ** l)[:, None] - cand_spans
            near = ((d >= 0) & (d <= w)) if causal else (d.abs() <= w)
            cand = inside & ~near
            if causal:
                cand = cand & (d > 0)
            nonempty = torch.gather(has_keys, 1, cand_spans.clamp(0, spans - 1).reshape(1, -1).expand(B, -1))
            cand = cand[None] & nonempty.view(B, tq, width)                     # [B, Tq, width]
            capacity = torch.sym_min(width, spans)
            idx = compact_values(cand, cand_spans.expand(B, tq, width), capacity)[:, None]   # [B, 1, Tq, cap]
        else:   # the top level: every visible span that is not near (S_L = Tk / c^L of them)
            cand = ~near_spans(t_q // c ** l, spans, w, causal)
            if causal:
                cand = cand & strictly_past(t_q // c ** l, spans)
            cand = cand[None, None] & has_keys[:, None, None, :]                # [B, 1, Tq, S_L]
            idx = compact(cand, spans)
        summary_idx.append(torch.where(idx >= 0, idx + offset, idx))
        offset += spans

    all_counts = torch.cat(counts, 2)[..., 0]                          # [B, 1, S]
    return Plan(
        "msra", b, causal, seq_len_q, seq_len_k,
        window=w,
        summary_idx=torch.cat(summary_idx, -1).expand(B, Hkv, -1, -1),
        summary_k=means(torch.cat(k_sums, 2), all_counts),
        summary_v=means(torch.cat(v_sums, 2), all_counts),
        summary_count=all_counts.expand(B, Hkv, -1).to(k_sums[0].dtype),
        key_block_counts=counts[0][:, 0, :, 0],
    )
