"""PlanState (danon/core/stream.py): decode steps from the state kept between calls equal one full call.

The defining property of issue 19 for the state path: a prefill, chunks and single-token steps run through
one PlanState give the rows of one full-sequence call (fp64 < 1e-10, fp32 < 1e-5), for every sparse family
and option set, with and without padding; and a step reads the near keys and the state only.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from danon.core import stream
from danon.core.run import attention
from danon.core.stream import PlanState, Rows

SPARSE = {
    "msra": dict(block_size=16, window=16, num_levels=2, compression_factor=2),
    "msra-auto": dict(block_size=16, window=32, num_levels="auto", compression_factor=4),
    "msra-flat": dict(block_size=16, window=0, num_levels=1, compression_factor=8),
    "ucsa": dict(block_size=16, local_window_size=16, global_tokens=16, top_k_blocks=2),
    "ucsa-fraction": dict(block_size=16, local_window_size=16, global_tokens=0, top_k_blocks=2, sparsity_factor=0.3),
    "ucsa-no-compress": dict(block_size=16, local_window_size=16, global_tokens=32, top_k_blocks=1, compress=False),
    "ucsa-gamma": dict(block_size=16, local_window_size=16, global_tokens=16, top_k_blocks=4, gamma=0.6),
    "dala": dict(block_size=16, window=16, memory_size=8),
    "dala-no-decay": dict(block_size=16, window=16, memory_size=4, decay="none", compress_rest=False),
    "dala-no-memory": dict(block_size=16, window=32, memory_size=0),
}


def _inputs(seed, B=2, H=4, Hkv=2, N=200, D=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, N, D, generator=g, dtype=dtype) for h in (H, Hkv, Hkv)]


def _streamed(name, q, k, v, cuts, kpm=None):
    """Rows [0, cuts[-1]) as one call per piece through one PlanState; and the state."""
    state = PlanState(name.split("-")[0], **SPARSE[name])
    outs = []
    for a, b in zip(cuts, cuts[1:]):
        outs.append(state.attention(q[:, :, a:b], k[:, :, :b], v[:, :, :b],
                                    key_padding_mask=None if kpm is None else kpm[:, :b]))
    return torch.cat(outs, 2), state


def _full(name, q, k, v, kpm=None):
    return attention(name.split("-")[0], q, k, v, causal=True, key_padding_mask=kpm, **SPARSE[name])


# a prefill, a chunk across a block boundary, then single tokens through several blocks, a chunk inside a block
CUTS = [0, 70, 90] + list(range(91, 181)) + [184, 200]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", list(SPARSE))
def test_state_steps_equal_one_call_fp64(name, padded):
    q, k, v = _inputs(1)
    kpm = None
    if padded:   # left padding in one row (a batch of prompts), scattered padding in the other
        kpm = torch.rand(2, 200, generator=torch.Generator().manual_seed(2)) > 0.2
        kpm[0, :37] = False
    got, state = _streamed(name, q, k, v, CUTS, kpm)
    assert (got - _full(name, q, k, v, kpm)).abs().max().item() < 1e-10
    assert state.local_calls == 91          # every single-token step and the chunk inside one block


@pytest.mark.parametrize("name", ["msra", "ucsa", "dala"])
def test_state_steps_equal_one_call_fp32(name):
    q, k, v = _inputs(3, dtype=torch.float32)
    got, _ = _streamed(name, q, k, v, CUTS)
    assert (got - _full(name, q, k, v)).abs().max().item() < 1e-5


def test_bf16_steps_stay_within_bf16_of_the_full_call():
    q, k, v = _inputs(4, dtype=torch.bfloat16)
    got, _ = _streamed("msra", q, k, v, CUTS)
    want = _full("msra", q, k, v).double()
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-2


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(list(SPARSE)), n=st.integers(2, 160), data=st.data())
def test_random_prefills_and_steps_equal_one_call(name, n, data):
    """Hypothesis: a prefill of any length, then any mix of single tokens and short chunks."""
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    cuts = [0, data.draw(st.integers(1, n), label="prefill")]
    while cuts[-1] < n:
        cuts.append(min(n, cuts[-1] + data.draw(st.sampled_from([1, 1, 1, 2, 5, 17]), label="step")))
    q, k, v = _inputs(seed, B=1, H=2, Hkv=1, N=n)
    got, _ = _streamed(name, q, k, v, cuts)
    assert (got - _full(name, q, k, v)).abs().max().item() < 1e-10


@pytest.mark.parametrize("name", ["msra", "ucsa", "dala"])
def test_a_step_reads_the_near_keys_and_a_short_table(name, monkeypatch):
    """Cost: a decode step hands the op (W + 1) blocks of keys at most, and a table far shorter than N."""
    seen = []
    real = stream.run_plan

    def spy(q, k, v, plan, **kw):
        seen.append((k.shape[2], 0 if plan.summary_k is None else plan.summary_k.shape[2]))
        return real(q, k, v, plan, **kw)

    monkeypatch.setattr(stream, "run_plan", spy)
    n = 2048
    q, k, v = _inputs(5, B=1, N=n + 1)
    state = PlanState(name, **SPARSE[name])
    state.attention(q[:, :, :n], k[:, :, :n], v[:, :, :n])
    state.attention(q[:, :, n:], k, v)
    keys, table = seen[-1]
    assert keys <= 2 * 16                    # W = 1 block before the query's own
    assert table <= n // 16 + 3 * 16         # UCSA: every block mean plus the listed blocks' tokens
    if name != "ucsa":
        assert table <= 48                   # MSRA: a few spans per level; DALA: the routed tokens and one rest


def test_state_bytes_are_a_small_share_of_the_kv_cache():
    n, b = 4096, 64
    q, k, v = _inputs(6, B=1, H=8, Hkv=2, N=n + 1, D=64, dtype=torch.float32)
    kv = 2 * k.numel() * k.element_size()
    for kind, kw in (("msra", dict(num_levels=3)), ("ucsa", {}), ("dala", {})):
        state = PlanState(kind, block_size=b, **kw)
        state.attention(q[:, :, :n], k[:, :, :n], v[:, :, :n])
        state.attention(q[:, :, n:], k, v)
        assert 0 < state.nbytes() <= 0.1 * kv, kind


def test_beam_reorder_follows_the_batch():
    q, k, v = _inputs(7, B=3, N=120)
    name = "dala"
    state = PlanState("dala", **SPARSE[name])
    state.attention(q[:, :, :100], k[:, :, :100], v[:, :, :100])
    for i in range(100, 110):
        state.attention(q[:, :, i:i + 1], k[:, :, :i + 1], v[:, :, :i + 1])
    order = torch.tensor([2, 0, 0])
    state.select_batch(order)
    q, k, v = (x[order] for x in (q, k, v))
    steps = [state.attention(q[:, :, i:i + 1], k[:, :, :i + 1], v[:, :, :i + 1]) for i in range(110, 120)]
    assert (torch.cat(steps, 2) - _full(name, q, k, v)[:, :, 110:]).abs().max().item() < 1e-10


def test_a_shorter_sequence_starts_over_and_ucsa_names_missing_queries():
    q, k, v = _inputs(8, N=100)
    state = PlanState("msra", **SPARSE["msra"])
    state.attention(q[:, :, :90], k[:, :, :90], v[:, :, :90])
    again = state.attention(q[:, :, :50], k[:, :, :50], v[:, :, :50])       # a new sequence
    assert (again - _full("msra", q[:, :, :50], k[:, :, :50], v[:, :, :50])).abs().max().item() < 1e-10
    ucsa = PlanState("ucsa", **SPARSE["ucsa"])
    with pytest.raises(ValueError, match="past_queries"):                  # a first call after keys it never saw
        ucsa.attention(q[:, :, 99:], k, v)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="not kind='exact'"):
        PlanState("exact")
    with pytest.raises(ValueError, match="window must be"):
        PlanState("msra", window=-1)
    q, k, v = _inputs(9, N=40)
    with pytest.raises(ValueError, match="importance"):
        PlanState("dala", **SPARSE["dala"]).attention(q, k, v, importance=torch.ones(3))


def test_rows_grow_without_copying_per_append():
    rows = Rows(dim=2)
    x = torch.randn(1, 2, 5, 3)
    rows.append(x)
    buffer = rows.data
    rows.append(torch.randn(1, 2, 1, 3))
    assert rows.data is buffer and rows.length == 6      # room left: written in place
    assert torch.equal(rows.view()[:, :, :5], x)
    rows.select_batch(torch.tensor([0, 0]))
    assert rows.view().shape == (2, 2, 6, 3)
