"""Plans: every visible key is seen exactly once (exact or through one summary), and plans stay cheap.

Keys are one-hot position vectors (k_j = e_j), so a summary's mean times its count is exactly
the indicator of the tokens it holds: membership is read from the summaries' content, not from
the builder's bookkeeping.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import danon
from danon.core.dala import _routed_tokens, _routed_tokens_tree


def _exact_members(plan, B, Hkv, nk):
    """[B, Hkv, Tq, Nk] count of how often each key is listed exactly for each query block."""
    b, tq, tk = plan.block_size, plan.num_query_blocks, plan.num_key_blocks
    blocks = torch.zeros(B, Hkv, tq, tk + 1)
    if plan.window is not None:
        t = torch.arange(tq)[:, None]
        d = t - torch.arange(tk)[None, :]
        near = ((d >= 0) & (d <= plan.window)) if plan.causal else (d.abs() <= plan.window)
        blocks[..., :tk] += near.float()
    if plan.block_idx is not None:
        idx = plan.block_idx.long()
        blocks.scatter_add_(-1, torch.where(idx >= 0, idx, tk), torch.ones(idx.shape))
    per_token = blocks[..., :tk].repeat_interleave(b, -1)[..., :nk]
    if plan.token_idx is not None:
        idx = plan.token_idx.long()
        extra = torch.zeros(B, Hkv, tq, nk + 1)
        extra.scatter_add_(-1, torch.where(idx >= 0, idx, nk), torch.ones(idx.shape))
        per_token = per_token + extra[..., :nk]
    return per_token.double()


def _summary_members(plan, B, Hkv, nk):
    """[B, Hkv, Tq, Nk] how often each key is held by one of the query block's summaries."""
    if plan.summary_idx is None:
        return torch.zeros(B, Hkv, plan.num_query_blocks, nk)
    members = plan.summary_k.double() * plan.summary_count.double()[..., None]      # [B, Hkv, S, Nk]: indicators
    idx = plan.summary_idx.long()
    got = torch.gather(members[:, :, None].expand(-1, -1, idx.shape[2], -1, -1), 3,
                       idx.clamp(min=0)[..., None].expand(-1, -1, -1, -1, nk))
    return (got * (idx >= 0)[..., None]).sum(3)


def _visible(kpm, causal, tq, b, nk):
    """[B, 1, Tq, Nk]: keys visible to the last row of each query block."""
    vis = kpm[:, None, None, :].expand(-1, 1, tq, nk).clone()
    if causal:
        last = (torch.arange(tq) + 1) * b - 1
        vis &= (torch.arange(nk)[None, :] <= last[:, None])[None, None]
    return vis.double()


def _check_partition(kind, n, b, causal, seed, **kw):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2, n, n, generator=g)
    k = torch.eye(n).expand(2, 1, n, n)                                     # k_j = e_j
    kpm = torch.rand(2, n, generator=g) > 0.25
    plan = danon.attention_plan(q, k, k, kind=kind, causal=causal, key_padding_mask=kpm, block_size=b, **kw)
    visible = _visible(kpm, causal, plan.num_query_blocks, b, n)
    exact = _exact_members(plan, 2, 1, n) * visible     # exact blocks may hold invisible keys: masked per token
    summaries = _summary_members(plan, 2, 1, n)
    assert torch.allclose(summaries * (1 - visible), torch.zeros((), dtype=torch.float64), atol=1e-6), "a summary holds an invisible key"
    total = exact + summaries
    assert torch.allclose(total, visible, atol=1e-6), "a visible key is missed or seen twice"


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 160), b=st.sampled_from([16, 32]), window=st.integers(0, 96),
       levels=st.sampled_from([1, 2, 3, "auto"]), factor=st.integers(2, 4), causal=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_msra_partitions_the_visible_keys(n, b, window, levels, factor, causal, seed):
    _check_partition("msra", n, b, causal, seed, window=window, num_levels=levels, compression_factor=factor)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 160), b=st.sampled_from([16, 32]), window=st.integers(0, 96), top_k=st.integers(0, 4),
       global_tokens=st.integers(0, 40), causal=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_ucsa_with_compress_partitions_the_visible_keys(n, b, window, top_k, global_tokens, causal, seed):
    _check_partition("ucsa", n, b, causal, seed, local_window_size=window, top_k_blocks=top_k,
                     global_tokens=global_tokens, compress=True)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 160), b=st.sampled_from([16, 32]), window=st.integers(0, 96), memory=st.integers(0, 20),
       causal=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_dala_with_compress_rest_drops_no_visible_key(n, b, window, memory, causal, seed):
    _check_partition("dala", n, b, causal, seed, window=window, memory_size=memory, compress_rest=True)


def _routed_brute_force(scores, b, m, w, causal, first=0, count=None):
    nk = scores.shape[-1]
    tk = -(-nk // b)
    t = torch.arange(first, tk if count is None else first + count)
    d = t[:, None] - (torch.arange(nk) // b)[None, :]
    candidate = (d > w) if causal else (d.abs() > w)
    top = torch.topk(scores[:, :, None, :].masked_fill(~candidate, float("-inf")), m, -1)
    return torch.where(top.values > float("-inf"), top.indices, -1)


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 300), b=st.sampled_from([16, 32]), m=st.integers(1, 40), w=st.integers(0, 4),
       causal=st.booleans(), seed=st.integers(0, 2 ** 16), rows=st.sampled_from(["all", "last", "some"]))
