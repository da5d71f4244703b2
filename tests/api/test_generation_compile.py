"""torch.compile(backend="danon") through generation: the decode step and a chunked prefill run the sparse
family (the report says so), give the eager family's logits, and decoding does not recompile per token."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
import danon  # noqa: E402
import danon.hf  # noqa: E402,F401
from danon.backend import collect_reports  # noqa: E402

MSRA = {"attention": "msra", "block_size": 16, "window": 16}


@pytest.mark.slow   # about 40 s (nine compiled steps under dynamic=True): -m slow keeps the default suite within 15 min
def test_prefill_decode_and_chunk_run_the_family_without_a_recompile_per_token(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    eager_config = copy.deepcopy(config)
    eager_config.danon_attention = MSRA
    eager = transformers.LlamaForCausalLM._from_config(eager_config, attn_implementation="danon").eval()
    eager.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend="danon", options={**MSRA, "min_seq_len": 0}, dynamic=True)
    ids = torch.randint(0, 97, (1, 90), generator=torch.Generator().manual_seed(1))
    cuts = (50, 51, 52, 53, 54, 55, 70, 71, 72)
    with torch.no_grad(), collect_reports() as report:
        cache, pieces, start, graphs = transformers.DynamicCache(config=model.config), [], 0, {}
        for end in cuts:
            pieces.append(compiled(ids[:, start:end], cache=cache, use_cache=True).logits)
            graphs[end] = report.graphs
            start = end
        full = eager(ids[:, :cuts[-1]]).logits
    assert (torch.cat(pieces, 1) - full).abs().max() < 1e-5
    # after the first two decode steps (one static, one dynamic graph) no token compiles again
    assert graphs[53] == graphs[54] == graphs[55]
    assert graphs[71] == graphs[72]
    sites = report.to_dict()["sites"]
    decode = [s for s in sites if s["q_shape"][2] == 1]
    chunk = [s for s in sites if 1 < s["q_shape"][2] < s["k_shape"][2]]
    assert decode and chunk
    assert all(s["family"] == "msra" for s in sites), [(s["q_shape"], s["family"], s["reason"]) for s in sites]
    assert {s["mask"] for s in chunk} == {"causal"}          # transformers' bottom-right cache mask, recognised


def test_sparse_cache_under_the_backend_runs_decode_from_the_state_without_recompiling(tmp_path, monkeypatch):
    """attn_implementation="danon" with danon.SparseCache, compiled with backend="danon": the cache's update and
    the state's attention run eagerly (graph breaks), every decode step runs from the state, the tokens are the
    eager full-sequence ones, and a second generation compiles nothing new."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    config.danon_attention = MSRA
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="danon").eval()
    compiled = copy.copy(model)
    compiled.forward = torch.compile(model.forward, backend="danon")
    with collect_reports() as report:
        for n, new in ((40, 8), (53, 12)):
            ids = torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(n))
            cache = danon.SparseCache()
            got = compiled.generate(ids, max_new_tokens=new, do_sample=False, cache=cache)
            assert torch.equal(got, model.generate(ids, max_new_tokens=new, do_sample=False, use_cache=False))
            assert cache.local_calls() == 2 * (new - 1)
            if n == 40:
                warm = report.graphs
    assert warm > 0 and report.graphs == warm
