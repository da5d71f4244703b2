"""The danon torch.compile backend on SDPA sites: replaced, reported, and equal to eager."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import danon



def _rel(a, b):
    return float((a - b).norm() / b.norm())


class SDPA(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, q, k, v, mask=None):
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, **self.kw)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.kw)


def _qkv(H=4, Hkv=4, N=64, D=16, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(2, h, N, D, generator=g) for h in (H, Hkv, Hkv)]
    return [x.requires_grad_(grad) for x in t]


CASES = {
    "causal": (dict(is_causal=True), None, 4),
    "no mask": (dict(), None, 4),
    "bool mask": (dict(), "bool", 4),
    "float mask": (dict(), "float", 4),
    "scale": (dict(is_causal=True, scale=0.3), None, 4),
    "gqa": (dict(is_causal=True, enable_gqa=True), None, 2),
    "dropout 0": (dict(dropout_p=0.0, is_causal=True), None, 4),
}


def _mask(kind, N=64):
    g = torch.Generator().manual_seed(1)
    if kind == "bool":
        m = torch.rand(2, 1, N, N, generator=g) > 0.3
        m[..., 0] = True
        return m
    if kind == "float":
        return torch.randn(1, 4, N, N, generator=g)
    return None


@pytest.mark.parametrize("case", list(CASES))
def test_sdpa_sites_run_exact_and_equal_eager(case):
    kw, mask_kind, Hkv = CASES[case]
    module = SDPA(**kw)
    q, k, v = _qkv(Hkv=Hkv, grad=True)
    mask = _mask(mask_kind)
    args = (q, k, v) if mask is None else (q, k, v, mask)
    expected = module(*args)
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    report = danon.explain(module, *args, target="eager")
    assert [s.replaced for s in report.sites] == [True], str(report)
    assert report.sites[0].family == "exact"
    assert report.sites[0].mask == ("causal" if kw.get("is_causal") else "none" if mask is None else "general")
    compiled = torch.compile(module, backend="danon", options={"target": "eager"})
    out = compiled(*args)
    assert _rel(out, expected) < 1e-5
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for g, e in zip(grads, expected_grads):
        assert _rel(g, e) < 1e-5


def test_inductor_target_compiles_the_rewritten_graph():
    module = SDPA(is_causal=True, enable_gqa=True)
    q, k, v = _qkv(Hkv=2)
    out = torch.compile(module, backend="danon")(q, k, v)
    assert _rel(out, module(q, k, v)) < 1e-5


def test_sparse_family_applies_and_equals_the_functional_op():
    module = SDPA(is_causal=True)
    q, k, v = _qkv(N=512)
    options = dict(attention="msra", window=64, block_size=16, num_levels=2, min_seq_len=0, target="eager")
    report = danon.explain(module, q, k, v, **options)
    assert report.sites[0].family == "msra" and report.sites[0].replaced
    assert report.sites[0].flops_after < report.sites[0].flops_before / 2
    out = torch.compile(module, backend="danon", options=options)(q, k, v)
    expected = danon.msra_attention(q, k, v, causal=True, window=64, block_size=16, num_levels=2)
    assert torch.allclose(out, expected, atol=1e-6)
    assert _rel(out, module(q, k, v)) > 1e-3      # genuinely sparse, not exact


def test_short_sequences_stay_exact_below_min_seq_len():
    module = SDPA(is_causal=True)
    q, k, v = _qkv(N=128)
    options = dict(attention="dala", target="eager")           # min_seq_len defaults to 2048
    report = danon.explain(module, q, k, v, **options)
    assert "min_seq_len" in report.sites[0].reason
    out = torch.compile(module, backend="danon", options=options)(q, k, v)
    assert _rel(out, module(q, k, v)) < 1e-5


def test_general_mask_with_a_sparse_family_runs_exact():
    module = SDPA()
    q, k, v = _qkv()
    report = danon.explain(module, q, k, v, _mask("float"), attention="ucsa", min_seq_len=0, target="eager")
    assert report.sites[0].family == "exact" and "mask" in report.sites[0].reason


def test_kept_sites_say_why():
    q, k, v = _qkv()
    report = danon.explain(SDPA(dropout_p=0.1, is_causal=True), q, k, v, target="eager")
    assert not report.sites[0].replaced and "dropout" in report.sites[0].reason
    report = danon.explain(SDPA(is_causal=True), q, k, v, attention="keep", target="eager")
    assert not report.sites[0].replaced and "keep" in report.sites[0].reason
    text = str(report)
    assert "kept" in text and "0 of 1" in text
    assert report.to_dict()["sites"][0]["source"] == "sdpa"


def test_bad_options_fail_at_compile_time_naming_the_key():
    q, k, v = _qkv()
    with pytest.raises(Exception, match="atention"):
        torch.compile(SDPA(), backend="danon", options={"atention": "msra"})(q, k, v)
    with pytest.raises(Exception, match="attention"):
        torch.compile(SDPA(), backend="danon", options={"attention": "sparse"})(q, k, v)
    with pytest.raises(Exception, match="window"):
        torch.compile(SDPA(), backend="danon", options={"attention": "msra", "window": -3})(q, k, v)
    with pytest.raises(Exception, match="local_window_size"):
        torch.compile(SDPA(), backend="danon", options={"attention": "msra", "local_window_size": 64})(q, k, v)


def test_dynamic_sequence_length_compiles_once():
    module = SDPA(is_causal=True)
    compiled_graphs = []

    def backend(gm, example_inputs):
        compiled_graphs.append(gm)
        return danon.danon_backend(gm, example_inputs, {"target": "eager"})

    compiled = torch.compile(module, backend=backend, dynamic=True)
    for n in (64, 80, 100):
        q, k, v = _qkv(N=n)
        assert _rel(compiled(q, k, v), module(q, k, v)) < 1e-5
    assert len(compiled_graphs) == 1


RECOMPILE_LIMIT_AT_IMPORT = torch._dynamo.config.recompile_limit


def test_explain_says_when_nothing_was_compiled():
    module = SDPA(is_causal=True)
    q, k, v = _qkv()
    with torch._dynamo.config.patch(recompile_limit=1):
        danon.explain(module, q, k, v, target="eager")
        with pytest.raises(RuntimeError, match="reset"):
            danon.explain(module, q, k, v, attention="keep", target="eager")


def test_a_config_patch_in_one_test_leaves_the_next_test_the_default():
    """The previous test lowers the recompile limit: it must be back for everything after it (a
    monkeypatch of a torch config module is not undone under pytest >= 9, and every later compile
    then failed)."""
    assert torch._dynamo.config.recompile_limit == RECOMPILE_LIMIT_AT_IMPORT


def test_backend_by_name_in_a_fresh_interpreter():
    code = ("import torch, torch.nn.functional as F, sys\n"
            "f = lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=True)\n"
            "q = torch.randn(1, 2, 64, 8)\n"
            "out = torch.compile(f, backend='danon', options={'target': 'eager'})(q)\n"
            "assert 'danon' not in sys.modules or torch.allclose(out, f(q), atol=1e-6)\n"
            "print('ok', torch.allclose(out, f(q), atol=1e-6))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok True"


def test_a_danon_dense_model_compiles_with_a_sparse_family(monkeypatch):
    torch.manual_seed(0)
    model = danon.create_dense_model(hidden_size=64, num_heads=4, num_layers=2, vocab_size=100).eval()
    with torch.no_grad():        # sharper attention than at init, so that what MSRA summarises matters
        for layer in model.layers:
            layer.attention.q_proj.weight.mul_(8)
    ids = torch.randint(0, 100, (1, 256))
    family = dict(window=32, block_size=16, num_levels=2)
    options = dict(attention="msra", min_seq_len=0, target="eager", **family)
    with torch.no_grad():
        report = danon.explain(model, ids, **options)
        assert len(report.sites) == 2 and all(s.family == "msra" for s in report.sites), str(report)
        out = torch.compile(model, backend="danon", options=options)(ids)
        exact = torch.compile(model, backend="danon", options={"target": "eager"})(ids)
        dense = model(ids)
        # the reference: the same model with its attention calling the functional op directly
        monkeypatch.setattr(danon.nn.SelfAttention, "_attend", lambda self, q, k, v, kpm, hidden:
                            danon.msra_attention(q, k, v, causal=self.causal, **family))
        reference = model(ids)
    assert _rel(exact, dense) < 1e-5
    assert _rel(out, reference) < 1e-5
    assert _rel(out, dense) > 1e-4                # genuinely sparse (the residual stream dominates logits)


def test_symbolic_float_scale_under_dynamic_true_is_replaced_and_guarded():
    """dynamic=True turns a module's float attribute into a SymFloat: the site is still replaced, and
    changing the attribute recompiles instead of reusing the old scale."""
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scaling = 0.25

        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q, is_causal=True, scale=self.scaling)

    model, reports = Scaled(), []

    def backend(gm, example_inputs):
        with danon.backend.collect_reports() as report:
            compiled = danon.danon_backend(gm, example_inputs, {"target": "inductor"})
        reports.append(report)
        return compiled

    compiled = torch.compile(model, backend=backend, dynamic=True)
    for n, scaling in ((40, 0.25), (56, 0.25), (56, 0.5)):
        model.scaling = scaling
        q = torch.randn(1, 2, n, 8)
        torch.testing.assert_close(compiled(q), model(q), rtol=1e-5, atol=1e-6)
    assert len(reports) == 2                      # one graph for both lengths, one more for the new scale
    assert all(site.replaced for report in reports for site in report.sites)


def test_sparse_family_under_dynamic_shapes_compiles_with_inductor_at_bounded_lengths():
    # A bounded sequence length (a position table's size) once made Inductor's CPU loop split of the plan
    # builder's t // c^3 fail ("Invalid ranges [0:-1]"): danon/backends/inductor.py skips that split.
    class BoundedLength(torch.nn.Module):
        def forward(self, q, k, v):
            torch._check(q.shape[2] <= 1000)      # < 64 blocks of 16: floor(blocks / 4^3) can only be 0
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    kw = dict(window=32, num_levels=3, compression_factor=4, block_size=16)
    compiled = torch.compile(BoundedLength(), backend="danon", dynamic=True,
                             options=dict(attention="msra", min_seq_len=0, **kw))
    q, k, v = _qkv(N=300)
    with torch.no_grad():
        assert _rel(compiled(q, k, v), danon.msra_attention(q, k, v, causal=True, **kw)) < 1e-5


def test_explain_passes_keyword_inputs_to_a_transformers_model_and_options_to_danon():
    """A padded batch of a transformers model, explained with its own keywords: the mask reaches the model
    (the sites see key padding) and the family applies; the dict form and the old positional form agree."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=101, use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 101, (2, 128))
    mask = torch.ones(2, 128, dtype=torch.long)
    mask[1, :40] = 0
    family = dict(attention="msra", min_seq_len=0, target="eager", window=32, block_size=16, num_levels=2)
    with torch.no_grad():
        by_name = danon.explain(model, input_ids=ids, attention_mask=mask, **family)
        torch._dynamo.reset()
        by_dict = danon.explain(model, input_ids=ids, attention_mask=mask, options=family)
        torch._dynamo.reset()
        positional = danon.explain(model, ids, None, **family)          # (input_ids, attention_mask=None)
    for report in (by_name, by_dict):
        assert [(s.family, s.mask) for s in report.sites] == [("msra", "causal+key_padding")] * 2, str(report)
    assert [(s.family, s.mask) for s in positional.sites] == [("msra", "causal")] * 2, str(positional)


