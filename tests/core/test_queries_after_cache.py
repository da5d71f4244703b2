"""Queries after a cache (Nq < Nk, causal, aligned bottom-right): the defining property of issue 19.

Computing positions [0, N) in one call equals computing them as a prefill, then chunks, then single-token
steps, each call given the keys and values so far (and UCSA the queries before it). For every family and
option set, on fresh random inputs, with and without key padding: outputs (fp64 < 1e-10, fp32 < 1e-5) and
the gradients of q, k, v through the chunked calls.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import danon
from danon.core.blocks import query_layout
from danon.core.run import attention, plan

FAMILIES = {
    "exact": dict(block_size=16),
    "exact-band": dict(block_size=16, sliding_window=20),
    "msra": dict(block_size=16, window=16, num_levels=2, compression_factor=2),
    "msra-auto": dict(block_size=16, window=32, num_levels="auto", compression_factor=4),
    "ucsa": dict(block_size=16, local_window_size=16, global_tokens=16, top_k_blocks=2),
    "ucsa-fraction": dict(block_size=16, local_window_size=16, global_tokens=0, top_k_blocks=2, sparsity_factor=0.3),
    "ucsa-no-compress": dict(block_size=16, local_window_size=16, global_tokens=16, top_k_blocks=1, compress=False),
    "ucsa-gamma": dict(block_size=16, local_window_size=16, global_tokens=16, top_k_blocks=4, gamma=0.6),
    "dala": dict(block_size=16, window=16, memory_size=8),
    "dala-no-decay": dict(block_size=16, window=16, memory_size=4, decay="none", compress_rest=False),
}


def _inputs(seed, B=2, H=4, Hkv=2, N=150, D=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, N, D, generator=g, dtype=dtype) for h in (H, Hkv, Hkv)]


def _chunked(name, q, k, v, cuts, key_padding_mask=None):
    """The rows [cuts[0], cuts[-1]) as one call per piece, each seeing the keys up to its end."""
    kind, kw = name.split("-")[0], FAMILIES[name]
    outs = []
    for a, b in zip(cuts, cuts[1:]):
        extra = {"past_queries": q[:, :, :a]} if kind == "ucsa" else {}
        kpm = None if key_padding_mask is None else key_padding_mask[:, :b]
        outs.append(attention(kind, q[:, :, a:b], k[:, :, :b], v[:, :, :b], causal=True, key_padding_mask=kpm,
                              **kw, **extra))
    return torch.cat(outs, 2)


def _full(name, q, k, v, key_padding_mask=None):
    return attention(name.split("-")[0], q, k, v, causal=True, key_padding_mask=key_padding_mask, **FAMILIES[name])


# a prefill, chunks not on block boundaries, single tokens across block boundaries, a last chunk
CUTS = [0, 70, 75, 95, 96, 97, 112, 113, 150]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_prefill_chunks_and_decode_equal_one_call_fp64(name, padded):
    q, k, v = _inputs(1)
    kpm = None
    if padded:   # left padding in one row, scattered padding in the other
        kpm = torch.rand(2, 150, generator=torch.Generator().manual_seed(2)) > 0.2
        kpm[0, :37] = False
    err = (_chunked(name, q, k, v, CUTS, kpm) - _full(name, q, k, v, kpm)).abs().max().item()
    assert err < 1e-10


@pytest.mark.parametrize("name", list(FAMILIES))
def test_prefill_chunks_and_decode_equal_one_call_fp32(name):
    q, k, v = _inputs(3, dtype=torch.float32)
    full = _full(name, q, k, v)
    assert (_chunked(name, q, k, v, CUTS) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ["exact", "exact-band", "msra", "ucsa", "dala"])
def test_gradients_through_chunked_calls_equal_one_call(name):
    """Training through a cache: d loss / d (q, k, v) of the chunked calls equal the full call's."""
    q, k, v = _inputs(4, N=100)
    w = torch.randn(2, 4, 100, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grads = []
    for run in (lambda *x: _full(name, *x), lambda *x: _chunked(name, *x, [0, 40, 57, 58, 100])):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        (run(*leaves) * w).sum().backward()
        grads.append([x.grad for x in leaves])
    for full, chunked in zip(*grads):
        assert (full - chunked).abs().max().item() < 1e-10


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(list(FAMILIES)), n=st.integers(2, 120), data=st.data())
def test_random_splits_equal_one_call(name, n, data):
    """Hypothesis: any split of [0, N) into calls gives the one call's rows."""
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    inner = data.draw(st.lists(st.integers(1, n - 1), max_size=5, unique=True), label="cuts")
    cuts = [0] + sorted(inner) + [n]
    q, k, v = _inputs(seed, B=1, H=2, Hkv=1, N=n)
    assert (_chunked(name, q, k, v, cuts) - _full(name, q, k, v)).abs().max().item() < 1e-10


