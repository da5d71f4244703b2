"""The attention plan: which keys each query block sees exactly and through summaries.

A plan is the one data structure every executor consumes (CPU, Triton, ONNX): per
(batch, kv head, query block) it lists exact key blocks, exact extra tokens and summary
indices, each an int32 tensor padded with -1 (DESIGN.md section 3).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor


def is_dense_plan(block_idx: Optional[Tensor], token_idx: Optional[Tensor], summary_idx: Optional[Tensor],
                  window: int) -> bool:
    """True for the exact family's dense plan, in the op's argument form (window -1: none): no lists and no
    window, so every visible key is seen. The one definition; executors, lowerings and Plan.is_dense use it.

    Example:
        >>> is_dense_plan(None, None, None, -1), is_dense_plan(None, None, None, 2)
        (True, False)
    """
    return block_idx is None and token_idx is None and summary_idx is None and window < 0


@dataclasses.dataclass
class Plan:
    """Which keys each query block attends to, for one attention call.

    Attributes:
        kind: the family that built it ("exact", "ucsa", "msra", "dala").
        block_size: b, the block length in tokens.
        causal: whether the causal mask applies token by token inside exact blocks.
        seq_len_q, seq_len_k: Nq and Nk.
        window: W in blocks, or None. The near blocks (|t - t_q| <= W; causal t_q - W <= t <= t_q)
            are exact for every query block, without being listed (executors read them as one
            contiguous range).
        band: a sliding window of w tokens on the exact keys (query i sees key j only if |i - j| < w,
            and j <= i with causal masking), or None. The exact family's banded plan sets it.
        block_idx: int32 [B, Hkv, Tq, Kb] further exact key blocks (never near ones), -1 padded.
            With window, block_idx, token_idx and summary_idx all None the plan is dense (exact).
        token_idx: int32 [B, Hkv, Tq, Kt] exact extra tokens (DALA's routed tokens), or None.
        summary_idx: int32 [B, Hkv, Tq, Ks] rows of the summary table, or None.
        summary_k, summary_v: [B, Hkv, S, D] summary keys and values (means of their span;
            differentiable with respect to k and v).
        summary_count: [B, Hkv, S] float, n_s (the number of visible tokens each summary holds).
        summary_pos: [B, Hkv, S] float, mean position of a summary's tokens (used by ALiBi), or None.
        slopes: [H] per query head ALiBi slopes (bias -slope_h * |i - j|), or None.
        key_block_counts: [B, Tk] visible keys per key block (padding excluded), for coverage stats.

    Example:
        >>> import torch, danon
        >>> q = torch.randn(1, 2, 256, 16); k = torch.randn(1, 2, 256, 16)
        >>> plan = danon.attention_plan(q, k, kind="msra", block_size=16, window=32, num_levels=2)
        >>> plan.window, plan.summary_idx.shape[:3]
        (2, torch.Size([1, 2, 16]))
    """

    kind: str
    block_size: int
    causal: bool
    seq_len_q: int
    seq_len_k: int
    window: Optional[int] = None
    band: Optional[int] = None
    block_idx: Optional[Tensor] = None
    token_idx: Optional[Tensor] = None
    summary_idx: Optional[Tensor] = None
    summary_k: Optional[Tensor] = None
    summary_v: Optional[Tensor] = None
    summary_count: Optional[Tensor] = None
    summary_pos: Optional[Tensor] = None
    slopes: Optional[Tensor] = None
    key_block_counts: Optional[Tensor] = None

    @property
    def is_dense(self) -> bool:
        """True for the exact plan that sees every key (no lists to gather)."""
        return is_dense_plan(self.block_idx, self.token_idx, self.summary_idx, -1 if self.window is None else self.window)

    @property
    def num_query_blocks(self) -> int:
        """Rows of the plan's lists: the query blocks the call's rows fall in (blocks.query_layout)."""
        from .blocks import query_layout
        return query_layout(self.seq_len_q, self.seq_len_k, self.block_size)[2]

    @property
    def first_query_block(self) -> int:
        """The absolute block of the plan's first query block: 0 for self-attention, later for queries after a
        cache (row i of the call is position seq_len_k - seq_len_q + i)."""
        from .blocks import query_layout
        return query_layout(self.seq_len_q, self.seq_len_k, self.block_size)[1]

    @property
    def num_key_blocks(self) -> int:
        return -(-self.seq_len_k // self.block_size)

    def counts(self) -> dict:
        """Number of valid entries per query block: {"blocks", "tokens", "summaries"} int tensors."""
        out = {}
        for name, idx in (("blocks", self.block_idx), ("tokens", self.token_idx), ("summaries", self.summary_idx)):
            out[name] = None if idx is None else (idx >= 0).sum(-1)
        return out

    def keys_per_query(self) -> float:
        """Keys each query row is computed against, on average (list capacity: exact block tokens + tokens +
        summaries; the causal dense plan's triangle is half of Nk). See `keys_per_query`."""
        def width(idx):
            return None if idx is None else idx.shape[-1]
        return keys_per_query(self.seq_len_k, causal=self.causal, block_size=self.block_size,
                              window=-1 if self.window is None else self.window,
                              band=-1 if self.band is None else self.band, blocks=width(self.block_idx),
                              tokens=width(self.token_idx), summaries=width(self.summary_idx))


def keys_per_query(nk: int, *, causal: bool, block_size: int, window: int, band: int, blocks: Optional[int],
                   tokens: Optional[int], summaries: Optional[int]) -> float:
    """Keys a query row is computed against, on average, for a plan in the op's argument form: window and band
    -1 for none; blocks, tokens, summaries the widths of the plan's lists (None: no list). The one formula: the
    plan's report, the op's FLOP count and the attention pass's cost estimate use it.

    Example:
        >>> keys_per_query(1024, causal=True, block_size=64, window=-1, band=-1, blocks=None, tokens=None,
        ...                summaries=None)   # dense causal: the triangle
        512.0
        >>> keys_per_query(1024, causal=True, block_size=64, window=2, band=-1, blocks=1, tokens=None, summaries=8)
        264
    """
    if band >= 1 and blocks is None and tokens is None and summaries is None:
        return min(nk, band if causal else 2 * band - 1)
    if blocks is None and tokens is None and summaries is None and window < 0:
        return nk / 2 if causal else nk
    n = 0 if window < 0 else min(nk, ((window + 1) if causal else (2 * window + 1)) * block_size)
    return n + (blocks or 0) * block_size + (tokens or 0) + (summaries or 0)


def listed_keys_per_query(plan: Plan) -> float:
    """Keys a plan lists for a query row, averaged over (batch, kv head, query block): the near blocks' keys, the
    listed blocks' keys, routed tokens and summaries, -1 slots not counted. A selection by attention mass (UCSA's
    gamma) lists fewer than its capacity, which is what `Plan.keys_per_query` counts and executors compute at.
    Dense and banded plans give `Plan.keys_per_query`.

    Example:
        >>> import torch, danon
        >>> q = torch.randn(1, 2, 512, 16)
        >>> kw = dict(kind="ucsa", block_size=16, local_window_size=16, global_tokens=16, top_k_blocks=20)
        >>> full, by_mass = danon.attention_plan(q, q, **kw), danon.attention_plan(q, q, gamma=0.5, **kw)
        >>> listed_keys_per_query(by_mass) < listed_keys_per_query(full) <= full.keys_per_query()
        True
    """
    if plan.is_dense or plan.band is not None:
        return float(plan.keys_per_query())
    b, tk = plan.block_size, plan.num_key_blocks
    keys = torch.zeros(())
    if plan.window is not None:
        t = torch.arange(plan.num_query_blocks) + plan.first_query_block
        lo = (t - plan.window).clamp(min=0)
        hi = t.clamp(max=tk - 1) if plan.causal else (t + plan.window).clamp(max=tk - 1)
        keys = keys + ((hi - lo + 1).clamp(min=0) * b).to(torch.float64).mean()
    counts = plan.counts()
    for name, weight in (("blocks", b), ("tokens", 1), ("summaries", 1)):
        if counts[name] is not None:
            keys = keys + counts[name].to(torch.float64).mean() * weight
    return float(keys)


def plan_coverage(plan: Plan) -> dict:
    """Share of the visible keys a plan's queries see exactly, through summaries, or not at all.

    Measured per (batch, kv head, query block) for the block's last query row (under causal
    masking it sees the most keys), weighted by the number of keys visible to that row.

    Example:
        >>> import torch, danon
        >>> q = torch.randn(1, 1, 512, 16)
        >>> plan = danon.attention_plan(q, q, kind="ucsa", block_size=16, local_window_size=32,
        ...                             global_tokens=16, top_k_blocks=2)
        >>> cov = danon.plan_coverage(plan)
        >>> round(cov["exact"] + cov["summary"] + cov["skipped"], 6)
        1.0
    """
    if plan.is_dense:
        return {"exact": 1.0, "summary": 0.0, "skipped": 0.0}
    counts = plan.key_block_counts  # [B, Tk]
    Tq = plan.num_query_blocks
    counts_f = counts.to(torch.float64)
    if plan.causal:
        # keys visible to the last row of query block t: all visible keys in blocks <= t
        # (rows past Nk see every key)
        prefix = counts_f.cumsum(-1)  # [B, Tk]
        t = torch.arange(Tq, device=counts.device).clamp(max=counts.shape[-1] - 1)
        visible = prefix[:, t]  # [B, Tq]
    else:
        visible = counts_f.sum(-1, keepdim=True).expand(-1, Tq)
    visible = visible[:, None, :]  # [B, 1, Tq]

    exact = torch.zeros_like(visible)
    if plan.window is not None:
        t_q = torch.arange(Tq, device=counts.device)[:, None]
        d = t_q - torch.arange(counts.shape[-1], device=counts.device)[None, :]
        near = ((d >= 0) & (d <= plan.window)) if plan.causal else (d.abs() <= plan.window)
        share = near.to(torch.float64)
        if plan.band is not None:   # the part of each near block inside the last row's band
            b = plan.block_size
            last = (torch.arange(Tq, device=counts.device) + 1).clamp(max=-(-plan.seq_len_q // b)) * b - 1
            lo = last - plan.band + 1
            hi = last if plan.causal else last + plan.band - 1
            start = torch.arange(counts.shape[-1], device=counts.device) * b
            inside = (torch.minimum(hi[:, None], start[None, :] + b - 1) - torch.maximum(lo[:, None], start[None, :]) + 1)
            share = share * inside.clamp(min=0, max=b).to(torch.float64) / b
        exact = exact + (counts_f @ share.T)[:, None, :]
    if plan.block_idx is not None:
        idx = plan.block_idx.long()
        c = counts_f[:, None, None, :].expand(-1, idx.shape[1], idx.shape[2], -1)
        got = torch.gather(c, -1, idx.clamp(min=0)) * (idx >= 0)
        exact = exact + got.sum(-1)
    if plan.token_idx is not None:
        exact = exact + (plan.token_idx >= 0).sum(-1)
    summary = torch.zeros_like(exact)
    if plan.summary_idx is not None:
        idx = plan.summary_idx.long()
        n = plan.summary_count.to(torch.float64)
        got = torch.gather(n[:, :, None, :].expand(-1, -1, idx.shape[2], -1), -1, idx.clamp(min=0)) * (idx >= 0)
        summary = got.sum(-1)
    visible = visible.expand_as(exact)
    exact = torch.minimum(exact, visible)
    total = visible.sum().clamp(min=1.0)
    e = float(exact.sum() / total)
    s = float(summary.sum() / total)
    s = min(s, 1.0 - e)
    return {"exact": e, "summary": s, "skipped": max(0.0, 1.0 - e - s)}