def test_explain_names_a_keyword_that_is_neither_an_option_nor_an_input_or_is_both():
    class Windowed(torch.nn.Module):
        def forward(self, q, window=None):
            return F.scaled_dot_product_attention(q, q, q, is_causal=True)

    q = torch.randn(1, 2, 64, 8)
    with pytest.raises(TypeError, match="'atention' is neither a danon option .* nor a parameter of Windowed.forward"):
        danon.explain(Windowed(), q, atention="msra")
    with pytest.raises(TypeError, match="'window' is both a danon option and a parameter of Windowed.forward"):
        danon.explain(Windowed(), q, window=3)
    report = danon.explain(Windowed(), q, window=3, options={"target": "eager"})   # window goes to the model
    assert len(report.sites) == 1


@pytest.mark.slow   # about 46 s (an ONNX export and a sharded run); export and sharding have fast tests of their own
def test_backend_export_and_shard_plan_run_one_pass_list(monkeypatch, tmp_path):
    """danon_backend, danon.export and danon.shard_plan all run danon/passes/pipeline.py's PASSES through one
    driver: the options a pass reads reach it from each of them (export once ran the attention pass alone
    and dropped quantize=)."""
    import dataclasses

    from danon.export import export
    from danon.passes import pipeline

    seen = []

    def spied(p):
        def apply(gm, state):
            seen.append((p.name, state.config.attention, state.config.quantize))
            return p.apply(gm, state)
        return dataclasses.replace(p, apply=apply)

    monkeypatch.setattr(pipeline, "PASSES", tuple(spied(p) for p in pipeline.PASSES))
    model = danon.create_dense_model(hidden_size=32, num_heads=2, num_layers=1, vocab_size=50).eval()
    model.requires_grad_(False)          # quantize is for inference graphs
    ids = torch.randint(0, 50, (1, 64))

    report = danon.explain(model, ids, options={"attention": "msra", "min_seq_len": 0, "window": 16,
                                                "block_size": 16, "quantize": "int8-weight", "target": "eager"})
    assert seen and set(seen) == {("attention", "msra", "int8-weight"), ("quantize", "msra", "int8-weight")}
    assert report.linears and report.sites[0].family == "msra"

    seen.clear()
    export(model, (ids,), str(tmp_path / "m.onnx"), attention="msra", window=16, block_size=16, check=False)
    assert seen == [("attention", "msra", "none")]

    seen.clear()
    plan = danon.shard_plan(model, ids, world_size=2)
    assert {name for name, *_ in seen} == {"shard"} and len(plan.sharded) == 2   # decisions only: no rewrite
