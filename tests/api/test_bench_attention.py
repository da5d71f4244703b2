"""bench/attention_cpu.py's own arithmetic: what it counts as a plan's FLOPs, and that its FlexAttention
BlockMask holds exactly the blocks danon's executor runs (so the side-by-side compares the same work)."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

import danon
from danon.core.attention_op import run_plan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:   # bench/ is not an installed package
    sys.path.insert(0, ROOT)

from bench.attention_cpu import exact_only, flex_block_mask, plan_pairs  # noqa: E402

N, B_SIZE = 512, 32
FAMILY_KW = {"msra": dict(window=64, num_levels=2, compression_factor=2),
             "dala": dict(window=64, memory_size=16),
             "ucsa": dict(local_window_size=64, top_k_blocks=3, global_tokens=32)}


def _inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, N, 16, generator=g, dtype=torch.float64) for _ in range(3)]


def _visible_pairs(plan) -> float:
    """Attended (query, key) pairs of one head, brute force: every row's exact keys plus its summary slots."""
    b, t = plan.block_size, torch.arange(N)
    blocks = t // b
    near = (blocks[:, None] - blocks[None, :] >= 0) & (blocks[:, None] - blocks[None, :] <= plan.window)
    seen = near & (t[None, :] <= t[:, None])
    if plan.block_idx is not None:
        listed = torch.zeros(plan.num_query_blocks, plan.num_key_blocks + 1, dtype=torch.bool)
        idx = plan.block_idx[0, 0].long()
        listed.scatter_(1, torch.where(idx >= 0, idx, plan.num_key_blocks), True)
        seen |= listed[blocks][:, blocks] & (t[None, :] < (blocks * b)[:, None])
    if plan.token_idx is not None:
        tok = plan.token_idx[0, 0].long()                          # [Tq, M]
        for row in range(N):
            listed_tokens = tok[blocks[row]]
            seen[row, listed_tokens[(listed_tokens >= 0) & (listed_tokens < blocks[row] * b)]] = True
    pairs = float(seen.sum())
    if plan.summary_idx is not None:
        pairs += float((plan.summary_idx[0, 0] >= 0).sum(-1)[blocks].sum())
    return pairs


@pytest.mark.parametrize("kind", ["msra", "dala", "ucsa"])
def test_plan_flops_count_the_pairs_each_row_attends(kind):
    q, k, _ = _inputs()
    plan = danon.attention_plan(q, k, kind=kind, causal=True, block_size=B_SIZE, **FAMILY_KW[kind])
    assert plan_pairs(plan, N) == pytest.approx(_visible_pairs(plan), rel=1e-9)
    exact = exact_only(plan)
    assert exact.summary_idx is None and exact.token_idx is None
    assert plan_pairs(exact, N) == pytest.approx(_visible_pairs(exact), rel=1e-9)


@pytest.mark.parametrize("kind", ["msra", "dala", "ucsa"])
def test_flex_block_mask_runs_the_blocks_danon_runs(kind):
    q, k, v = _inputs()
    plan = danon.attention_plan(q, k, kind=kind, causal=True, block_size=B_SIZE, **FAMILY_KW[kind])
    exact = exact_only(plan)
    slopes = None if plan.slopes is None else plan.slopes.double()

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx)

    # Flex's eager path applies mask_mod alone: the mask_mod that reads the block table gives the attention
    flex = flex_attention(q, k, v, block_mask=flex_block_mask(exact, N, mask_mod_holds_blocks=True),
                          score_mod=alibi if slopes is not None else None, scale=0.25)
    ours = run_plan(q, k, v, exact, scale=0.25)
    assert torch.allclose(flex, ours, atol=1e-10, rtol=0)

    # the compiled kernel reads the block lists instead: the own block the one partial block, the others full
    mask = flex_block_mask(exact, N)
    t = torch.arange(exact.num_query_blocks)
    assert torch.equal(mask.kv_num_blocks[0, :, :], torch.ones_like(mask.kv_num_blocks[0]))
    assert torch.equal(mask.kv_indices[0, :, :, 0], t.expand_as(mask.kv_indices[0, :, :, 0]).to(torch.int32))
    d = t[:, None] - t[None, :]
    expected = (d > 0) & (d <= exact.window)
    if exact.block_idx is not None:
        for tq in range(len(t)):
            for blk in exact.block_idx[0, 0, tq].tolist():
                if 0 <= blk < tq:
                    expected[tq, blk] = True
    full = torch.zeros_like(expected)
    for tq in range(len(t)):
        full[tq, mask.full_kv_indices[0, 0, tq, :mask.full_kv_num_blocks[0, 0, tq]].long()] = True
    assert torch.equal(full, expected)


def test_flex_has_no_cpu_backward_so_the_benchmark_times_its_forward_only():
    # what bench/attention_cpu.py says of Flex's train step on CPU; when torch adds it, this fails and the
    # benchmark should time Flex's backward too
    q = torch.randn(1, 1, 64, 8, requires_grad=True)
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        flex_attention(q, q, q)
