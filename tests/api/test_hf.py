"""danon.hf: attn_implementation="danon" in transformers models, through prefill, chunked prefill and decode.

Small random configs of Llama, Qwen2 (GQA), Mistral (sliding window) and Gemma2 (softcap, local and global
layers). The exact family's generated tokens equal transformers' own attention; a sparse family's tokens
with the cache equal its full-sequence forward's (generate with use_cache=False), and its logits through a
chunked prefill and single-token steps equal one full-sequence call's in fp64.
"""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
import danon  # noqa: E402
import danon.hf  # noqa: E402  (registers "danon" with transformers)

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
MODELS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}, "sdpa"),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}, "sdpa"),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=24), "sdpa"),
    # Gemma2 has no SDPA path in transformers: its reference is the eager attention
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, dict(sliding_window=24, head_dim=16),
               "eager"),
}


def _model(name, attn_implementation, danon_attention=None, dtype=torch.float32, seed=0):
    config_cls, model_cls, extra, _ = MODELS[name]
    config = config_cls(**SMALL, **extra)
    if danon_attention is not None:
        config.danon_attention = danon_attention
    torch.manual_seed(seed)
    return model_cls._from_config(copy.deepcopy(config), attn_implementation=attn_implementation).eval().to(dtype)


def _prompt(batch=2, n=37, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (batch, n), generator=g)
    mask = torch.ones_like(ids)
    mask[1:, :5] = 0                                   # left padding in the second row
    return ids, mask


@pytest.mark.parametrize("name", list(MODELS))
def test_exact_family_generates_transformers_tokens(name):
    reference = _model(name, MODELS[name][3])
    model = _model(name, "danon")
    assert model.config._attn_implementation == "danon" and reference.config._attn_implementation != "danon"
    ids, mask = _prompt()
    want = reference.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    assert torch.equal(got, want)
    logits = model(ids, attention_mask=mask).logits
    ref_logits = reference(ids, attention_mask=mask).logits
    assert (logits[0] - ref_logits[0]).abs().max() < 1e-4
    assert (logits[1, 5:] - ref_logits[1, 5:]).abs().max() < 1e-4      # padded query rows are not compared


SPARSE = {
    "msra": {"attention": "msra", "block_size": 16, "window": 16, "num_levels": 2},
    "dala": {"attention": "dala", "block_size": 16, "window": 16, "memory_size": 8},
}


@pytest.mark.parametrize("family", list(SPARSE))
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_sparse_family_generates_its_full_sequence_tokens(name, family):
    _assert_cached_generation_equals_full(_model(name, "danon", SPARSE[family], dtype=torch.float64))


def _assert_cached_generation_equals_full(model, **cache):
    """Greedy generation through a cache (transformers' own, or `cache=...`) gives the tokens and scores of
    full-sequence forwards (use_cache=False): batch 2 with left padding, fp64."""
    ids, mask = _prompt()
    kw = dict(attention_mask=mask, max_new_tokens=30, do_sample=False, output_scores=True, return_dict_in_generate=True)
    cached = model.generate(ids, **cache, **kw)
    full = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, full.sequences)
    assert max(float((a - b).abs().max()) for a, b in zip(cached.scores, full.scores)) < 1e-10


@pytest.mark.parametrize("family", list(SPARSE))
def test_sparse_family_is_sparse_and_chunked_calls_equal_one_call(family):
    model = _model("llama", "danon", SPARSE[family], dtype=torch.float64)
    exact = _model("llama", "sdpa", dtype=torch.float64)
    ids = torch.randint(0, 97, (1, 90), generator=torch.Generator().manual_seed(2))
    full = model(ids).logits
    assert (full - exact(ids).logits).abs().max() > 1e-4           # the family approximates: not exact attention
    cache = transformers.DynamicCache(config=model.config)
    pieces, start = [], 0
    for end in (50, 63, 64, 65, 80, 81, 90):                        # a prefill, chunks, single tokens
        pieces.append(model(ids[:, start:end], cache=cache, use_cache=True).logits)
        start = end
    assert (torch.cat(pieces, 1) - full).abs().max() < 1e-10


def test_beam_search_with_a_sparse_family_reorders_the_cache():
    model = _model("llama", "danon", SPARSE["msra"], dtype=torch.float64)
    ids, mask = _prompt(batch=1)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=3)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))


def test_registered_family_names_and_their_keywords():
    assert {"danon", "danon-msra", "danon-ucsa", "danon-dala"} <= set(transformers.AttentionInterface().valid_keys())
    model = _model("llama", "danon-msra", {"block_size": 16, "window": 16})
    ids, _ = _prompt(batch=1, n=70)
    sparse = model(ids).logits
    exact = _model("llama", "sdpa")(ids).logits
    assert (sparse - exact).abs().max() > 1e-4
    name = danon.hf.register("danon-test-wide", attention="msra", block_size=16, window=4096)
    wide = _model("llama", name)(ids).logits                        # a window over every key: exact attention
    assert (wide - exact).abs().max() < 1e-4


def test_bad_options_name_the_keyword():
    model = _model("llama", "danon", {"attention": "msra", "windw": 16})
    ids, _ = _prompt(batch=1)
    with pytest.raises(ValueError, match="windw"):
        model(ids)
    with pytest.raises(ValueError, match="kind must be one of"):
        danon.hf.register("danon-bad", attention="flash")


