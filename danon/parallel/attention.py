"""`danon::attention` with the sequence split over ranks: each rank computes its own queries' rows.

What a rank needs from the others, per family (docs/context_parallel.md draws it):

- every sparse family: the block statistics of every rank (visible keys per block, sums of keys and values:
  N / b rows per kv head, an all-gather), from which each rank builds the same summaries and the same plan
  rows as one process would (the builders' `*_from_stats` functions), and the near window's halo: the W blocks
  before each of its pieces (and after, without causal masking), from whichever ranks hold them;
- UCSA: the blocks its query blocks select (fetched by an all-to-all); under causal masking the block of
  queries before each piece, for the selection query;
- DALA: every key's routing score (N scalars per kv head, an all-gather) and the routed tokens (all-to-all);
- exact: every key and value (an all-gather: what ring attention moves too).

Fetched keys join the rank's op call as summaries of one token each (a summary of n_s = 1 has the token's
own logit, log 1 = 0, and its position for ALiBi), so one `danon::attention` call per piece runs the plan,
on the CPU or the Triton executor alike. The collectives carry autograd: the backward sends the gradients
of the fetched rows and of the gathered sums back to the ranks that hold them.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from danon.core import checks
from danon.core.attention_op import run_plan
from danon.core.blocks import block_counts, block_sums, key_visibility, num_blocks, query_layout, summary_dtype
from danon.core.dala import dala_plan_from_stats
from danon.core.families import family
from danon.core.msra import msra_plan_from_block_sums
from danon.core.plan import Plan
from danon.core.run import attention as single_process_attention
from danon.core.run import split_keywords
from danon.core.sequence_split import own_call
from danon.core.ucsa import causal_selection_queries, list_capacity, selection_queries, ucsa_plan_from_stats

from .exchange import Exchange
from .layout import SequenceLayout

__all__ = ["context_parallel_attention"]


def _pad_to(x: Tensor, length: int, dim: int) -> Tensor:
    if x.shape[dim] == length:
        return x
    shape = list(x.shape)
    shape[dim] = length - x.shape[dim]
    return torch.cat([x, x.new_zeros(shape)], dim)


class _Gathered:
    """Per-rank tensors laid end to end along one dim, reordered into sequence order (blocks or tokens)."""

    def __init__(self, layout: SequenceLayout, unit: int, device):
        self.lengths, order = [], []
        for r in range(layout.world_size):
            spans = [(s // unit, -(-e // unit)) for s, e in layout.segments(r)] if unit > 1 else layout.segments(r)
            self.lengths.append(sum(e - s for s, e in spans))
            order += [torch.arange(s, e) for s, e in spans]
        self.longest = max(self.lengths)
        self.inverse = torch.argsort(torch.cat(order)).to(device)

    def __call__(self, ex: Exchange, x: Tensor, dim: int, purpose: str) -> Tensor:
        parts = ex.all_gather(_pad_to(x, self.longest, dim).unsqueeze(0), purpose)
        whole = torch.cat([p.squeeze(0).narrow(dim, 0, n) for p, n in zip(parts, self.lengths)], dim)
        return whole.index_select(dim, self.inverse)


def _segment_stats(k: Tensor, v: Tensor, kpm: Optional[Tensor], segments, b: int, acc) -> tuple:
    """(counts [B, nb], position sums [B, nb], key sums, value sums [B, Hkv, nb, D]) of this rank's blocks."""
    counts, pos, ks, vs = [], [], [], []
    local = 0
    for s, e in segments:
        n = e - s
        seg_kpm = None if kpm is None else kpm[:, local:local + n]
        vis = key_visibility(seg_kpm, k.shape[0], n, b, k.device)
        nb = num_blocks(n, b)
        positions = torch.arange(s, s + nb * b, device=k.device, dtype=acc)
        counts.append(block_counts(vis, b))
        pos.append((vis.to(acc) * positions).view(k.shape[0], nb, b).sum(-1))
        ks.append(block_sums(k[:, :, local:local + n], vis, b, seg_kpm is not None))
        vs.append(block_sums(v[:, :, local:local + n], vis, b, seg_kpm is not None))
        local += n
    return torch.cat(counts, -1), torch.cat(pos, -1), torch.cat(ks, 2), torch.cat(vs, 2)


