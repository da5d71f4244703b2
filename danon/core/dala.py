"""DALA: near blocks and routed important tokens exactly, the rest as one summary, ALiBi decay."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .blocks import (block_counts, block_sums, block_sums_backward, eager_tensor, key_visibility, num_blocks,
                     query_layout, summary_dtype, window_blocks)
from .plan import Plan


def alibi_slopes(num_heads: int, device=None) -> Tensor:
    """ALiBi's geometric slopes: lambda_h = 2^(-8 (h + 1) / H).

    Example:
        >>> alibi_slopes(2)
        tensor([0.0625, 0.0039])
    """
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"num_heads must be an int >= 1, got {num_heads!r}")
    h = torch.arange(1, num_heads + 1, dtype=torch.float64, device=device)
    return torch.pow(2.0, -8.0 * h / num_heads).to(torch.float32)


def _flat_rows(idx: Tensor, n: int) -> Tensor:
    """idx [B, Hkv, Tq, M], rows of each (batch, kv head)'s [n, D] table -> rows of the flat [B*Hkv*n, D] table."""
    B, Hkv = idx.shape[:2]
    return idx + (torch.arange(B * Hkv, device=idx.device) * n).view(B, Hkv, 1, 1)


def _gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x [B, Hkv, N, D], idx [B, Hkv, Tq, M] (valid, >= 0) -> [B, Hkv, Tq, M, D] without an index per element."""
    B, Hkv, n, D = x.shape
    return x.reshape(B * Hkv * n, D).index_select(0, _flat_rows(idx, n).reshape(-1)).view(*idx.shape, D)


def _gathered_sum(x: Tensor, idx: Tensor) -> Tensor:
    """x [B, Hkv, N, D], idx [B, Hkv, Tq, M] (valid, >= 0) -> sum over M of the rows: [B, Hkv, Tq, D].

    embedding_bag sums the rows without materialising the [.., M, D] gather (at N = 16k that gather is twice
    the size of the keys, in fresh pages); exports keep the plain gather, which every exporter knows.
    """
    if torch.compiler.is_exporting():
        return _gather_rows(x, idx).sum(-2)
    B, Hkv, n, D = x.shape
    bags = _flat_rows(idx, n).reshape(-1, idx.shape[-1])
    return F.embedding_bag(bags, x.reshape(B * Hkv * n, D), mode="sum").view(*idx.shape[:-1], D)


# Under torch.export with a symbolic length (ONNX export) the tree gets this many levels whatever N is, so
# that no level count is baked into a graph exported at one length (2^32 blocks is beyond any sequence).
# torch.compile and static-shape exports (target="onnxrt") instead know the level count.
MAX_TREE_LEVELS = 32


def _leaf_lists(values: Tensor, ids: Tensor, m: int) -> tuple:
    """Each block's own top-m (value, token id), padded to width m with (-inf, -1); in no particular order (every
    consumer takes a top-m of them again)."""
    width = min(m, values.shape[-1])
    if width == values.shape[-1]:   # the whole block (m >= b, the default 64 = 64): a topk would only sort it
        top_val, top_ids = values, ids
    else:
        top_val, pos = torch.topk(values, width, dim=-1)
        top_ids = torch.gather(ids, -1, pos)
    if width < m:   # keep one list width at every level
        top_val = F.pad(top_val, (0, m - width), value=float("-inf"))
        top_ids = F.pad(top_ids, (0, m - width), value=-1)
    return top_val, top_ids


def _merge(left_val: Tensor, left_ids: Tensor, right_val: Tensor, right_ids: Tensor, m: int) -> tuple:
    pairs_val, pairs_ids = torch.cat([left_val, right_val], -1), torch.cat([left_ids, right_ids], -1)
    top_val, pos = torch.topk(pairs_val, m, dim=-1)
    return top_val, torch.gather(pairs_ids, -1, pos)


def _topk_tree(values: Tensor, ids: Tensor, m: int) -> list:
    """Top-m (value, token id) lists of dyadic runs of blocks: level l node u covers blocks [u 2^l, (u+1) 2^l).

    values, ids: [B, Hkv, P, b] (P blocks, padded with -inf). Level 0 is each block's own top-m; a level
    with an odd number of nodes is padded with one empty node (-inf, id -1) before pairing.
    """
    top_val, top_ids = _leaf_lists(values, ids, m)
    levels = [(top_val, top_ids)]
    while top_val.shape[2] > 1:
        odd = top_val.shape[2] % 2
        pairs_val = F.pad(top_val, (0, 0, 0, odd), value=float("-inf")).reshape(*top_val.shape[:2], -1, 2 * m)
        pairs_ids = F.pad(top_ids, (0, 0, 0, odd), value=-1).reshape(*top_ids.shape[:2], -1, 2 * m)
        top_val, pos = torch.topk(pairs_val, m, dim=-1)
        top_ids = torch.gather(pairs_ids, -1, pos)
        levels.append((top_val, top_ids))
    return levels


def _topk_table(values: Tensor, ids: Tensor, m: int) -> list:
    """The export form of `_topk_tree`: MAX_TREE_LEVELS levels that all keep P entries.

    Entry u of level l holds the top-m of blocks [u, u + 2^l), merged from entries u and u + 2^(l-1) of
    level l - 1 (-inf / -1 past the end). At u = k 2^l that is the tree's node k, built by the same
    merges, so `_prefix_lists` reads the same lists. Why: the tree's level sizes are nested
    ceil-divisions of the symbolic length, and 32 of them stall torch.export's sympy for tens of
    minutes; here every size is P.
    """
    top_val, top_ids = _leaf_lists(values, ids, m)
    levels = [(top_val, top_ids)]
    p = top_val.shape[2]
    u = torch.arange(p, device=values.device)
    for level in range(1, MAX_TREE_LEVELS):
        partner = u + (1 << (level - 1))
        past_end = (partner >= p)[:, None]
        partner = partner.clamp(max=p - 1)
        right_val = top_val[:, :, partner].masked_fill(past_end, float("-inf"))
        right_ids = top_ids[:, :, partner].masked_fill(past_end, -1)
        top_val, top_ids = _merge(top_val, top_ids, right_val, right_ids, m)
        levels.append((top_val, top_ids))
    return levels


def _prefix_lists(levels: list, length: Tensor, table: bool = False) -> tuple:
    """The tree's lists that exactly cover blocks [0, length) for each query block: [B, Hkv, Tq, levels*m].

    ``table``: `levels` come from `_topk_table` (node k of level l is its entry k 2^l).
    """
    vals, ids = [], []
    for level, (v, i) in enumerate(levels):
        present = ((length >> level) & 1).bool()
        node = ((length >> level) - 1).clamp(min=0)
        if table:
            node = node << level
        vals.append(v[:, :, node].masked_fill(~present[:, None], float("-inf")))
        ids.append(i[:, :, node])
    return torch.cat(vals, -1), torch.cat(ids, -1)


# Eager implementations of `_routed_tokens` by device type, registered by danon/kernels (core imports no kernel):
# fn(scores, b, m, w, causal, first, count) -> the same lists, or None where it cannot run (no compiler).
_ROUTING_KERNELS: Dict[str, Callable] = {}


def register_routing_kernel(device_type: str, fn: Callable) -> None:
    """Route DALA's tokens with `fn` for eager tensors on `device_type` (traces keep the tree of `_routed_tokens`).

    fn(scores, block_size, m, window_blocks, causal, first, count) must return `_routed_tokens`'s lists, ranked the
    same way, or None to fall back to the tree.

    Example:
        >>> from danon.core import dala
        >>> sorted(dala._ROUTING_KERNELS)   # danon/kernels registers its C++ scan for CPU
        ['cpu']
    """
    _ROUTING_KERNELS[device_type] = fn


def _routed_tokens(scores: Tensor, b: int, m: int, w: int, causal: bool, first: int = 0,
                   count: Optional[int] = None) -> Tensor:
    """int32 [B, Hkv, count, m]: per query block first .. first + count - 1 (count: default Tk - first), the m
    visible tokens outside the near blocks with the highest score, ranked by descending score, -1 padded (equal
    scores: the kernels rank the lower token first; the tree's topk in its own order).

    The candidates of query block t are the blocks [0, t - W) (and, without causal masking, [t + W + 1, Tk)).
    Eager tensors go to a registered kernel (danon/kernels: a C++ scan on CPU); traces and other devices build
    `_routed_tokens_tree`.
    """
    kernel = _ROUTING_KERNELS.get(scores.device.type)
    if kernel is not None and eager_tensor(scores):
        tk = num_blocks(scores.shape[-1], b)
        routed = kernel(scores, b, m, w, causal, first, tk - first if count is None else count)
        if routed is not None:
            return routed
    return _routed_tokens_tree(scores, b, m, w, causal, first, count)


def _routed_tokens_tree(scores: Tensor, b: int, m: int, w: int, causal: bool, first: int = 0,
                        count: Optional[int] = None) -> Tensor:
    """`_routed_tokens` in traceable torch ops: a dyadic tree of per-run top-m lists answers every block's query
    from O(log Tk) lists instead of scanning all N tokens per query block (which would cost O(N^2 / b)).
    """
    B, Hkv, nk = scores.shape
    tk = num_blocks(nk, b)
    # Eager and torch.compile pad to a power of two P (torch.compile guards on it, so the tree's sizes stay
    # concrete); under export P = Tk and the same lists come from a table (see _topk_table) whose shape
    # holds at every length. Not `isinstance(tk, torch.SymInt)`: Dynamo (danon.export's capture, strict
    # torch.export) answers False for a symbolic size, and the export then kept one length's tree.
    exporting = torch.compiler.is_exporting()
    P = tk if exporting else 1 << max(0, (tk - 1).bit_length())
    build = _topk_table if exporting else _topk_tree
    vals = F.pad(scores, (0, P * b - nk), value=float("-inf")).view(B, Hkv, P, b)
    ids = torch.arange(P * b, device=scores.device).view(1, 1, P, b).expand(B, Hkv, P, b)
    t = torch.arange(tk - first if count is None else count, device=scores.device) + first
    lists_val, lists_ids = _prefix_lists(build(vals, ids, m), (t - w).clamp(min=0), table=exporting)
    if not causal:   # the suffix [t + W + 1, P) is a prefix of the reversed block order
        rev_val, rev_ids = _prefix_lists(build(vals.flip(2), ids.flip(2), m), (P - t - w - 1).clamp(min=0),
                                         table=exporting)
        lists_val, lists_ids = torch.cat([lists_val, rev_val], -1), torch.cat([lists_ids, rev_ids], -1)
    top_val, pos = torch.topk(lists_val, m, dim=-1)
    top_ids = torch.gather(lists_ids, -1, pos)
    return torch.where(top_val > float("-inf"), top_ids, torch.full_like(top_ids, -1)).to(torch.int32)


class _CandidateSums:
    """Sum over each query block's candidate blocks ([0, t - W), and (t + W, Tk) without causal masking).

    Prefix sums over blocks (accumulated in fp64) answer every query block in O(1): O(Tk D) in all,
    where a [Tq, Tk] indicator matrix times the block sums would cost O(Tq Tk D).
    """

    def __init__(self, tq: int, tk: int, w: int, causal: bool, device, first: int = 0):
        t = torch.arange(tq, device=device) + first
        self.before = (t - w).clamp(min=0, max=tk)                    # candidates [0, before)
        self.after = None if causal else (t + w + 1).clamp(max=tk)    # and [after, Tk)

    def __call__(self, x: Tensor) -> Tensor:
        """x [..., Tk, D] -> [..., Tq, D]."""
        prefix = F.pad(x.to(torch.float64).cumsum(-2), (0, 0, 1, 0))   # prefix[a] = sum of blocks < a
        total = prefix[..., self.before, :]
        if self.after is not None:
            total = total + prefix[..., -1:, :] - prefix[..., self.after, :]
        return total.to(x.dtype)


def dala_summary_backward(plan: Plan, options: dict, key_padding_mask: Optional[Tensor], grad_summary_k: Tensor,
                          grad_summary_v: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    """(dk, dv) of DALA's rest summaries from their gradients, without rebuilding them under autograd.

    A summary is linear in the keys: the visible keys of the query block's candidate blocks less its routed
    tokens, over their count. So dk[j] = visible[j] * c[block of j] - (the summaries' g = grad / count over the
    query blocks that routed j), with c[kb] the sum of g over the query blocks whose candidates hold kb: a
    scatter and a suffix (prefix) sum over blocks. Autograd through the plan instead builds and adds a fresh
    [B, Hkv, N, D] tensor per op on the way (fresh pages at N = 16k). `plan` is the forward's plan (danon::plan
    saves it), `options` the builder's keywords (none needed here); tests/core/test_gradients.py holds this to
    autograd in float64.

    Example:
        >>> import torch
        >>> k, v = torch.randn(1, 2, 256, 16), torch.randn(1, 2, 256, 16)
        >>> plan = dala_plan(k, k, v, causal=True, block_size=16, window=16, memory_size=8, decay="none",
        ...                  compress_rest=True)
        >>> g = torch.ones_like(plan.summary_k)
        >>> dk, dv = dala_summary_backward(plan, {}, None, g, g, k, v)
        >>> dk.shape
        torch.Size([1, 2, 256, 16])
    """
    B, Hkv, nk, D = k.shape
    b, acc = plan.block_size, summary_dtype(k)
    tk = num_blocks(nk, b)
    _, first, tq = query_layout(plan.seq_len_q, nk, b)
    denom = plan.summary_count.to(acc).clamp(min=1)[..., None]                    # [B, Hkv, Tq, 1]
    visible = key_visibility(key_padding_mask, B, nk, b, k.device)                 # [B, Tk*b]
    t = torch.arange(tq, device=k.device) + first
    before = (t - plan.window).clamp(min=0, max=tk)                              # candidates [0, before)
    after = None if plan.causal else (t + plan.window + 1).clamp(max=tk)         # and [after, Tk)

    routed = None if plan.token_idx is None else _routing_bags(plan.token_idx, nk)   # shared by k and v

    def one(grad: Tensor, x: Tensor) -> Tensor:
        g = grad.to(acc) / denom                                                 # [B, Hkv, Tq, D]
        ends = g.new_zeros(B, Hkv, tk + 1, x.shape[-1]).index_add_(2, before, g)
        per_block = ends.flip(2).cumsum(2).flip(2)[:, :, 1:]                     # sum of g over before > kb
        if after is not None:
            starts = g.new_zeros(B, Hkv, tk + 1, x.shape[-1]).index_add_(2, after, g)
            per_block = per_block + starts.cumsum(2)[:, :, :tk]                  # sum of g over after <= kb
        dx = block_sums_backward(per_block, visible, b, nk)
        if routed is not None and routed[0].numel():                             # less the routed tokens
            tokens, blocks, offsets = routed
            per_token = F.embedding_bag(blocks, g.reshape(-1, g.shape[-1]), offsets, mode="sum")
            dx = dx.reshape(B * Hkv * nk, -1).index_add_(0, tokens, per_token, alpha=-1).view(B, Hkv, nk, -1)
        return dx.to(x.dtype)

    return one(grad_summary_k, k), one(grad_summary_v, v)


def _routing_bags(token_idx: Tensor, nk: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The routing inverted: (tokens, blocks, offsets) with token tokens[u] (flat over B, Hkv, N) routed by the
    query blocks (flat over B, Hkv, Tq) blocks[offsets[u] : offsets[u + 1]], each once per slot that holds it.

    What lets one embedding_bag sum each routed token's query-block gradients: an index_add_ of the
    [B, Hkv, Tq, M] slots into [B*Hkv*N, D] rows ran a row at a time (about 30 ms per tensor at N = 16k).
    """
    B, Hkv, tq, m = token_idx.shape
    idx = token_idx.long()
    valid = idx >= 0
    rows = _flat_rows(idx, nk)[valid]
    blocks = torch.arange(B * Hkv * tq, device=idx.device).view(B, Hkv, tq, 1).expand(B, Hkv, tq, m)[valid]
    rows, order = torch.sort(rows, stable=True)
    tokens, counts = torch.unique_consecutive(rows, return_counts=True)
    return tokens, blocks[order], counts.cumsum(0) - counts


