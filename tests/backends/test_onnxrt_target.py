"""target="onnxrt": the rewritten graph exported in memory and run by ONNX Runtime, one session per signature."""
import pytest
import torch

import danon
from danon.backends.onnx import OnnxRuntimeGraph, relative_error

TOL = 1e-4


def _model(family):
    torch.manual_seed(0)
    if family == "dense":
        return danon.create_dense_model(hidden_size=32, num_heads=4, num_kv_heads=2, num_layers=2, vocab_size=97).eval()
    return danon.create_msra_model(hidden_size=32, num_heads=4, num_kv_heads=2, num_layers=1, vocab_size=97,
                                   block_size=16, window=32, num_levels=2).eval()


def _sessions(compiled_calls):
    """The OnnxRuntimeGraph objects the backend returned (spied on the lowering)."""
    return [g for g in compiled_calls if isinstance(g, OnnxRuntimeGraph)]


@pytest.fixture
def spy(monkeypatch):
    from danon.backends import onnx as onnx_backend
    made = []
    real = onnx_backend.compile_onnxrt

    def compile_onnxrt(gm, example_inputs, *a, **kw):
        made.append(real(gm, example_inputs, *a, **kw))
        return made[-1]
    monkeypatch.setattr(onnx_backend, "compile_onnxrt", compile_onnxrt)
    return made


@pytest.mark.parametrize("family,attention", [("dense", "exact"), ("msra", "exact"),
                                              pytest.param("dense", "msra", marks=pytest.mark.slow)])
def test_onnxrt_target_equals_eager(family, attention, spy):
    model = _model(family)
    options = {"target": "onnxrt", "attention": attention, "min_seq_len": 0}
    if attention == "msra":
        options.update(window=32, block_size=16, num_levels=2)
    compiled = torch.compile(model, backend="danon", options=options, dynamic=False)
    ids = torch.randint(0, 97, (1, 160), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = compiled(ids)
        if attention == "exact":
            want = model(ids)
        else:
            want = torch.compile(model, backend="danon", options={**options, "target": "eager"}, dynamic=False)(ids)
    assert _sessions(spy), "the onnxrt lowering was not used"
    assert relative_error(got, want) < TOL


def test_sessions_are_cached_per_input_signature(spy):
    model = _model("dense")
    compiled = torch.compile(model, backend="danon", options={"target": "onnxrt"}, dynamic=False)
    with torch.no_grad():
        for seed in (1, 2):   # same signature, fresh values
            ids = torch.randint(0, 97, (1, 48), generator=torch.Generator().manual_seed(seed))
            assert relative_error(compiled(ids), model(ids)) < TOL
    graphs = _sessions(spy)
    assert len(graphs) == 1 and len(graphs[0].sessions) == 1


def test_second_signature_gets_its_own_session():
    class Attn(torch.nn.Module):
        def forward(self, q):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    gm = torch.fx.symbolic_trace(Attn())
    graph = OnnxRuntimeGraph(gm)
    with torch.no_grad():
        for n in (32, 32, 48):
            q = torch.randn(1, 2, n, 8)
            assert relative_error(graph(q), Attn()(q)) < TOL
    assert len(graph.sessions) == 2


def test_training_call_is_a_clear_error():
    model = _model("dense").train()
    compiled = torch.compile(model, backend="danon", options={"target": "onnxrt"})
    with pytest.raises(Exception, match=r"inference only.*torch.no_grad\(\)"):
        compiled(torch.randint(0, 97, (1, 32)))


def test_llama_onnxrt_equals_eager():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, use_cache=False,
                                   attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 101, (1, 96), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model, backend="danon", options={"target": "onnxrt"}, dynamic=False)(ids).logits
    assert relative_error(got, want) < TOL
