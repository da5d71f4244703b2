"""`danon explain ... --plot DIR` and danon.visualization: plan pictures agree with the plans, attention weights
are the model's own."""
import argparse

import pytest
import torch

import danon
from danon.cli_bench import add_explain_parser
from danon.visualization import CATEGORIES, AttentionVisualizer, capture_plans, plan_grid

matplotlib_image = pytest.importorskip("matplotlib.image")

TINY = ["--model-arg", "hidden_size=32", "--model-arg", "num_heads=2", "--model-arg", "num_layers=2",
        "--model-arg", "vocab_size=50"]


def _run_explain(argv):
    parser = argparse.ArgumentParser(prog="danon")
    add_explain_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["explain", *argv])
    return args.func(args)


@pytest.mark.parametrize("family", ["ucsa", "msra", "dala"])
def test_explain_prints_the_report_and_plots_one_png_per_site(family, tmp_path, capsys):
    out = tmp_path / "plots"
    assert _run_explain(["danon:create_dense_model", "--seq-len", "512", "--attention", family, *TINY,
                         "--plot", str(out), "--json", str(tmp_path / "r.json")]) == 0
    text = capsys.readouterr().out
    assert "danon compile report: 2 of 2 attention sites replaced" in text
    assert text.count(f"  {family}  ") == 2 and "GFLOP before" in text
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == [f"plan_00_{family}.png", f"plan_01_{family}.png"]
    for p in pngs:
        image = matplotlib_image.imread(str(p))
        assert image.ndim == 3 and min(image.shape[:2]) > 100 and image.std() > 0


def test_explain_plots_a_family_models_own_layers(tmp_path, capsys):
    out = tmp_path / "plots"
    assert _run_explain(["danon:create_msra_model", "--seq-len", "256", *TINY, "--model-arg", "block_size=16",
                         "--model-arg", "window=32", "--plot", str(out)]) == 0
    assert "wrote 2 plan picture(s)" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.png")) == ["plan_00_msra.png", "plan_01_msra.png"]


def _grid_coverage(plan, compression_factor=4) -> dict:
    """plan_coverage's measure (last row of each query block, keys weighted by block) read off the picture."""
    grid = plan_grid(plan, compression_factor=compression_factor)
    idx = {name: i for i, name in enumerate(CATEGORIES)}
    visible = (grid != idx["masked"]).sum().item()
    exact = ((grid == idx["exact"]) | (grid == idx["selected"])).sum().item()
    summary = (grid == idx["summary"]).sum().item()
    return {"exact": exact / visible, "summary": summary / visible, "skipped": 1 - (exact + summary) / visible}


@pytest.mark.parametrize("kind,options", [
    ("ucsa", dict(local_window_size=64, global_tokens=32, top_k_blocks=2)),
    ("ucsa", dict(local_window_size=32, global_tokens=0, top_k_blocks=1, compress=False)),
    ("msra", dict(window=32, num_levels=2, compression_factor=2)),
    ("msra", dict(window=16, num_levels=1)),
    ("exact", {}),
])
def test_plan_picture_matches_plan_coverage(kind, options):
    torch.manual_seed(0)
    q = torch.randn(1, 2, 512, 16)   # full blocks, causal: the picture's cells are plan_coverage's units
    plan = danon.attention_plan(q, q, q, kind=kind, causal=True, block_size=16, **options)
    plan_cov = danon.plan_coverage(plan)
    grid_cov = _grid_coverage(plan, options.get("compression_factor", 4))
    for key in ("exact", "summary", "skipped"):
        assert grid_cov[key] == pytest.approx(plan_cov[key], abs=1e-9), (key, grid_cov, plan_cov)


def test_capture_plans_sees_runtime_plans_only():
    q = torch.randn(1, 1, 64, 8)
    with capture_plans() as plans:
        danon.ucsa_attention(q, q, q, causal=True, block_size=16, local_window_size=16, global_tokens=16,
                             top_k_blocks=1)
        danon.attention_plan(q, q, kind="dala", block_size=16, window=16)
    assert [p.kind for p in plans] == ["ucsa", "dala"]
    with capture_plans() as plans:   # compiled, the plan is built by danon::plan at run time: recorded once per
        compiled = torch.compile(lambda x: danon.msra_attention(x, x, x, block_size=16, window=16, num_levels=1),
                                 backend="eager")          # call, never while Dynamo traces (fake tensors)
        compiled(q)
        compiled(q)
    assert [p.kind for p in plans] == ["msra", "msra"]
    assert all(not isinstance(p.summary_idx, torch._subclasses.FakeTensor) for p in plans)
    with capture_plans() as plans:
        pass
    danon.ucsa_attention(q, q, q, block_size=16)   # restored after the block
    assert plans == []


@pytest.mark.parametrize("factory", ["create_dense_model", "create_ucsa_model"])
def test_attention_weights_reproduce_the_layers_exact_output(factory):
    """W @ v of one head equals that head's slice of the dense model's attention output (what o_proj receives)."""
    torch.manual_seed(0)
    model = getattr(danon, factory)(hidden_size=32, num_heads=4, num_kv_heads=2, num_layers=2, vocab_size=50).eval()
    ids = torch.randint(0, 50, (1, 40))
    layer = model.layers[1].attention
    seen = {}
    hooks = [layer.v_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("v", o)),
             layer.o_proj.register_forward_pre_hook(lambda m, i: seen.__setitem__("out", i[0]))]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    viz = AttentionVisualizer(model)
    d = layer.head_dim
    for head in (0, 3):
        w = viz.attention_weights(layer_idx=1, head_idx=head, input_ids=ids)
        assert w.shape == (40, 40)
        assert torch.allclose(w.sum(-1), torch.ones(40, dtype=w.dtype))
        assert w.triu(1).abs().max() == 0          # causal
        kv = head // 2
        v = seen["v"][0, :, kv * d:(kv + 1) * d].double()
        got = w @ v   # UCSA approximates the dense weights, but at N = 40 (inside its window) it is exact
        want = seen["out"][0, :, head * d:(head + 1) * d].double()
        assert (got - want).norm() / want.norm() < 1e-5


def test_plot_attention_weights_writes_a_png_and_checks_its_arguments(tmp_path):
    model = danon.create_dense_model(hidden_size=32, num_heads=2, num_layers=1, vocab_size=50)
    viz = AttentionVisualizer(model)
    path = viz.plot_attention_weights(0, 1, seq_len=24, path=str(tmp_path / "w.png"))
    assert matplotlib_image.imread(path).std() > 0
    with pytest.raises(ValueError, match="layer_idx must be in 0..0"):
        viz.attention_weights(1, 0)
    with pytest.raises(ValueError, match="head_idx must be in 0..1"):
        viz.attention_weights(0, 2)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        AttentionVisualizer("model")


def test_attention_weights_of_a_transformers_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_head=2, n_layer=2, vocab_size=50, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    before = model.config._attn_implementation
    w = AttentionVisualizer(model).attention_weights(1, 1, seq_len=20)
    assert w.shape == (20, 20) and torch.allclose(w.sum(-1), torch.ones(20))
    assert w.triu(1).abs().max() == 0
    assert model.config._attn_implementation == before    # the eager switch is undone
    assert AttentionVisualizer(model).attention_weights(1, 1, input_ids=torch.arange(20)[None]).shape == (20, 20)
