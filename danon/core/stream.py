"""Plan state kept between the calls of one growing sequence: decode steps that read O(window + listed + N / b)
keys, not N (DESIGN.md section 3, "Queries after a cache").

A causal call whose queries all sit in one block t_q (a decode step, or a few speculative tokens) sees, in
every family, the near blocks t_q - W .. t_q exactly and, before them, things that only change when a block
fills: block sums and counts (MSRA's per level), UCSA's block means and the mean query of the block before
t_q, DALA's running top-m routed tokens and the sum of every other candidate. `PlanState` keeps those, updated
as blocks fill, and runs such a call as the op on the near keys alone plus a short summary table:

- summaries are rows of that table with their count n_s (log n_s in the logit, as in the full plan);
- keys the full plan lists exactly but that lie before the near blocks (UCSA's global and selected blocks,
  DALA's routed tokens) are rows with count 1 (log 1 = 0: the same logit) and, for ALiBi, their own position;
- positions are measured from the first near block, which the call's keys start at.

So the call computes the function of `danon.core.run.attention` on the same arguments (the same keys in
every softmax; only the order of floating-point sums differs). Every other call (a prefill, a chunk across
blocks, non-causal) runs the full path, which the state also observes (UCSA's queries). The state follows
one sequence that only grows: a shorter one resets it.

Example:
    >>> import torch
    >>> from danon.core.run import attention
    >>> q, k, v = (torch.randn(1, h, 300, 16, dtype=torch.float64) for h in (4, 2, 2))
    >>> state = PlanState("msra", block_size=16, window=32, num_levels=2)
    >>> prefill = state.attention(q[:, :, :200], k[:, :, :200], v[:, :, :200])
    >>> steps = [state.attention(q[:, :, i:i + 1], k[:, :, :i + 1], v[:, :, :i + 1]) for i in range(200, 300)]
    >>> full = attention("msra", q, k, v, causal=True, block_size=16, window=32, num_levels=2)
    >>> bool((torch.cat([prefill] + steps, 2) - full).abs().max() < 1e-12), state.local_calls
    (True, 100)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import checks
from .attention_op import run_plan
from .blocks import block_counts, block_sums, key_visibility, means, num_blocks, summary_dtype, window_blocks
from .dala import alibi_slopes
from .families import family
from .msra import auto_levels
from .plan import Plan
from .run import attention as family_attention
from .ucsa import (causal_selection_counts, causal_selection_queries, estimated_mass, list_capacity,
                   mass_selection)

__all__ = ["PlanState", "Rows", "state_for"]


def _rows(x: Tensor, idx: Tensor) -> Tensor:
    """x [B, Hkv, N, D], idx [B, Hkv, M] -> [B, Hkv, M, D]: reads M rows, never copies x (a cache's buffer view)."""
    B, Hkv = idx.shape[:2]
    return x[torch.arange(B, device=x.device)[:, None, None], torch.arange(Hkv, device=x.device)[None, :, None], idx]


class Rows:
    """A tensor that grows along dim `dim` by appending, in amortised O(appended) time: its capacity grows by an
    eighth (or by what is appended), so a cache of N rows is not copied whole per step (as torch.cat of the cache
    with one row would be) and holds at most N / 8 unused rows.

    Example:
        >>> rows = Rows(dim=1)
        >>> rows.append(torch.ones(2, 3)); rows.append(torch.zeros(2, 1))
        >>> rows.view().tolist(), rows.length
        ([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]], 4)
    """

    def __init__(self, dim: int):
        self.dim, self.length, self.data = dim, 0, None

    def append(self, x: Tensor) -> None:
        n = x.shape[self.dim]
        if self.data is None or self.data.shape[self.dim] < self.length + n:
            shape = list(x.shape)
            shape[self.dim] = self.length + max(n, self.length // 8, 16)   # at most 1/8 unused; O(1) amortised
            grown = x.new_empty(shape)
            if self.data is not None:
                grown.narrow(self.dim, 0, self.length).copy_(self.view())
            self.data = grown
        self.data.narrow(self.dim, self.length, n).copy_(x)
        self.length += n

    def view(self) -> Optional[Tensor]:
        """The rows so far (a view of the buffer), or None before the first append."""
        return None if self.data is None else self.data.narrow(self.dim, 0, self.length)

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def select_batch(self, index: Tensor) -> None:
        """Keep batch rows `index` (dim 0), in that order: beam search's reorder."""
        if self.data is not None:
            self.data = self.data.index_select(0, index.to(self.data.device))

    def nbytes(self) -> int:
        """Bytes held (the buffer's capacity)."""
        return 0 if self.data is None else self.data.numel() * self.data.element_size()


class _Level:
    """Sums and counts of the complete spans of one level: k, v [B, Hkv, S, D] (fp32 / fp64), counts [B, S]."""

    def __init__(self):
        self.k, self.v, self.counts = Rows(2), Rows(2), Rows(1)

    @property
    def length(self) -> int:
        return self.counts.length

    def rows(self):
        return self.k, self.v, self.counts

    def means(self, lo: int, hi: int) -> tuple:
        """(mean keys, mean values, counts) of spans lo .. hi - 1."""
        counts = self.counts.view()[:, lo:hi]
        return (means(self.k.view()[:, :, lo:hi], counts[:, None]), means(self.v.view()[:, :, lo:hi], counts[:, None]),
                counts)


class PlanState:
    """A family's plan state for one causal sequence that grows call by call (a KV cache's layer).

    `attention(q, k, v, key_padding_mask=..., scale=...)` takes the call's queries and every key and value so
    far (k, v [B, Hkv, Nk, D], the queries the last Nq positions) and returns what `danon.core.run.attention`
    (causal) returns; calls whose queries sit in one block read the near keys and the state only. Calls that
    autograd tracks (training through a cache) run the full path, so gradients reach every key they depend on.

    Example:
        >>> import torch
        >>> q, k = torch.randn(1, 2, 80, 8), torch.randn(1, 1, 80, 8)
        >>> state = PlanState("ucsa", block_size=16, local_window_size=16, global_tokens=16, top_k_blocks=1)
        >>> _ = state.attention(q[:, :, :79], k[:, :, :79], k[:, :, :79])      # prefill: the full path
        >>> state.attention(q[:, :, 79:], k, k).shape, state.local_calls       # decode: near keys and state
        (torch.Size([1, 2, 1, 8]), 1)
    """

    def __init__(self, kind: str, **params):
        self.spec = family(kind)(**params)
        if not self.spec.sparse:
            raise ValueError(f"PlanState keeps the state of a sparse family (msra, dala, ucsa), not kind={kind!r}")
        self.kind = kind
        self.b = self.spec.block_size
        self.w = window_blocks(getattr(self.spec, self.spec.window_option), self.b)
        self.local_calls = 0          # calls run from the state (tests and reports read it)
        self.reset()

    def reset(self) -> None:
        """Forget the sequence (a new one starts with the next call)."""
        self.length = 0               # Nk of the last call
        self.batch = None             # its batch size
        self.levels = [_Level()]      # level 0: blocks; MSRA adds coarser levels
        self.positions = Rows(1)      # [B, blocks] sum of the visible positions of each block (DALA)
        self.q_history = None         # [B, H, <= 2b, D] the last query rows (UCSA's selection reads them)
        self.q_end = 0                # absolute position after the last observed query row
        self.candidates = 0           # DALA: blocks folded into the running candidate sums and routed lists
        self.routed = None            # DALA: (importance [B, Hkv, m], token ids [B, Hkv, m])
        self.totals = None            # DALA: fp64 sums (k [B, Hkv, D], v, count [B], position [B]) of candidates

    # --- bookkeeping ---------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of the state (buffers at their capacity): what a cache keeps beyond its keys and values."""
        tensors = [*(self.routed or ()), *(self.totals or ())]
        if self.q_history is not None:
            tensors.append(self.q_history)
        held = sum(x.numel() * x.element_size() for x in tensors)
        return held + self.positions.nbytes() + sum(r.nbytes() for level in self.levels for r in level.rows())

    def select_batch(self, index: Tensor) -> None:
        """Keep batch rows `index`, in that order (beam search's reorder of the cache it belongs to)."""
        for level in self.levels:
            for rows in level.rows():
                rows.select_batch(index)
        self.positions.select_batch(index)
        pick = (lambda x: x.index_select(0, index.to(x.device)))
        self.q_history = None if self.q_history is None else pick(self.q_history)
        self.routed = None if self.routed is None else tuple(map(pick, self.routed))
        self.totals = None if self.totals is None else tuple(map(pick, self.totals))
        self.batch = None if self.batch is None else len(index)

    # --- the call ------------------------------------------------------------------------------------
    # the state is Python bookkeeping whose sizes change every call: under torch.compile it runs eagerly (a graph
    # break) rather than being traced, and guarded, once per length
    @torch.compiler.disable
    def attention(self, q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Optional[Tensor] = None,
                  scale: Optional[float] = None, **inputs) -> Tensor:
        """The family's causal attention of q [B, H, Nq, D] (positions Nk - Nq ..) on k, v [B, Hkv, Nk, D].

        inputs: the family's per-call tensors (DALA's importance [B, Hkv, Nk] and slopes [H]); UCSA's
        past_queries come from the state.
        """
        checks.check_qkv(q, k, v, sparse=True, causal=True)
        key_padding_mask = checks.check_key_padding_mask(key_padding_mask, q, k)
        # UCSA's past_queries come from the state, and its scale is this call's
        inputs = {name: x for name, x in self.spec.check_inputs(q, k, **inputs).items()
                  if name not in ("past_queries", "scale")}
        nq, nk = q.shape[2], k.shape[2]
        self._follow(q, nk)
        b = self.b
        # autograd through the state would reach keys of earlier calls the state folded in: train on the full path
        tensors = (q, k, v, *(x for x in inputs.values() if isinstance(x, Tensor)))
        tracked = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
        if not tracked and 0 < nq <= nk and (nk - nq) // b == (nk - 1) // b:
            out = self._local(q, k, v, key_padding_mask, checks.check_scale(scale, q.shape[-1]), inputs)
            self.local_calls += 1
        else:
            if self.kind == "ucsa" and nq < nk:
                inputs = dict(inputs, past_queries=self.q_history)
            out = family_attention(self.kind, q, k, v, causal=True, key_padding_mask=key_padding_mask, scale=scale,
                                   **self.spec.keywords(), **inputs)
        self.observe(q, nk)
        return out

    def observe(self, q: Tensor, nk: int) -> None:
        """Record a causal call of q (the last Nq of nk positions) that ran elsewhere (say, exact attention
        below a length threshold): UCSA's selection reads the queries of the block before each call's."""
        self._follow(q, nk)
        self.length, self.batch = nk, q.shape[0]
        if self.kind != "ucsa":
            return
        rows = q.detach() if self.q_history is None else torch.cat([self.q_history, q.detach()], 2)
        self.q_history, self.q_end = rows[:, :, -2 * self.b:], nk

    def _follow(self, q: Tensor, nk: int) -> None:
        """Start over for a shorter sequence or another batch (not the one the state follows); forget UCSA's
        queries when the rows just before this call's were not all seen."""
        if nk < self.length or self.batch not in (None, q.shape[0]):
            self.reset()
        if self.q_end != nk - q.shape[2]:
            self.q_history = None

    def _catch_up(self, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], blocks: int) -> None:
        """Level-0 sums of blocks up to `blocks` (each complete): O(new keys), the full plan's own arithmetic."""
        level, b = self.levels[0], self.b
        if blocks <= level.length and level.k.data is not None:   # (the first call appends even no block: shapes)
            return
        lo, hi = level.length * b, blocks * b
        kpm = None if key_padding_mask is None else key_padding_mask[:, lo:hi]
        visible = key_visibility(kpm, k.shape[0], hi - lo, b, k.device)
        level.k.append(block_sums(k[:, :, lo:hi], visible, b, kpm is not None))
        level.v.append(block_sums(v[:, :, lo:hi], visible, b, kpm is not None))
        level.counts.append(block_counts(visible, b))
        acc = summary_dtype(k)
        pos = torch.arange(lo, hi, device=k.device, dtype=acc)
        self.positions.append((visible.to(acc) * pos).view(k.shape[0], -1, b).sum(-1))

    def _local(self, q, k, v, kpm, scale, inputs) -> Tensor:
        b, w = self.b, self.w
        nk = k.shape[2]
        t_q = (nk - 1) // b
        first = max(0, t_q - w)                       # the first near block: every earlier block is complete
        # UCSA's gamma estimate reads every complete block before t_q, the near ones too
        mass = self.kind == "ucsa" and self.spec.gamma is not None
        self._catch_up(k, v, kpm, t_q if mass else first)
        start = first * b
        table = getattr(self, f"_{self.kind}_table")(q, k, v, kpm, t_q, first, dict(inputs, scale=scale))
        k_near, v_near = k[:, :, start:], v[:, :, start:]
        kpm_near = None if kpm is None else kpm[:, start:]
        plan = Plan(self.kind, b, True, q.shape[2], nk - start, window=w, **table)
        if plan.summary_pos is not None:
            plan.summary_pos = plan.summary_pos - start   # positions measured from the near keys' start
        return run_plan(q, k_near, v_near, plan, scale=scale, key_padding_mask=kpm_near)

    # --- per family: the summary table of a call in one query block ----------------------------------------
    @staticmethod
    def _table(keys: list, values: list, counts: list, valid: list, positions: Optional[list] = None) -> dict:
        """The plan fields of a summary table from its parts ([B, Hkv, S_i, D], counts [B, Hkv, S_i], valid
        [B, Hkv, S_i] bool): the call's one query block lists every valid row."""
        if not keys or sum(x.shape[2] for x in keys) == 0:
            return {}
        valid = torch.cat(valid, 2)
        rows = torch.arange(valid.shape[2], device=valid.device)
        return dict(summary_k=torch.cat(keys, 2), summary_v=torch.cat(values, 2), summary_count=torch.cat(counts, 2),
                    summary_idx=torch.where(valid, rows, -1).to(torch.int32)[:, :, None],
                    summary_pos=None if positions is None else torch.cat(positions, 2))

    def _msra_table(self, q, k, v, kpm, t_q, first, inputs) -> dict:
        c, w, Hkv = self.spec.compression_factor, self.w, k.shape[1]
        levels = self.spec.num_levels
        levels = auto_levels(num_blocks(k.shape[2], self.b), w, c) if levels == "auto" else int(levels)
        self._coarsen(levels)
        keys, values, counts, valid = [], [], [], []
        for l in range(levels + 1):
            u_q = t_q // c ** l
            # not near at l and strictly past (u < u_q - W); below the top level, the parent is near at l + 1
            lo = 0 if l == levels else max(0, (t_q // c ** (l + 1) - w) * c)
            hi = max(lo, u_q - w)
            kbar, vbar, n = self.levels[l].means(lo, hi)
            n = n[:, None].expand(-1, Hkv, -1)
            keys.append(kbar), values.append(vbar), counts.append(n.to(kbar.dtype)), valid.append(n > 0)
        return self._table(keys, values, counts, valid)

    def _coarsen(self, levels: int) -> None:
        """Sums of the complete spans of levels 1 .. `levels` (level l + 1: c children of level l, summed as the
        full plan's _coarsen sums them)."""
        c = self.spec.compression_factor
        while len(self.levels) <= levels:
            self.levels.append(_Level())
        for l in range(1, levels + 1):
            child, parent = self.levels[l - 1], self.levels[l]
            new = max(0, child.length // c - parent.length)
            if new == 0 and parent.k.data is not None:
                continue
            lo, hi = parent.length * c, (parent.length + new) * c
            for mine, theirs in zip(parent.rows()[:2], child.rows()[:2]):
                x = theirs.view()[:, :, lo:hi]
                mine.append(x.reshape(*x.shape[:2], new, c, x.shape[-1]).sum(3))
            n = child.counts.view()[:, lo:hi]
            parent.counts.append(n.reshape(n.shape[0], new, c).sum(2))

    def _ucsa_table(self, q, k, v, kpm, t_q, first, inputs) -> dict:
        spec, b, level = self.spec, self.b, self.levels[0]
        B, Hkv = k.shape[:2]
        g, top_k, selects, _ = list_capacity(num_blocks(k.shape[2], b), b, spec.global_tokens, spec.top_k_blocks,
                                             spec.sparsity_factor)
        kbar, vbar, counts = level.means(0, first)                           # blocks before the near ones
        has_keys = (counts > 0)[:, None].expand(B, Hkv, first)
        g = min(g, first)                                                    # global blocks at or past `first` are near
        blocks = torch.arange(g, device=k.device).expand(B, Hkv, g)
        listed = has_keys[:, :, :g]
        eligible = has_keys.clone()
        eligible[:, :, :g] = False
        if selects and first > g and top_k > 0:
            gamma = spec.gamma
            qbar = causal_selection_queries(q, self.q_history, k.shape[2], b, Hkv, gamma is not None)  # [B, H.., 1, D]
            if gamma is None:
                score = (qbar @ kbar.transpose(-1, -2))[:, :, 0].masked_fill(~eligible, float("-inf"))
                top_val, top_idx = torch.topk(score, min(top_k, first), dim=-1)
                take = top_val > float("-inf")
            else:   # the full plan's estimate: every complete block before t_q, near ones included
                past_k, _, past_counts = level.means(0, t_q)
                mass = estimated_mass(qbar, past_k, past_counts, torch.ones(1, t_q, dtype=torch.bool,
                                                                             device=k.device), inputs["scale"])[:, :, 0]
                near_or_global = torch.arange(t_q, device=k.device) >= first
                near_or_global[:g] = True
                covered = (mass * near_or_global).sum(-1, keepdim=True)
                top_idx, take = mass_selection(mass[..., :first], covered, eligible, min(top_k, first), gamma)
            if spec.sparsity_factor is not None:
                allowed = causal_selection_counts(1, spec.sparsity_factor, k.device, t_q)[0]
                take = take & (torch.arange(top_idx.shape[-1], device=k.device) < allowed)
            blocks, listed = torch.cat([blocks, top_idx], -1), torch.cat([listed, take], -1)
        # scatter_add: an untaken top-k slot may name a global block, and must not unlist it
        chosen = torch.zeros(has_keys.shape, dtype=torch.int32, device=k.device).scatter_add(
            -1, blocks, listed.to(torch.int32)) > 0
        # the listed blocks' tokens: rows of count 1 (exact keys; padding left out)
        tokens = (blocks[..., None] * b + torch.arange(b, device=k.device)).flatten(2)      # [B, Hkv, L * b]
        token_ok = listed[..., None].expand(*listed.shape, b).flatten(2)
        if kpm is not None and tokens.shape[-1]:
            token_ok = token_ok & torch.gather(kpm[:, None].expand(B, Hkv, -1), 2, tokens)
        acc = kbar.dtype
        keys, values = [_rows(k, tokens).to(acc)], [_rows(v, tokens).to(acc)]
        counts_, valid = [token_ok.to(acc)], [token_ok]
        if spec.compress:
            rest = has_keys & ~chosen
            keys.append(kbar), values.append(vbar)
            counts_.append(counts[:, None].expand(B, Hkv, first).to(acc)), valid.append(rest)
        return self._table(keys, values, counts_, valid)

    def _dala_table(self, q, k, v, kpm, t_q, first, inputs) -> dict:
        spec = self.spec
        B, H = q.shape[:2]
        Hkv = k.shape[1]
        acc = summary_dtype(k)
        m = spec.memory_size      # the running list's width; slots without a candidate stay -inf
        self._fold_candidates(k, kpm, first, m, inputs.get("importance"))
        keys, values, counts, valid, positions = [], [], [], [], []
        routed_k = routed_v = None
        if m > 0:
            score, ids = self.routed
            ok = score > float("-inf")
            routed_k = _rows(k, ids.clamp(min=0)).to(acc) * ok[..., None]
            routed_v = _rows(v, ids.clamp(min=0)).to(acc) * ok[..., None]
            keys.append(routed_k), values.append(routed_v), counts.append(ok.to(acc)), valid.append(ok)
            positions.append(ids.clamp(min=0).to(acc))
        if spec.compress_rest:
            k_tot, v_tot, n_tot, pos_tot = self.totals
            k_rest, v_rest = k_tot.to(acc), v_tot.to(acc)
            n_rest, pos_rest = n_tot.to(acc)[:, None].expand(B, Hkv), pos_tot.to(acc)[:, None].expand(B, Hkv)
            if routed_k is not None:
                k_rest, v_rest = k_rest - routed_k.sum(2), v_rest - routed_v.sum(2)
                n_rest = n_rest - ok.sum(-1).to(acc)
                pos_rest = pos_rest - (ids.clamp(min=0).to(acc) * ok).sum(-1)
            denom = n_rest.clamp(min=1)
            keys.append((k_rest / denom[..., None])[:, :, None]), values.append((v_rest / denom[..., None])[:, :, None])
            counts.append(n_rest[..., None]), valid.append((n_rest > 0.5)[..., None])
            positions.append((pos_rest / denom)[..., None])
        table = self._table(keys, values, counts, valid, positions)
        if spec.decay == "alibi":
            slopes = inputs.get("slopes")
            table["slopes"] = alibi_slopes(H, q.device) if slopes is None else slopes
        return table

    def _fold_candidates(self, k: Tensor, kpm: Optional[Tensor], first: int, m: int,
                         importance: Optional[Tensor]) -> None:
        """DALA's candidates of query block t_q are the blocks before `first`: fold blocks
        self.candidates .. first - 1 into the running sums (fp64, as the full plan's prefix sums) and merge
        their tokens into the running top-m by importance (default ||k_j||)."""
        B, Hkv = k.shape[:2]
        acc = summary_dtype(k)
        if self.totals is None:
            zeros = k.new_zeros(B, Hkv, k.shape[-1], dtype=torch.float64)
            counts = k.new_zeros(B, dtype=torch.float64)
            self.totals = (zeros, zeros.clone(), counts, counts.clone())
            self.routed = (k.new_full((B, Hkv, m), float("-inf"), dtype=acc),
                           torch.full((B, Hkv, m), -1, dtype=torch.int64, device=k.device))
        if first <= self.candidates:
            return
        lo, hi = self.candidates, first
        level = self.levels[0]
        k_tot, v_tot, n_tot, pos_tot = self.totals
        self.totals = (k_tot + level.k.view()[:, :, lo:hi].to(torch.float64).sum(2),
                       v_tot + level.v.view()[:, :, lo:hi].to(torch.float64).sum(2),
                       n_tot + level.counts.view()[:, lo:hi].to(torch.float64).sum(1),
                       pos_tot + self.positions.view()[:, lo:hi].to(torch.float64).sum(1))
        if m > 0:
            t0, t1 = lo * self.b, hi * self.b
            new = (k[:, :, t0:t1].to(acc).norm(dim=-1) if importance is None
                   else importance[:, :, t0:t1].detach().to(acc))
            if kpm is not None:
                new = new.masked_fill(~kpm[:, None, t0:t1], float("-inf"))
            ids = torch.arange(t0, t1, device=k.device).expand(B, Hkv, t1 - t0)
            score, old_ids = self.routed
            top, pos = torch.topk(torch.cat([score, new], -1), m, dim=-1)
            self.routed = (top, torch.gather(torch.cat([old_ids, ids], -1), -1, pos))
        self.candidates = first


def state_for(states: dict, kind: str, params: dict) -> PlanState:
    """The PlanState of family `kind` with `params` in `states` (a cache layer's), made on first use.

    Example:
        >>> states = {}
        >>> state_for(states, "msra", {"window": 32}) is state_for(states, "msra", {"window": 32}), len(states)
        (True, 1)
    """
    key = (kind, tuple(sorted(params.items())))
    if key not in states:
        states[key] = PlanState(kind, **params)
    return states[key]
