"""danon.DecodeCache: the factory models decode incrementally, and every split gives one forward's logits.

Issue 19's defining property on danon's own models: a prefill, a chunk across blocks and single-token steps
through the cache give the logits of one forward over the whole sequence (fp64 < 1e-10), for every family
(the hybrid mixes all three), with left padding in a batch of two; decode steps of the sparse families run
from the plan state; hypothesis draws random splits.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import danon

SMALL = dict(hidden_size=32, num_heads=4, num_kv_heads=2, num_layers=2, vocab_size=61)
FACTORIES = {
    "dense": (danon.create_dense_model, {}),
    "msra": (danon.create_msra_model, dict(block_size=16, window=16, num_levels=2, compression_factor=2)),
    "dala": (danon.create_dala_model, dict(block_size=16, window=16, memory_size=8)),
    "ucsa": (danon.create_ucsa_model, dict(block_size=16, local_window_size=16, global_tokens=16, top_k_blocks=1)),
    "hybrid": (danon.create_super_hybrid_model, dict(block_size=16, window=16, memory_size=8, local_window_size=16,
                                                     global_tokens=16, top_k_blocks=1)),
}


def _model(family, seed=0):
    factory, kw = FACTORIES[family]
    torch.manual_seed(seed)
    return factory(**SMALL, **kw).double().eval()


def _decode(model, ids, mask, cuts):
    cache, pieces = danon.DecodeCache(), []
    with torch.no_grad():
        for a, b in zip(cuts, cuts[1:]):
            pieces.append(model(ids[:, a:b], None if mask is None else mask[:, a:b], cache=cache))
    return torch.cat(pieces, 1), cache


CUTS = [0, 37, 50, 51, 52, 53, 64, 65, 66, 70, 90, 91, 92]


@pytest.mark.parametrize("family", list(FACTORIES))
def test_prefill_chunks_and_steps_give_one_forwards_logits(family):
    model = _model(family)
    ids = torch.randint(0, 61, (2, 92), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 92, dtype=torch.long)
    mask[1, :9] = 0                                                      # left padding in the second row
    got, cache = _decode(model, ids, mask, CUTS)
    with torch.no_grad():
        full = model(ids, mask)
    assert (got[0] - full[0]).abs().max() < 1e-10
    assert (got[1, 9:] - full[1, 9:]).abs().max() < 1e-10             # padded query rows are not compared
    assert cache.length == 92
    if family != "dense":
        assert cache.local_calls() > 0 and cache.summary_bytes() > 0


@settings(max_examples=10, deadline=None)
@given(family=st.sampled_from(["msra", "dala", "ucsa"]), n=st.integers(2, 80), data=st.data())
def test_random_splits_give_one_forwards_logits(family, n, data):
    cuts = [0, data.draw(st.integers(1, n), label="prefill")]
    while cuts[-1] < n:
        cuts.append(min(n, cuts[-1] + data.draw(st.sampled_from([1, 1, 3, 20]), label="step")))
    model = _model(family, seed=data.draw(st.integers(0, 100), label="seed"))
    ids = torch.randint(0, 61, (1, n), generator=torch.Generator().manual_seed(n))
    got, _ = _decode(model, ids, None, cuts)
    with torch.no_grad():
        assert (got - model(ids)).abs().max() < 1e-10


def test_greedy_decoding_with_the_cache_equals_full_forwards():
    model = _model("msra")
    ids = torch.randint(0, 61, (1, 40), generator=torch.Generator().manual_seed(2))
    cache, seq = danon.DecodeCache(), ids
    with torch.no_grad():
        logits = model(ids, cache=cache)
        for _ in range(30):
            token = logits[:, -1:].argmax(-1)
            assert torch.equal(token, model(seq)[:, -1:].argmax(-1))     # the full forward picks the same token
            seq = torch.cat([seq, token], 1)
            logits = model(token, cache=cache)
    assert cache.length == 70 and cache.local_calls() == 2 * 30


def test_the_cache_refuses_what_it_cannot_do():
    model = _model("msra")
    ids = torch.randint(0, 61, (2, 20))
    with pytest.raises(NotImplementedError, match="torch.no_grad"):
        model(ids, cache=danon.DecodeCache())                         # autograd on: the cache is for inference
    cache = danon.DecodeCache()
    with torch.no_grad():
        model(ids, cache=cache)
        with pytest.raises(ValueError, match="batch of 2"):
            model(ids[:1], cache=cache)
    encoder = danon.create_msra_model(**SMALL, block_size=16, causal=False).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="causal"):
        encoder(ids, cache=danon.DecodeCache())
    small = danon.create_msra_model(**SMALL, block_size=16, max_sequence_length=32).eval()
    cache = danon.DecodeCache()
    with torch.no_grad():
        small(ids, cache=cache)
        with pytest.raises(ValueError, match="after 20 cached ones"):
            small(ids, cache=cache)
