"""Weight quantization (danon/passes/weight_quantization.py, danon.quantize): torchao int8 weight-only linear layers.

Weight bytes are counted from the torchao tensors the compiled graph reads (data, scales, zero points);
errors are ||logits - fp32 logits|| / ||fp32 logits|| on fresh random weights and inputs.
"""
import pytest
import torch

import danon
from danon.backend import collect_reports
from danon.quantize import quantize

VOCAB = 128


def _danon_model():
    torch.manual_seed(0)
    return danon.create_dense_model(hidden_size=128, num_heads=4, num_layers=2, vocab_size=VOCAB,
                                    max_sequence_length=256).eval()


def _llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=256, attn_implementation="sdpa")).eval()


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _ids(n=64):
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(2))


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def compile_quantized(model, ids, **options):
    torch._dynamo.reset()
    with torch.no_grad():
        ref = _logits(model(ids))
        with collect_reports() as report:
            fn = torch.compile(model, backend="danon", options={"quantize": "int8-weight", **options})
            out = _logits(fn(ids))
        again = _logits(fn(ids))          # the quantized weights ride along with every call
    assert torch.equal(out, again)
    return out, ref, report


@pytest.mark.parametrize("make_model, target", [(_danon_model, "inductor"), (_llama, "eager")],
                         ids=["danon-inductor", "llama-eager"])
def test_int8_weights_shrink_3_5x_and_logits_stay_close(make_model, target):
    model = make_model()
    params_before = {n: p.clone() for n, p in model.named_parameters()}
    out, ref, report = compile_quantized(model, _ids(), target=target)
    rows = report.linears
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {r.name for r in rows} == names            # one row per linear layer, under its module name
    assert all(r.quantized for r in rows)
    for r in rows:
        assert r.bytes_before / r.bytes_after >= 3.5, r
    assert _rel(out, ref) < 2e-2
    for n, p in model.named_parameters():            # the user's parameters are untouched
        assert type(p) is torch.nn.Parameter and torch.equal(p, params_before[n])


def test_skip_patterns_keep_layers_in_full_precision():
    model = _danon_model()
    out, ref, report = compile_quantized(model, _ids(), target="eager", quantize_skip=["lm_head", "layers.1.*"])
    rows = {r.name: r for r in report.linears}
    assert not rows["lm_head"].quantized and "quantize_skip pattern 'lm_head'" in rows["lm_head"].reason
    assert not rows["layers.1.mlp.0"].quantized and "'layers.1.*'" in rows["layers.1.mlp.0"].reason
    assert rows["layers.1.mlp.0"].bytes_after == rows["layers.1.mlp.0"].bytes_before
    assert all(r.quantized for n, r in rows.items() if n.startswith("layers.0."))
    assert _rel(out, ref) < 2e-2


def test_min_features_keeps_small_layers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 32),
                                torch.nn.GELU(), torch.nn.Linear(32, 256)).eval()
    x = torch.randn(4, 256)
    torch._dynamo.reset()
    with torch.no_grad(), collect_reports() as report:
        out = torch.compile(model, backend="danon", options={"quantize": "int8-weight", "quantize_min_features": 64,
                                                             "target": "eager"})(x)
        ref = model(x)
    rows = {r.name: r for r in report.linears}
    assert rows["0"].quantized and not rows["2"].quantized and not rows["4"].quantized
    assert rows["2"].reason == "smaller than quantize_min_features=64"
    assert _rel(out, ref) < 2e-2


def test_tolerance_keeps_the_output_error_within_it():
    model = _danon_model()
    ids = _ids()
    full, ref, _ = compile_quantized(model, ids, target="eager")
    all_error = _rel(full, ref)
    tolerance = all_error / 3
    out, ref, report = compile_quantized(model, ids, target="eager", quantize_tolerance=tolerance)
    rows = report.linears
    kept = [r for r in rows if not r.quantized]
    assert 0 < len(kept) < len(rows)                   # the tolerance bites, and some layers still fit
    assert all(r.error is not None for r in rows)
    assert _rel(out, ref) <= tolerance                 # measured on the compiled model itself
    assert all("sensitive" in r.reason for r in kept)


def test_training_mode_raises_a_clear_error():
    model = _danon_model()
    fn = torch.compile(model, backend="danon", options={"quantize": "int8-weight", "target": "eager"})
    with pytest.raises(Exception, match=r"quantize='int8-weight' is for inference.*torch.no_grad"):
        fn(_ids())


def test_bad_mode_names_raise_clear_errors():
    with pytest.raises(ValueError, match=r"'quantize' must be one of none, int8-weight, fp8-weight; got 'int4'"):
        danon.DanonConfig.from_options({"quantize": "int4"})
    with pytest.raises(ValueError, match=r"mode must be one of int8-weight, fp8-weight; got 'int8'"):
        quantize(torch.nn.Linear(8, 8), "int8")
    with pytest.raises(ValueError, match="tolerance needs example_inputs"):
        quantize(torch.nn.Linear(8, 8), "int8-weight", tolerance=0.1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error off CUDA")
def test_fp8_off_cuda_raises_a_clear_error():
    with pytest.raises(ValueError, match=r"fp8-weight' needs a CUDA GPU with compute capability >= 8.9"):
        quantize(torch.nn.Linear(64, 64), "fp8-weight")
    model = _danon_model()
    with torch.no_grad(), pytest.raises(Exception, match="compute capability >= 8.9"):
        torch.compile(model, backend="danon", options={"quantize": "fp8-weight", "target": "eager"})(_ids())


def test_danon_quantize_on_a_module_matches_the_compiled_decision():
    model = _llama()
    ids = _ids()
    with torch.no_grad():
        ref = _logits(model(ids))
    report = quantize(model, "int8-weight", example_inputs=(ids,), skip="lm_head")
    rows = {r.name: r for r in report.layers}
    assert not rows["lm_head"].quantized
    assert all(r.quantized for n, r in rows.items() if n != "lm_head")
    assert type(model.lm_head.weight) is torch.nn.Parameter
    q = model.model.layers[0].mlp.gate_proj.weight
    assert type(q).__name__ == "Int8Tensor"
    for n, r in rows.items():
        if r.quantized:
            assert r.bytes_before / r.bytes_after >= 3.5
    with torch.no_grad():
        out = _logits(model(ids))
    assert _rel(out, ref) < 2e-2 and report.output_error == pytest.approx(_rel(out, ref), rel=1e-6)
    # and the quantized module still compiles (its weights are torchao tensors now)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = _logits(torch.compile(model, backend="danon", options={"target": "eager"})(ids))
    assert _rel(compiled, out) < 1e-5


def test_danon_quantize_tolerance_on_a_module():
    model = _danon_model()
    ids = _ids()
    with torch.no_grad():
        ref = model(ids)
    everything = quantize(_danon_model(), "int8-weight", example_inputs=ids)
    tolerance = everything.output_error / 3
    report = quantize(model, "int8-weight", example_inputs=ids, tolerance=tolerance)
    assert 0 < report.quantized < len(report.layers)
    with torch.no_grad():
        assert _rel(model(ids), ref) <= tolerance


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="fp8-weight needs CUDA with compute capability >= 8.9")
def test_fp8_weight_on_cuda():
    model = _danon_model().cuda()
    ids = _ids().cuda()
    out, ref, report = compile_quantized(model, ids, quantize="fp8-weight", target="eager")
    assert all(r.quantized and r.bytes_before / r.bytes_after >= 3.5 for r in report.linears)
    assert _rel(out, ref) < 5e-2
