"""UCSA: near + global + top-k selected blocks exactly, every other visible block as its mean."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .blocks import (block_counts, block_sums, block_sums_backward, compact, key_visibility, means, near_blocks,
                     num_blocks, pad_rows, query_layout, summary_dtype, window_blocks)
from .plan import Plan


def selection_queries(q: Tensor, b: int, num_kv_heads: int, causal: bool, per_head: bool = False) -> Tensor:
    """qbar [B, Hkv, Tq, D]: the query each query block selects with, summed over its kv group's heads
    (per_head: [B, H, Tq, D], one per query head, for the attention-mass estimate).

    Without causal masking, the mean query of the block itself. With it, the mean query of the
    previous block: every row of block t_q sees positions < t_q b, none of it sees the block's later
    rows, so the selection of a row never reads a position after it (block 0 selects nothing: no
    block lies strictly before it).

    Example:
        >>> import torch
        >>> q = torch.arange(8.0).view(1, 1, 8, 1)          # positions 0..7, blocks of 4
        >>> selection_queries(q, 4, 1, causal=False).flatten().tolist()
        [1.5, 5.5]
        >>> selection_queries(q, 4, 1, causal=True).flatten().tolist()
        [0.0, 1.5]
    """
    B, H, nq, D = q.shape
    tq = num_blocks(nq, b)
    q_sum = pad_rows(q.to(summary_dtype(q)), tq * b).reshape(B, H, tq, b, D).sum(-2)
    if causal:
        # shift by one block; block t_q - 1 < Tq - 1 is always full, so its mean divides by b
        qbar = F.pad(q_sum[:, :, :-1], (0, 0, 1, 0)) / b
    else:
        q_rows = torch.clamp(nq - torch.arange(tq, device=q.device) * b, max=b).to(q_sum.dtype)
        qbar = q_sum / q_rows[:, None]
    return qbar if per_head else qbar.view(B, num_kv_heads, H // num_kv_heads, tq, D).sum(2)


def history_rows(nq: int, nk: int, b: int) -> int:
    """How many query rows before the call's first one the causal selection reads: the rest of the first
    query block and the whole block before it (`query_layout`), or every earlier row when there are fewer.

    Example:
        >>> history_rows(64, 64, 16), history_rows(1, 70, 16), history_rows(1, 6, 16)
        (0, 21, 5)
    """
    pad, first, _ = query_layout(nq, nk, b)
    return pad + b if first > 0 else pad


def causal_selection_queries(q: Tensor, past_queries: Optional[Tensor], nk: int, b: int, num_kv_heads: int,
                             per_head: bool = False) -> Tensor:
    """qbar [B, Hkv, Tq, D] of a causal call whose rows are absolute positions Nk - Nq + i (queries after a cache):
    `selection_queries` of the full sequence, read from the call's queries and the `past_queries` before them
    (at least `history_rows` of them; the last ones are used).

    Example:
        >>> import torch
        >>> q = torch.arange(8.0).view(1, 1, 8, 1)
        >>> full = selection_queries(q, 4, 1, causal=True)
        >>> bool(torch.equal(causal_selection_queries(q[:, :, 5:], q[:, :, :5], 8, 4, 1), full[:, :, 1:]))
        True
    """
    B, H, nq, D = q.shape
    pad, first, _ = query_layout(nq, nk, b)
    need = history_rows(nq, nk, b)
    if need == 0:
        return selection_queries(q, b, num_kv_heads, causal=True, per_head=per_head)
    have = 0 if past_queries is None else past_queries.shape[2]
    if have < need:
        raise ValueError(f"ucsa with queries after a cache (Nq = {nq} < Nk = {nk}) selects blocks with the mean query "
                         f"of the block before each query block: pass past_queries, the {need} query rows before "
                         f"this call's (got {have})")
    # the rows from the start of absolute block first - 1 (or 0): entry 1 (or 0) of their qbar is block first's
    rows = torch.cat([past_queries[:, :, have - need:].to(q.dtype), q], 2)
    qbar = selection_queries(rows, b, num_kv_heads, causal=True, per_head=per_head)
    return qbar[:, :, 1:] if first > 0 else qbar


def causal_selection_counts(num_query_blocks, sparsity_factor: float, device, first: int = 0) -> Tensor:
    """int64 [Tq]: k(t_q) = ceil(sparsity_factor * (t_q + 1)), the fraction of the key blocks a causal
    query block can see (blocks 0..t_q), not of all N: a prefix run selects what the full run does.

    Example:
        >>> causal_selection_counts(5, 0.5, "cpu").tolist()
        [1, 1, 2, 2, 3]
    """
    seen = torch.arange(1, num_query_blocks + 1, device=device, dtype=torch.float64) + first
    return torch.ceil(seen * sparsity_factor).to(torch.int64)


def estimated_mass(qbar: Tensor, kbar: Tensor, counts: Tensor, seen: Tensor, scale: float) -> Tensor:
    """m [B, Hkv, Tq, Tk]: each key block's estimated share of a query block's attention, the `gamma` selection's
    estimate (docs/design.md, "Selection by attention mass").

    For query head h, the softmax over the blocks in `seen` that hold a visible key of
    scale * qbar_h . kbar_t + log n_t: the weight block t would get, as a summary, from the block's selection
    query (its mean query; causal: the previous block's); then the mean over the kv group's heads.
    qbar [B, H, Tq, D] per head; kbar [B, Hkv, Tk, D]; counts [B, Tk] visible keys per block; seen bool
    [Tq, Tk]. A query block that sees no block gets zeros.

    Example:
        >>> import torch
        >>> qbar = torch.tensor([[[[1.0, 0.0]]]]); kbar = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
        >>> m = estimated_mass(qbar, kbar, torch.tensor([[1.0, 1.0]]), torch.ones(1, 2, dtype=torch.bool), 1.0)
        >>> [round(x, 4) for x in m.flatten().tolist()]     # softmax(1, 0)
        [0.7311, 0.2689]
    """
    B, H, tq, D = qbar.shape
    Hkv = kbar.shape[1]
    kbar = kbar.detach().to(qbar.dtype)              # selections carry no gradient
    logits = (qbar.view(B, Hkv, H // Hkv, tq, D) @ kbar[:, :, None].transpose(-1, -2)) * scale
    counts = counts.to(qbar.dtype)
    logits = logits + counts.clamp(min=1).log()[:, None, None, None, :]
    ok = seen[None, None, None] & (counts > 0)[:, None, None, None, :]
    logits = logits.masked_fill(~ok, float("-inf"))
    # a row with no block is all -inf: its softmax is NaN, and it holds no mass
    return torch.softmax(logits, -1).nan_to_num(0.0).mean(2)


def mass_selection(mass: Tensor, covered: Tensor, eligible: Tensor, top_k: int, gamma: float) -> tuple:
    """(top_idx, take) [..., top_k]: the eligible blocks in order of estimated mass, each taken while the mass
    already covered (`covered`, the near and global blocks', plus the higher-ranked ones') is below `gamma`.

    Example:
        >>> import torch
        >>> mass = torch.tensor([[0.5, 0.3, 0.15, 0.05]]); eligible = torch.tensor([[False, True, True, True]])
        >>> idx, take = mass_selection(mass, mass[:, :1], eligible, 3, 0.9)
        >>> idx.tolist(), take.tolist()    # 0.5 covered; + 0.3 = 0.8 < 0.9, so block 2 is taken too
        ([[1, 2, 3]], [[True, True, False]])
    """
    val, idx = torch.topk(mass.masked_fill(~eligible, -1.0), top_k, dim=-1)
    got = val.clamp(min=0)
    before = covered + torch.cumsum(got, -1) - got
    return idx, (val >= 0) & (before < gamma)


def list_capacity(tk, b: int, global_tokens: int, top_k_blocks: int, sparsity_factor: Optional[float]) -> tuple:
    """(g, top_k, selects, lists): global blocks and top-k, each clamped to Tk without a guard
    (torch.sym_min); whether blocks are selected and whether the plan lists blocks at all, facts of the
    options (Tk >= 1), so no guard on the length either. Shared with plan_shapes.py.

    Example:
        >>> list_capacity(4, 16, 64, 16, None), list_capacity(8, 16, 0, 0, 0.25)
        ((4, 4, True, True), (0, 2, True, True))
    """
    g = torch.sym_min(num_blocks(global_tokens, b), tk)
    top_k = math.ceil(sparsity_factor * tk) if sparsity_factor is not None else top_k_blocks
    selects = sparsity_factor > 0 if sparsity_factor is not None else top_k_blocks > 0
    return g, torch.sym_min(top_k, tk), selects, global_tokens > 0 or selects


def ucsa_summary_backward(plan: Plan, options: dict, key_padding_mask: Optional[Tensor], grad_summary_k: Tensor,
                          grad_summary_v: Tensor, k: Tensor, v: Tensor) -> tuple:
    """(dk, dv) of UCSA's summaries from their gradients, without rebuilding them under autograd.

    A summary is the mean of its block's visible keys, so dk[j] = visible[j] grad[block of j] / count: one fresh
    [B, Hkv, N, D] tensor. The selection reads the same means but carries no gradient (DESIGN.md section 3).
    `plan` is the forward's plan (danon::plan saves it); tests/core/test_gradients.py holds this to autograd
    in float64.

    Example:
        >>> import torch
        >>> k = torch.randn(1, 2, 256, 16)
        >>> plan = ucsa_plan(k, k, k, causal=True, block_size=16, local_window_size=32, global_tokens=16,
        ...                  top_k_blocks=2, compress=True, sparsity_factor=None, gamma=None)
        >>> g = torch.ones_like(plan.summary_k)
        >>> dk, dv = ucsa_summary_backward(plan, {}, None, g, g, k, k)
        >>> dk.shape, float(dk[0, 0, 0, 0])
        (torch.Size([1, 2, 256, 16]), 0.0625)
    """
    B, Hkv, nk, _ = k.shape
    b, acc = plan.block_size, summary_dtype(k)
    denom = plan.summary_count.to(acc).clamp(min=1)[..., None]                    # [B, Hkv, Tk, 1]
    visible = key_visibility(key_padding_mask, B, nk, b, k.device)

    def one(grad: Tensor, x: Tensor) -> Tensor:
        return block_sums_backward(grad.to(acc) / denom, visible, b, nk).to(x.dtype)

    return one(grad_summary_k, k), one(grad_summary_v, v)


def ucsa_plan(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, key_padding_mask: Optional[Tensor] = None,
              block_size: int, local_window_size: int, global_tokens: int, top_k_blocks: int,
              sparsity_factor: Optional[float], compress: bool, gamma: Optional[float],
              past_queries: Optional[Tensor] = None, scale: Optional[float] = None) -> Plan:
    """Build the UCSA plan (DESIGN.md section 3).

    The family's parameters have no defaults here: their defaults live in its spec (core/families.py), which
    passes every one.

    Selection score r(t_q, t) = sum over the kv group's query heads of qbar . kbar_t, kbar_t the mean
    visible key of block t, qbar the mean query of block t_q; under causal masking the mean query of
    block t_q - 1, and k = ceil(sparsity_factor * (t_q + 1)), so that a query's plan never depends on a
    later position nor on how many follow (``selection_queries``, ``causal_selection_counts``). Queries after
    a cache (Nq < Nk, causal) get their absolute query blocks' lists (`query_layout`); their selection reads
    the block before each query block, so it needs `past_queries`, the query rows before the call
    (``causal_selection_queries``).

    With `gamma`, the selection is by attention mass instead: the eligible blocks in order of `estimated_mass`
    (per head, from the same selection queries, with the logit `scale`, default D ** -0.5), each taken while the
    estimated mass of the near, global and higher-ranked blocks is below gamma, at most k of them
    (``mass_selection``). Under causal masking the estimate spans the blocks strictly before the query block.

    Example:
        >>> import torch
        >>> from danon.core import ucsa_plan
        >>> q = torch.randn(1, 4, 256, 16); k = torch.randn(1, 2, 256, 16)
        >>> p = ucsa_plan(q, k, k, block_size=16, local_window_size=16, global_tokens=16, top_k_blocks=2,
        ...               sparsity_factor=None, compress=True, gamma=None)
        >>> p.window, p.block_idx.shape  # near blocks: the window; listed: global 1 + top-k 2
        (1, torch.Size([1, 2, 16, 3]))
    """
    B, H, nq, D = q.shape
    Hkv, nk = k.shape[1], k.shape[2]
    b = block_size
    _, first, tq = query_layout(nq, nk, b)
    tk = num_blocks(nk, b)
    selects = list_capacity(tk, b, global_tokens, top_k_blocks, sparsity_factor)[2]
    visible = key_visibility(key_padding_mask, B, nk, b, q.device)
    masked = key_padding_mask is not None
    qbar = None
    if selects:
        per_head = gamma is not None
        qbar = (causal_selection_queries(q, past_queries, nk, b, Hkv, per_head) if causal
                else selection_queries(q, b, Hkv, False, per_head))
    return ucsa_plan_from_stats(
        qbar, block_counts(visible, b), block_sums(k, visible, b, masked),
        block_sums(v, visible, b, masked) if compress else None, first, tq, causal=causal, block_size=b,
        local_window_size=local_window_size, global_tokens=global_tokens, top_k_blocks=top_k_blocks,
        sparsity_factor=sparsity_factor, gamma=gamma, scale=D ** -0.5 if scale is None else scale,
        seq_len_q=nq, seq_len_k=nk)


def ucsa_plan_from_stats(qbar: Optional[Tensor], counts: Tensor, k_sums: Tensor, v_sums: Optional[Tensor], first: int,
                         tq: int, *, causal: bool, block_size: int, local_window_size: int, global_tokens: int,
                         top_k_blocks: int, sparsity_factor: Optional[float], gamma: Optional[float], scale: float,
                         seq_len_q: int, seq_len_k: int) -> Plan:
    """The UCSA plan's rows for the absolute query blocks first .. first + Tq - 1 from block statistics alone: the
    selection queries `qbar` of those Tq blocks ([B, Hkv, Tq, D]; per query head [B, H, Tq, D] with gamma; None
    when nothing is selected), visible keys per block `counts` [B, Tk] and the sums of the blocks' keys and values
    [B, Hkv, Tk, D] (v_sums None: no summaries). What `ucsa_plan` builds from q, k and v, and what
    danon.context_parallel builds from statistics gathered from every rank.

    Example:
        >>> import torch
        >>> from danon.core.blocks import block_sums
        >>> q = torch.randn(1, 2, 256, 16); vis = torch.ones(1, 256)
        >>> kw = dict(block_size=16, local_window_size=16, global_tokens=16, top_k_blocks=2, sparsity_factor=None,
        ...           gamma=None)
        >>> full = ucsa_plan(q, q, q, compress=True, **kw)
        >>> qbar = selection_queries(q, 16, 2, causal=False)[:, :, 4:6]
        >>> rows = ucsa_plan_from_stats(qbar, vis.view(1, 16, 16).sum(-1), block_sums(q, vis, 16),
        ...                             block_sums(q, vis, 16), 4, 2, causal=False, scale=0.25, seq_len_q=256,
        ...                             seq_len_k=256, **kw)
        >>> bool(torch.equal(rows.block_idx, full.block_idx[:, :, 4:6]))
        True
    """
    B, Hkv, tk, D = k_sums.shape
    b = block_size
    w = window_blocks(local_window_size, b)
    # the lists' capacity g + top_k; causal sparsity_factor takes fewer per block
    g, top_k, selects, lists = list_capacity(tk, b, global_tokens, top_k_blocks, sparsity_factor)
    dev = k_sums.device

    has_keys = (counts > 0)[:, None, None, :]                          # [B, 1, 1, Tk]
    near = near_blocks(tq, tk, w, causal, dev, first)                  # [Tq, Tk]
    t_q = (torch.arange(tq, device=dev) + first)[:, None]
    t_k = torch.arange(tk, device=dev)[None, :]
    is_global = (t_k < g).expand(tq, tk)
    if causal:
        is_global = is_global & (t_k <= t_q)      # a global block in the future holds no visible key
        past = t_k < t_q
    else:
        past = torch.ones(tq, tk, dtype=torch.bool, device=dev)
    fixed = (is_global & ~near)[None, None] & has_keys                  # [B, 1, Tq, Tk]
    eligible = (~near & ~is_global & past)[None, None] & has_keys      # [B, 1, Tq, Tk]

    kbar = means(k_sums, counts[:, None, :])
    exact = fixed.expand(B, Hkv, tq, tk)                               # listed blocks (the near ones are the window)
    if selects:
        if gamma is None:
            score = qbar @ kbar.transpose(-1, -2)                              # [B, Hkv, Tq, Tk]
            score = score.masked_fill(~eligible, float("-inf"))
            top_val, top_idx = torch.topk(score, top_k, dim=-1)
            take = top_val > float("-inf")
        else:
            mass = estimated_mass(qbar, kbar, counts, past, scale)
            covered = (mass * (near | is_global)).sum(-1, keepdim=True)
            top_idx, take = mass_selection(mass, covered, eligible, top_k, gamma)
        if causal and sparsity_factor is not None:
            take = take & (torch.arange(top_k, device=dev) < causal_selection_counts(tq, sparsity_factor, dev, first)[:, None])
        chosen = torch.zeros_like(exact).scatter(-1, top_idx, take)
        exact = exact | chosen
    listed = compact(exact, g + top_k) if lists else None
    plan = Plan("ucsa", b, causal, seq_len_q, seq_len_k, window=w, block_idx=listed, key_block_counts=counts)
    if v_sums is not None:
        rest = ~exact & ~near[None, None] & past[None, None] & has_keys
        plan.summary_idx = compact(rest, tk)
        plan.summary_k = kbar
        plan.summary_v = means(v_sums, counts[:, None, :])
        plan.summary_count = counts[:, None, :].expand(B, Hkv, tk).to(kbar.dtype)
    return plan