@pytest.mark.parametrize("kind", ["msra", "ucsa", "dala"])
def test_the_plan_of_queries_after_a_cache_is_the_full_plans_rows(kind):
    q, k, v = _inputs(6)
    kw = FAMILIES[kind]
    full = plan(kind, q, k, v, causal=True, **kw)
    extra = {"past_queries": q[:, :, :101]} if kind == "ucsa" else {}
    part = plan(kind, q[:, :, 101:], k, v, causal=True, **kw, **extra)
    _, first, count = query_layout(49, 150, 16)
    assert (part.first_query_block, part.num_query_blocks) == (first, count) == (6, 4)
    # DALA's summary table has one row per query block of the call: its indices are local, its rows the full's
    lists = ("block_idx", "token_idx") + (("summary_idx",) if kind != "dala" else ())
    for field in lists:
        a, b = getattr(full, field), getattr(part, field)
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a[:, :, first:first + count], b)
    if kind == "dala":
        assert torch.equal(part.summary_idx[0, 0, :, 0], torch.arange(count, dtype=torch.int32))
        for field in ("summary_k", "summary_v", "summary_count", "summary_pos"):
            assert torch.allclose(getattr(full, field)[:, :, first:first + count], getattr(part, field), atol=1e-12)


def test_decode_reads_the_last_position():
    """One query row after N - 1 cached keys is row N - 1 of the full call, for a sparse family too."""
    q, k, v = _inputs(7, N=130)
    full = _full("msra", q, k, v)
    step = attention("msra", q[:, :, -1:], k, v, causal=True, **FAMILIES["msra"])
    assert (step - full[:, :, -1:]).abs().max().item() < 1e-12


def test_ucsa_after_a_cache_asks_for_the_queries_it_selects_with():
    q, k, v = _inputs(8)
    with pytest.raises(ValueError, match="pass past_queries, the 21 query rows before"):
        attention("ucsa", q[:, :, -1:], k, v, causal=True, **FAMILIES["ucsa"])
    with pytest.raises(ValueError, match="past_queries must be a tensor"):
        attention("ucsa", q[:, :, -1:], k, v, causal=True, past_queries=q[:, :2], **FAMILIES["ucsa"])


@pytest.mark.parametrize("kind", ["msra", "ucsa", "dala"])
def test_sparse_families_refuse_non_causal_queries_after_a_cache(kind):
    q, k, v = _inputs(9)
    with pytest.raises(ValueError, match="causal queries after a cache"):
        attention(kind, q[:, :, 100:], k, v, causal=False, **FAMILIES[kind])
    with pytest.raises(ValueError, match="causal queries after a cache"):
        attention(kind, q, k[:, :, :100], v[:, :, :100], causal=True, **FAMILIES[kind])   # Nq > Nk


def test_functional_api_takes_queries_after_a_cache():
    q, k, v = _inputs(10, dtype=torch.float32)
    full = danon.msra_attention(q, k, v, causal=True, block_size=16, window=16)
    step = danon.msra_attention(q[:, :, 140:], k, v, causal=True, block_size=16, window=16)
    assert (step - full[:, :, 140:]).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ["exact", "exact-band", "msra", "ucsa", "dala"])
def test_the_aten_executor_of_the_lowerings_agrees_after_a_cache(name):
    """danon/kernels/aten.py (what ONNX and TensorRT lower sparse plans to) on queries after a cache."""
    from danon.core.attention_args import attention_args
    from danon.kernels.aten import attention_aten

    q, k, v = _inputs(11, dtype=torch.float32)
    kind, kw = name.split("-")[0], FAMILIES[name]
    extra = {"past_queries": q[:, :, :123]} if kind == "ucsa" else {}
    built = plan(kind, q[:, :, 123:], k, v, causal=True, **kw, **extra)
    args = attention_args(q[:, :, 123:], k, v, built, scale=8 ** -0.5)
    out, _ = attention_aten(*args)
    want, _ = torch.ops.danon.attention(*args)
    assert (out - want).abs().max() < 1e-5
    assert (want - _full(name, q, k, v)[:, :, 123:]).abs().max() < 1e-5