def test_dala_routing_tree_and_kernel_equal_brute_force_top_k(n, b, m, w, causal, seed, rows):
    """Both ways of routing (the traceable tree, and what eager CPU calls run: danon/kernels' C++ scan) pick the
    brute force's tokens, for every query block or a run of them (queries after a cache)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, 2, n, generator=g)
    scores[0, :, : n // 3] = float("-inf")   # padding
    m = min(m, n)
    tk = -(-n // b)
    first, count = {"all": (0, None), "last": (tk - 1, 1), "some": (tk // 3, tk - tk // 3)}[rows]
    slow = _routed_brute_force(scores, b, m, w, causal, first, count).sort(-1).values
    for route in (_routed_tokens_tree, _routed_tokens):
        fast = route(scores, b, m, w, causal, first, count).long().sort(-1).values
        assert torch.equal(fast, slow), route.__name__


@pytest.mark.parametrize("blocks", [1, 2, 3, 5, 8, 13, 37])
@pytest.mark.parametrize("m", [1, 4, 8])
def test_dala_export_table_reads_the_same_lists_as_the_tree(blocks, m):
    """torch.export builds DALA's routed-token lists from a table whose levels keep every block
    (_topk_table); the lists it reads must be the tree's, values and ids, for any block count."""
    from danon.core.dala import _prefix_lists, _topk_table, _topk_tree
    g = torch.Generator().manual_seed(blocks * 10 + m)
    b = 8
    vals = torch.randn(2, 3, blocks, b, generator=g)
    vals[..., -1, -3:] = float("-inf")                       # a padded last block
    ids = torch.arange(blocks * b).view(1, 1, blocks, b).expand(2, 3, blocks, b)
    t = torch.arange(blocks)
    for length in ((t - 1).clamp(min=0), (blocks - t - 2).clamp(min=0), t):
        tree_val, tree_ids = _prefix_lists(_topk_tree(vals, ids, m), length)
        table_val, table_ids = _prefix_lists(_topk_table(vals, ids, m), length, table=True)
        width = tree_val.shape[-1]                               # the table has more (empty) levels
        assert torch.equal(table_val[..., :width], tree_val) and torch.equal(table_ids[..., :width], tree_ids)
        assert torch.isneginf(table_val[..., width:]).all()


def test_msra_auto_levels_follow_the_definition():
    from danon.core import auto_levels
    for tk in range(1, 300):
        for w in range(0, 4):
            for c in (2, 4):
                levels = auto_levels(tk, w, c)
                assert levels >= 1 and math.ceil(tk / c ** levels) <= 2 * w + 1
                assert levels == 1 or math.ceil(tk / c ** (levels - 1)) > 2 * w + 1


def test_sparse_plans_have_static_linear_size():
    """Keys per query stay bounded as N grows (the executor's cost is O(N x keys per query))."""
    sizes = {}
    for n in (4096, 8192, 16384):
        q = torch.randn(1, 1, n, 8)
        for kind, kw in (("msra", {"num_levels": "auto"}), ("dala", {})):
            sizes[(kind, n)] = danon.attention_plan(q, q, q, kind=kind, causal=True, **kw).keys_per_query()
    for kind in ("msra", "dala"):
        assert sizes[(kind, 16384)] <= sizes[(kind, 4096)] * 1.5, sizes


def test_plan_coverage_reports_shares():
    q = torch.randn(1, 2, 1024, 16)
    exact = danon.plan_coverage(danon.attention_plan(q, q, kind="exact", causal=True))
    assert exact == {"exact": 1.0, "summary": 0.0, "skipped": 0.0}
    for kind, kw in [("msra", dict(window=64, block_size=16)), ("ucsa", dict(local_window_size=64, block_size=16)),
                     ("dala", dict(window=64, block_size=16))]:
        cov = danon.plan_coverage(danon.attention_plan(q, q, kind=kind, causal=True, **kw))
        assert abs(sum(cov.values()) - 1) < 1e-9
        assert 0 < cov["exact"] < 1 and cov["summary"] > 0 and cov["skipped"] < 1e-9, (kind, cov)
    no_compress = danon.plan_coverage(danon.attention_plan(q, q, kind="ucsa", causal=True, block_size=16,
                                                           local_window_size=64, compress=False))
    assert no_compress["summary"] == 0 and no_compress["skipped"] > 0


@pytest.mark.parametrize("kind", ["msra", "ucsa", "dala"])
def test_plan_building_traces_without_data_dependent_shapes(kind):
    """Plans are built from ordinary torch ops, so one compiled graph builds them (no graph break)."""
    q = torch.randn(1, 2, 256, 16)

    def build(q):
        plan = danon.attention_plan(q, q, kind=kind, causal=True, block_size=16)
        return plan.summary_k, plan.summary_idx

    eager = build(q)
    compiled = torch.compile(build, fullgraph=True)(q)
    assert torch.equal(compiled[1], eager[1])
    used = eager[1][eager[1] >= 0].long().unique()      # rows of the summary table some query block reads
    assert torch.allclose(compiled[0][:, :, used], eager[0][:, :, used], atol=1e-4, rtol=1e-4)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 6), width=st.integers(1, 40), density=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]),
       capacity=st.integers(1, 50), seed=st.integers(0, 2 ** 16))
def test_compact_by_nonzero_equals_compact_by_topk(rows, width, density, capacity, seed):
    """blocks.compact runs eager CPU calls through nonzero (one pass) and traced ones through topk (static shapes):
    the same lists, rows with more entries than the capacity keeping their first ones."""
    from danon.core import blocks
    mask = torch.rand(2, rows, width, generator=torch.Generator().manual_seed(seed)) < density
    eager = blocks.compact(mask, capacity)
    real = blocks._eager_on_cpu
    blocks._eager_on_cpu = lambda x: False
    try:
        traced = blocks.compact(mask, capacity)
    finally:
        blocks._eager_on_cpu = real
    assert eager.dtype == traced.dtype == torch.int32
    assert torch.equal(eager, traced)