class _Rows:
    """The key rows fetched from every rank, looked up by (batch * kv head, position) and laid out per kv head."""

    def __init__(self, want: Tensor, rows: Tensor, n: int, bh: int):
        self.want, self.rows, self.n = want, rows, n
        owner_bh = want // n
        starts = torch.searchsorted(want, torch.arange(bh, device=want.device) * n)
        self.slot = torch.arange(want.numel(), device=want.device) - starts[owner_bh]
        self.bh, self.owner_bh = bh, owner_bh

    @functools.cached_property
    def table(self) -> Tensor:
        """[B*Hkv, width, W]: each kv head's fetched rows, the summary table the op call reads listed keys from
        (built only for plans that list keys: MSRA's fetch is its halo alone)."""
        width = int(self.slot.max()) + 1 if self.want.numel() else 0
        return self.rows.new_zeros(self.bh, width, self.rows.shape[-1]).index_put((self.owner_bh, self.slot),
                                                                                 self.rows)

    @functools.cached_property
    def positions(self) -> Tensor:
        """[B*Hkv, width] the table rows' sequence positions, in float64, not the rows' dtype: fp16 cannot hold
        position 65520, bf16 not even 257."""
        return torch.full(self.table.shape[:2], -1.0, dtype=torch.float64, device=self.rows.device).index_put(
            (self.owner_bh, self.slot), (self.want % self.n).to(torch.float64))

    def index(self, bh: Tensor, pos: Tensor) -> Tensor:
        """Row of `want` for (bh, pos); a pair that was not fetched gets some valid row (callers mask it out)."""
        return torch.searchsorted(self.want, bh * self.n + pos).clamp(max=max(self.want.numel() - 1, 0))

    def range(self, bh: int, start: int, end: int) -> Tensor:
        """[bh, end - start, W]: the rows of positions start .. end - 1 of every kv head."""
        pos = torch.arange(start, end, device=self.want.device)
        heads = torch.arange(bh, device=self.want.device)[:, None]
        return self.rows[self.index(heads, pos[None, :])]


def _exact(cp, q, k, v, kpm, params, causal, scale) -> Tensor:
    """The exact family: every rank gathers every key and value (the dense baseline's bytes)."""
    tokens = _Gathered(cp.layout, 1, q.device)
    kv = tokens(cp.exchange, torch.cat([k, v], -1), 2, "keys and values")
    k_all, v_all = kv[..., :k.shape[-1]], kv[..., k.shape[-1]:]
    kpm_all = None if kpm is None else tokens(cp.exchange, kpm, 1, "key padding").bool()
    outs, local = [], 0
    band = params.sliding_window
    for s, e in cp.layout.segments(cp.rank):
        n = e - s
        # keys [lo, hi): the prefix (causal) or everything; with a band only the keys within it
        lo = 0 if band is None else max(0, s - band + 1)
        hi = e if causal else (cp.layout.seq_len if band is None else min(cp.layout.seq_len, e + band - 1))
        queries = q[:, :, local:local + n]
        if not causal and band is not None and hi > e:   # zero rows after the queries: row i sits at position s + i
            queries = torch.cat([queries, queries.new_zeros(*queries.shape[:2], hi - e, queries.shape[3])], 2)
        with own_call():
            out = single_process_attention(
                "exact", queries, k_all[:, :, lo:hi], v_all[:, :, lo:hi], causal=causal, scale=scale,
                key_padding_mask=None if kpm_all is None else kpm_all[:, lo:hi], **params.keywords())
        outs.append(out[:, :, :n])
        local += n
    return torch.cat(outs, 2)