def dala_plan(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, key_padding_mask: Optional[Tensor] = None,
              block_size: int, window: int, memory_size: int, importance: Optional[Tensor] = None,
              decay: str, slopes: Optional[Tensor] = None, compress_rest: bool) -> Plan:
    """Build the DALA plan (DESIGN.md section 3).

    The family's parameters have no defaults here: their defaults live in its spec (core/families.py), which
    passes every one.

    Exact: near blocks plus the `memory_size` visible tokens outside them with the highest
    importance (causal: only before the first near block). compress_rest adds one summary per
    query block holding every remaining candidate, so no visible token is dropped. Queries after a cache
    (Nq < Nk, causal) get the lists of their absolute query blocks (`query_layout`).

    Example:
        >>> import torch
        >>> from danon.core import dala_plan
        >>> q = torch.randn(1, 2, 256, 16)
        >>> p = dala_plan(q, q, q, causal=True, block_size=16, window=16, memory_size=8, decay="alibi",
        ...               compress_rest=True)
        >>> p.token_idx.shape, p.summary_idx.shape  # the near blocks are the plan's window
        (torch.Size([1, 2, 16, 8]), torch.Size([1, 2, 16, 1]))
    """
    B, H, nq, D = q.shape
    nk = k.shape[2]
    b = block_size
    _, first, tq = query_layout(nq, nk, b)
    tk = num_blocks(nk, b)
    dev = q.device
    acc = summary_dtype(k)

    visible = key_visibility(key_padding_mask, B, nk, b, dev)          # [B, Tk*b]
    masked = key_padding_mask is not None
    scores = None
    if min(memory_size, nk) > 0:
        if importance is None:
            importance = k.to(acc).norm(dim=-1)                        # [B, Hkv, Nk]
        scores = importance.detach().to(acc).masked_fill(visible[:, None, :nk] == 0, float("-inf"))

    def without_routed(k_rest: Tensor, v_rest: Tensor, idx: Tensor, valid: Tensor) -> tuple:
        k_acc, v_acc = k.to(acc), v.to(acc)
        n_empty = (~valid).sum(-1, keepdim=True).to(acc)               # -1 slots gathered row 0: take it back out
        return (k_rest - _gathered_sum(k_acc, idx) + n_empty * k_acc[:, :, :1],
                v_rest - _gathered_sum(v_acc, idx) + n_empty * v_acc[:, :, :1])

    pos_sums = None
    if compress_rest:
        positions = torch.arange(tk * b, device=dev, dtype=acc)
        pos_sums = (visible.to(acc) * positions).view(B, tk, b).sum(-1)     # [B, Tk]
    return dala_plan_from_stats(
        scores, block_counts(visible, b), block_sums(k, visible, b, masked) if compress_rest else None,
        block_sums(v, visible, b, masked) if compress_rest else None, pos_sums, without_routed, first, tq,
        num_heads=H, causal=causal,
        block_size=b, window=window, memory_size=memory_size, decay=decay, slopes=slopes, seq_len_q=nq, seq_len_k=nk)