def test_ucsa_decode_asks_for_the_cache_that_keeps_its_queries():
    model = _model("llama", "danon-ucsa", {"block_size": 16, "local_window_size": 16})
    ids, mask = _prompt(batch=1)
    model(ids)                                                      # a prefill without a cache runs
    with pytest.raises(NotImplementedError, match="cache=danon.SparseCache()"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)


# --- danon.SparseCache: decode steps from the plan state ------------------------------------------------
STATEFUL = dict(SPARSE, ucsa={"attention": "ucsa", "block_size": 16, "local_window_size": 16, "global_tokens": 16,
                              "top_k_blocks": 1})


@pytest.mark.parametrize("family", list(STATEFUL))
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_sparse_cache_generates_the_full_sequence_tokens(name, family):
    """Batch 2 with left padding; every decode step runs from the cache's plan state, not from all keys."""
    cache = danon.SparseCache()
    _assert_cached_generation_equals_full(_model(name, "danon", STATEFUL[family], dtype=torch.float64), cache=cache)
    assert cache.local_calls() == 29 * 2                            # 29 decode steps, 2 layers
    assert 0 < cache.summary_bytes() < cache.kv_bytes()


@pytest.mark.parametrize("family", list(STATEFUL))
def test_sparse_cache_chunks_and_steps_equal_one_call(family):
    model = _model("llama", "danon", STATEFUL[family], dtype=torch.float64)
    ids = torch.randint(0, 97, (1, 90), generator=torch.Generator().manual_seed(2))
    full = model(ids).logits
    cache = danon.SparseCache()
    pieces, start = [], 0
    with torch.no_grad():                                           # inference: the steps run from the state
        for end in (50, 70, 71, 72, 80, 81, 90):                    # a prefill, a chunk across blocks, steps
            pieces.append(model(ids[:, start:end], cache=cache, use_cache=True).logits)
            start = end
    assert (torch.cat(pieces, 1) - full).abs().max() < 1e-10
    assert cache.local_calls() == 2 * 5                             # the 5 calls inside one block, 2 layers


@pytest.mark.parametrize("family", ["msra", "ucsa"])
def test_sparse_cache_follows_beam_search(family):
    model = _model("llama", "danon", STATEFUL[family], dtype=torch.float64)
    ids, mask = _prompt(batch=1)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=3)
    cache = danon.SparseCache()
    assert torch.equal(model.generate(ids, cache=cache, **kw), model.generate(ids, use_cache=False, **kw))
    assert cache.local_calls() > 0


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
def test_sparse_cache_with_sliding_and_softcapped_layers(name):
    """Mistral's sliding window and Gemma2's softcap run exact banded / exact attention beside the cache."""
    model = _model(name, "danon", STATEFUL["msra"], dtype=torch.float64)
    ids, mask = _prompt()
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(model.generate(ids, cache=danon.SparseCache(), **kw), model.generate(ids, use_cache=False, **kw))


def test_sparse_cache_below_min_seq_len_runs_exact_and_keeps_ucsa_queries():
    options = dict(STATEFUL["ucsa"], min_seq_len=45)
    model = _model("llama", "danon", options, dtype=torch.float64)
    ids, mask = _prompt(batch=1)                                     # 37 tokens: exact until 45 keys
    kw = dict(attention_mask=mask, max_new_tokens=20, do_sample=False)
    cache = danon.SparseCache()
    assert torch.equal(model.generate(ids, cache=cache, **kw), model.generate(ids, use_cache=False, **kw))
    assert cache.local_calls() == 2 * (56 - 45 + 1)                  # the steps with 45 .. 56 keys, 2 layers


@pytest.mark.parametrize("family", ["msra", "ucsa"])
def test_training_through_a_sparse_cache_gives_the_full_forwards_gradients(family):
    """Tracked calls run the full path and the cache concatenates: the gradients of a prefill and steps through
    the cache equal those of one full forward."""
    model = _model("llama", "danon", STATEFUL[family], dtype=torch.float64)
    ids = torch.randint(0, 97, (1, 60), generator=torch.Generator().manual_seed(3))
    weights = torch.randn(1, 60, 97, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    grads = []
    for chunks in ([60], [40, 41, 42, 60]):
        model.zero_grad()
        cache, pieces, start = danon.SparseCache(), [], 0
        for end in chunks:
            pieces.append(model(ids[:, start:end], cache=cache, use_cache=True).logits)
            start = end
        (torch.cat(pieces, 1) * weights).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert max(float((a - b).abs().max()) for a, b in zip(*grads)) < 1e-10


def test_sparse_cache_refuses_to_crop():
    cache = danon.SparseCache()
    cache.update(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), 0)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(3)


def test_a_static_cache_is_refused_not_misaligned():
    model = _model("llama", "danon-msra", {"block_size": 16, "window": 16})
    ids, mask = _prompt(batch=1)
    with pytest.raises(NotImplementedError, match="DynamicCache"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, cache_implementation="static")


def test_attention_terms_the_op_lacks_are_refused_not_dropped():
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(NotImplementedError, match="attention sinks"):
        danon.hf.attention_forward(torch.nn.Module(), q, q[:, :2], q[:, :2], None, s_aux=torch.zeros(4))