def _previous_query_rows(cp, q: Tensor, b: int) -> List[Optional[Tensor]]:
    """For each local piece, the query rows of the block before it (UCSA's causal selection query), or None."""
    segments = cp.layout.segments(cp.rank)
    tails, local = [], 0
    for s, e in segments:
        local += e - s
        tails.append(_pad_to(q[:, :, max(local - b, local - (e - s)):local], b, 2))
    parts = cp.exchange.all_gather(torch.stack(tails).detach(), "selection queries")
    by_end = {e: parts[r][i] for r in range(cp.layout.world_size) for i, (_, e) in enumerate(cp.layout.segments(r))}
    return [by_end[s] if s > 0 else None for s, _ in segments]


def _plans(cp, kind, params, q, k, kpm, causal, scale, inputs, stats, without_routed=None,
           routed: Optional[List[Plan]] = None) -> List[Plan]:
    """The plan rows (global indices) of each local piece, as one process would build them (DALA's second pass:
    `routed`, the first pass's plans, whose routed tokens it keeps)."""
    layout, b = cp.layout, params.block_size
    counts, pos_sums, k_sums, v_sums, scores, previous = stats
    plans, local = [], 0
    for i, (s, e) in enumerate(layout.segments(cp.rank)):
        n = e - s
        first, tq = s // b, num_blocks(n, b)
        common = dict(causal=causal, block_size=b, seq_len_q=layout.seq_len, seq_len_k=layout.seq_len)
        if kind == "msra":
            plans.append(msra_plan_from_block_sums(
                counts, k_sums, v_sums, torch.arange(tq, device=q.device) + first, window=params.window,
                num_levels=params.num_levels, compression_factor=params.compression_factor, **common))
        elif kind == "ucsa":
            per_head = params.gamma is not None
            qbar = None
            if list_capacity(counts.shape[-1], b, params.global_tokens, params.top_k_blocks, params.sparsity_factor)[2]:
                rows = q[:, :, local:local + n]   # causal: the piece's queries after the `previous` ones, ending at e
                qbar = (causal_selection_queries(rows, previous[i], e, b, k.shape[1], per_head) if causal
                        else selection_queries(rows, b, k.shape[1], False, per_head))
            plans.append(ucsa_plan_from_stats(
                qbar, counts, k_sums, v_sums if params.compress else None, first, tq,
                local_window_size=params.local_window_size, global_tokens=params.global_tokens,
                top_k_blocks=params.top_k_blocks, sparsity_factor=params.sparsity_factor, gamma=params.gamma,
                scale=q.shape[-1] ** -0.5 if scale is None else scale, **common))
        else:
            with_rest = params.compress_rest and without_routed is not None
            plans.append(dala_plan_from_stats(
                scores, counts, k_sums if with_rest else None, v_sums if with_rest else None, pos_sums,
                without_routed, first, tq, num_heads=q.shape[1], window=params.window, memory_size=params.memory_size,
                decay=params.decay, slopes=inputs.get("slopes"),
                token_idx=None if routed is None else routed[i].token_idx, **common))
        local += n
    return plans


def _listed_tokens(plan: Plan, n: int) -> Optional[Tensor]:
    """int64 [B, Hkv, Tq, L] sequence positions the plan lists exactly beyond the window (-1: none)."""
    if plan.block_idx is not None:
        blocks = plan.block_idx.long()
        tokens = blocks[..., None] * plan.block_size + torch.arange(plan.block_size, device=blocks.device)
        tokens = torch.where((blocks[..., None] >= 0) & (tokens < n), tokens, -1)
        return tokens.flatten(-2)
    if plan.token_idx is not None:
        return plan.token_idx.long()
    return None


def _halo(layout: SequenceLayout, s: int, e: int, window: int, b: int, causal: bool) -> Tuple[int, int]:
    """(start, end) of the keys a piece [s, e) attends with its near window: W blocks each side (causal: before)."""
    return max(0, s - window * b), e if causal else min(layout.seq_len, e + window * b)