def dala_plan_from_stats(scores: Optional[Tensor], counts: Tensor, k_sums: Optional[Tensor], v_sums: Optional[Tensor],
                         pos_sums: Tensor, without_routed, first: int, tq: int, *, num_heads: int, causal: bool,
                         block_size: int, window: int, memory_size: int, decay: str, slopes: Optional[Tensor],
                         seq_len_q: int, seq_len_k: int, token_idx: Optional[Tensor] = None) -> Plan:
    """The DALA plan's rows for the absolute query blocks first .. first + Tq - 1 from statistics alone: every key's
    routing score `scores` [B, Hkv, Nk] (-inf for padding; None: no routed tokens), visible keys per block
    `counts` [B, Tk], the blocks' key and value sums [B, Hkv, Tk, D] (None: no rest summary), the sums of the
    visible positions per block `pos_sums` [B, Tk] (None without the rest summary), and `without_routed(k_rest, v_rest, idx, valid)`, the rest sums
    less the keys and values of the routed tokens `idx` [B, Hkv, Tq, M] (clamped to >= 0; `valid` marks the real
    ones). What `dala_plan`
    builds from q, k and v, and what danon.context_parallel builds from statistics gathered from every rank.
    `token_idx`: the routed tokens when already chosen from the same scores (not chosen again).

    Example:
        >>> import torch
        >>> q = torch.randn(1, 2, 256, 16)
        >>> full = dala_plan(q, q, q, causal=True, block_size=16, window=16, memory_size=8, decay="none",
        ...                  compress_rest=False)
        >>> rows = dala_plan_from_stats(q.norm(dim=-1), torch.full((1, 16), 16.0), None, None, None, None, 4, 2,
        ...                             num_heads=2, causal=True, block_size=16, window=16, memory_size=8,
        ...                             decay="none", slopes=None, seq_len_q=256, seq_len_k=256)
        >>> bool(torch.equal(rows.token_idx, full.token_idx[:, :, 4:6]))
        True
    """
    B = counts.shape[0]
    nk = seq_len_k
    b = block_size
    tk = counts.shape[-1]
    w = window_blocks(window, b)
    dev = counts.device

    plan = Plan("dala", b, causal, seq_len_q, nk, window=w, key_block_counts=counts)
    if decay == "alibi":
        plan.slopes = alibi_slopes(num_heads, dev) if slopes is None else slopes

    routed = min(memory_size, nk)
    if token_idx is not None:
        plan.token_idx = token_idx
    elif scores is not None:
        plan.token_idx = _routed_tokens(scores, b, routed, w, causal, first, tq)

    if k_sums is not None:
        Hkv, acc = k_sums.shape[1], k_sums.dtype
        rest = _CandidateSums(tq, tk, w, causal, dev, first)
        k_rest = rest(k_sums)                                          # [B, Hkv, Tq, D]
        v_rest = rest(v_sums)
        n_rest = rest(counts.to(acc)[:, None, :, None])[..., 0]      # [B, 1, Tq]
        pos_rest = rest(pos_sums[:, None, :, None])[..., 0]
        if plan.token_idx is not None:
            valid = plan.token_idx >= 0
            idx = plan.token_idx.long().clamp(min=0)
            k_rest, v_rest = without_routed(k_rest, v_rest, idx, valid)
            n_rest = n_rest - valid.sum(-1).to(acc)
            pos_rest = pos_rest - (idx.to(acc) * valid).sum(-1)
        n_rest = n_rest.expand(B, Hkv, tq)
        has = n_rest > 0.5
        denom = n_rest.clamp(min=1)
        plan.summary_k = k_rest / denom[..., None]
        plan.summary_v = v_rest / denom[..., None]
        plan.summary_count = n_rest
        plan.summary_pos = pos_rest.expand(B, Hkv, tq) / denom
        plan.summary_idx = torch.where(has, torch.arange(tq, device=dev), -1).to(torch.int32)[..., None]
    return plan