# Run eagerly under torch.compile (a graph break): the fetch's sizes are data (`.tolist()` of the request counts)
@torch.compiler.disable
def context_parallel_attention(cp, q: Tensor, k: Tensor, v: Tensor, kind: str = "exact", *, causal: bool = False,
                               key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None,
                               **keywords) -> Tensor:
    """Family `kind` over a sequence split across `cp`'s ranks (`danon.context_parallel`): q [B, H, n, D], k, v
    [B, Hkv, n, D] and key_padding_mask [B, n] hold this rank's tokens (`cp.shard`); returns this rank's rows
    of the output, equal to the same rows of the single-process call.

    Example (a group of one rank; see `danon.context_parallel` for several):
        >>> import torch, torch.distributed as dist, danon
        >>> from danon.parallel import one_rank_group
        >>> q = torch.randn(1, 2, 128, 8, dtype=torch.float64)
        >>> with one_rank_group():
        ...     cp = danon.context_parallel(128, block_size=16)
        ...     out = context_parallel_attention(cp, q, q, q, "msra", causal=True, block_size=16, window=16)
        >>> one = danon.attention(q, q, q, kind="msra", causal=True, block_size=16, window=16)
        >>> bool((out - one).abs().max() < 1e-12)
        True
    """
    params, inputs = split_keywords(family(kind), keywords)
    causal = checks.check_bool("causal", causal)
    layout, b = cp.layout, params.block_size
    n_local = layout.local_len(cp.rank)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if isinstance(x, Tensor) and x.dim() == 4 and x.shape[2] != n_local:
            raise ValueError(f"{name} must be this rank's {n_local} tokens of the sequence, [B, heads, {n_local}, D] "
                             f"(cp.shard(x, dim=2)), got {list(x.shape)}")
    checks.check_qkv(q, k, v, sparse=params.sparse, causal=causal)
    if params.sparse and layout.block_size % b:   # the exact family reads keys by position, not by block
        raise ValueError(f"block_size={b} must divide the layout's block_size={layout.block_size} "
                         f"(danon.context_parallel(..., block_size=...)): pieces are cut on whole blocks")
    if key_padding_mask is not None and (not isinstance(key_padding_mask, Tensor) or
                                         tuple(key_padding_mask.shape) != (q.shape[0], n_local)):
        raise ValueError(f"key_padding_mask must be [B, {n_local}] (this rank's tokens), got "
                         f"{getattr(key_padding_mask, 'shape', type(key_padding_mask).__name__)}")
    kpm = checks.check_key_padding_mask(key_padding_mask, q, k)
    if inputs.get("past_queries") is not None:
        raise ValueError("past_queries (queries after a cache) has no meaning under context parallelism: every rank "
                         "holds part of one self-attention sequence")
    inputs = params.check_inputs(q, k, **inputs)            # DALA's importance [B, Hkv, n] and slopes, checked
    # which collectives run depends on the mask: a rank without padding takes an all-True one when another has
    if cp.exchange.any_rank(kpm is not None, q.device) and kpm is None:
        kpm = torch.ones(q.shape[0], n_local, dtype=torch.bool, device=q.device)
    kpm = None if kpm is None else kpm.bool()
    if not params.sparse:
        return _exact(cp, q, k, v, kpm, params, causal, checks.check_scale(scale, q.shape[-1]))
    return _sparse(cp, kind, params, inputs, q, k, v, kpm, causal, scale)


def _sparse(cp, kind, params, inputs, q, k, v, kpm, causal, scale) -> Tensor:
    layout, ex, b = cp.layout, cp.exchange, params.block_size
    B, Hkv, N, D = k.shape[0], k.shape[1], layout.seq_len, k.shape[-1]
    acc = summary_dtype(k)
    segments = layout.segments(cp.rank)

    # 1. every rank's block statistics, in sequence order: the summaries and the selections read them
    blocks = _Gathered(layout, b, q.device)
    counts, pos_sums, k_sums, v_sums = _segment_stats(k, v, kpm, segments, b, acc)
    sums = blocks(ex, torch.cat([k_sums, v_sums], -1), 2, "block sums")
    k_sums, v_sums = sums[..., :D], sums[..., D:]
    small = blocks(ex, torch.stack([counts.to(acc), pos_sums], -1), 1, "block counts")
    counts, pos_sums = small[..., 0], small[..., 1]
    scores = previous = None
    if kind == "dala" and params.memory_size > 0:
        importance = inputs.get("importance")
        importance = k.to(acc).norm(dim=-1) if importance is None else importance
        scores = importance.detach().to(acc)
        if kpm is not None:
            scores = scores.masked_fill(~kpm[:, None, :], float("-inf"))
        scores = _Gathered(layout, 1, q.device)(ex, scores, 2, "routing scores")
    if kind == "ucsa" and causal:
        previous = _previous_query_rows(cp, q, b)
    stats = (counts, pos_sums, k_sums, v_sums, scores, previous)
    plans = _plans(cp, kind, params, q, k, kpm, causal, scale, inputs, stats)

    # 2. the keys beyond this rank's own: the halo of each piece and every listed block or routed token
    window = plans[0].window
    wanted = []
    heads = torch.arange(B * Hkv, device=q.device)
    for (s, e), plan in zip(segments, plans):
        lo, hi = _halo(layout, s, e, window, b, causal)
        near = torch.cat([torch.arange(lo, s, device=q.device), torch.arange(e, hi, device=q.device)])
        wanted.append((heads[:, None] * N + near[None, :]).flatten())
        listed = _listed_tokens(plan, N)
        if listed is not None:
            ok = listed >= 0
            ids = heads.view(B, Hkv, 1, 1) * N + listed.clamp(min=0)
            wanted.append(ids[ok.expand_as(ids)])
    want = torch.unique(torch.cat(wanted)) if wanted else torch.zeros(0, dtype=torch.long, device=q.device)
    table = [k, v] + ([] if kpm is None else [kpm[:, None, :, None].to(k.dtype).expand(B, Hkv, -1, 1)])
    table = torch.cat(table, -1).reshape(B * Hkv * k.shape[2], -1)

    def serve(ids: Tensor) -> Tensor:
        return table[(ids // N) * k.shape[2] + layout.owners(ids % N)[1]]

    owner = layout.owners(want % N)[0]
    rows = _Rows(want, ex.fetch(want, owner, serve, "keys and values"), N, B * Hkv)

    if kind == "dala" and params.compress_rest:   # the rest summary subtracts the routed tokens' keys and values
        def without_routed(k_rest: Tensor, v_rest: Tensor, idx: Tensor, valid: Tensor) -> tuple:
            got = rows.rows[rows.index(heads.view(B, Hkv, 1, 1), idx)].to(acc) * valid[..., None].to(acc)
            got = got.sum(-2)
            return k_rest - got[..., :D], v_rest - got[..., D:D + v.shape[-1]]
        plans = _plans(cp, kind, params, q, k, kpm, causal, scale, inputs, stats, without_routed, plans)

    # 3. one op call per piece: its queries, its halo and own keys, summaries plus fetched tokens as summaries
    outs, local = [], 0
    for (s, e), plan in zip(segments, plans):
        outs.append(_run_piece(q, k, v, kpm, plan, rows, s, e, local, layout, causal, scale, heads))
        local += e - s
    return torch.cat(outs, 2)


def _run_piece(q, k, v, kpm, plan, rows: _Rows, s, e, local, layout, causal, scale, heads) -> Tensor:
    B, Hkv, D, Dv = k.shape[0], k.shape[1], k.shape[-1], v.shape[-1]
    b, n = plan.block_size, e - s
    lo, hi = _halo(layout, s, e, plan.window, b, causal)

    def split(x):   # fetched rows [B*Hkv, L, W] -> k, v, visible
        x = x.view(B, Hkv, x.shape[1], x.shape[-1])
        return x[..., :D], x[..., D:D + Dv], None if kpm is None else x[:, 0, :, -1] > 0.5

    before, after = split(rows.range(B * Hkv, lo, s)), split(rows.range(B * Hkv, e, hi))
    keys = torch.cat([before[0].to(k.dtype), k[:, :, local:local + n], after[0].to(k.dtype)], 2)
    values = torch.cat([before[1].to(v.dtype), v[:, :, local:local + n], after[1].to(v.dtype)], 2)
    key_mask = None if kpm is None else torch.cat([before[2], kpm[:, local:local + n], after[2]], 1)
    queries = q[:, :, local:local + n]
    if hi > e:   # rows after the queries so that query row i sits at key position s - lo + i (dropped after)
        queries = torch.cat([queries, queries.new_zeros(*queries.shape[:2], hi - e, D)], 2)
    tq_call = query_layout(queries.shape[2], keys.shape[2], b)[2]

    # the summary table: the plan's own summaries, then every fetched row as a summary of one token
    table_k, table_v = rows.table[..., :D], rows.table[..., D:D + Dv]
    num_own = 0 if plan.summary_k is None else plan.summary_k.shape[2]
    idx = [] if plan.summary_idx is None else [plan.summary_idx.expand(B, Hkv, -1, -1).long()]
    listed = _listed_tokens(plan, layout.seq_len)
    if listed is not None:
        found = rows.index(heads.view(B, Hkv, 1, 1), listed.clamp(min=0))
        ok = listed >= 0
        if kpm is not None:   # a listed block's padding is no key
            ok = ok & (rows.rows[found, -1] > 0.5)
        idx.append(torch.where(ok, rows.slot[found] + num_own, -1))
    shift = float(lo)   # positions in the call's frame: key position 0 is sequence position lo
    if idx:
        summary_idx = torch.cat(idx, -1)
        summary_idx = torch.cat([summary_idx, summary_idx.new_full((*summary_idx.shape[:2], tq_call -
                                                                     summary_idx.shape[2], summary_idx.shape[3]), -1)], 2)
        dt = plan.summary_k.dtype if plan.summary_k is not None else summary_dtype(k)
        fetched_k = table_k.reshape(B, Hkv, -1, D).to(dt)
        fetched_v = table_v.reshape(B, Hkv, -1, Dv).to(dt)
        fetched_pos = rows.positions.view(B, Hkv, -1).to(dt) - shift
        if plan.summary_k is not None:
            summary_k = torch.cat([plan.summary_k.expand(B, Hkv, -1, -1).to(dt), fetched_k], 2)
            summary_v = torch.cat([plan.summary_v.expand(B, Hkv, -1, -1).to(dt), fetched_v], 2)
            count = torch.cat([plan.summary_count.expand(B, Hkv, -1).to(dt), torch.ones_like(fetched_pos)], 2)
            pos = None if plan.summary_pos is None else torch.cat(
                [plan.summary_pos.expand(B, Hkv, -1).to(dt) - shift, fetched_pos], 2)
        else:
            summary_k, summary_v, count, pos = fetched_k, fetched_v, torch.ones_like(fetched_pos), fetched_pos
        if plan.slopes is None:
            pos = None
        summary_idx = summary_idx.to(torch.int32)
    else:
        summary_idx = summary_k = summary_v = count = pos = None
    call = Plan(plan.kind, b, causal, queries.shape[2], keys.shape[2], window=plan.window, summary_idx=summary_idx,
                summary_k=summary_k, summary_v=summary_v, summary_count=count, summary_pos=pos, slopes=plan.slopes)
    with own_call():
        out = run_plan(queries, keys, values, call, scale=checks.check_scale(scale, D), key_padding_mask=key_mask)
    return out[:, :, :n]
