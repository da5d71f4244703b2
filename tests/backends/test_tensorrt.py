"""target="tensorrt": one clear error without torch-tensorrt or CUDA; the decomposed graph TensorRT would get."""
import importlib.util

import pytest
import torch

import danon
from danon.kernels.aten import attention_aten
from danon.backends.tensorrt import decompose_for_tensorrt, missing_requirements

HAVE_TRT = importlib.util.find_spec("torch_tensorrt") is not None and torch.cuda.is_available()


@pytest.mark.skipif(HAVE_TRT, reason="torch-tensorrt and CUDA are present: the error cannot happen")
def test_missing_tensorrt_is_one_clear_error_at_compile_time():
    f = lambda q: torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)  # noqa: E731
    compiled = torch.compile(f, backend="danon", options={"target": "tensorrt"})
    with pytest.raises(Exception) as info:
        compiled(torch.randn(1, 2, 32, 8))
    text = str(info.value)
    assert 'pip install "danon[tensorrt]"' in text
    for what in missing_requirements():
        assert what in text
    assert "danon target='tensorrt' needs" in text


def _plans():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 100, 8, generator=g)
    k = torch.randn(1, 2, 100, 8, generator=g)
    v = torch.randn(1, 2, 100, 8, generator=g)
    kpm = torch.ones(1, 100, dtype=torch.bool)
    kpm[0, 80:] = False
    small = dict(block_size=16, causal=True)
    return q, k, v, kpm, {
        "msra": danon.attention_plan(q, k, v, kind="msra", window=16, num_levels=2, key_padding_mask=kpm, **small),
        "ucsa": danon.attention_plan(q, k, v, kind="ucsa", local_window_size=16, global_tokens=16, top_k_blocks=1,
                                     **small),
        "dala": danon.attention_plan(q, k, v, kind="dala", window=16, memory_size=8, **small),
        "band": danon.attention_plan(q, k, v, kind="exact", sliding_window=20, **small),
        "dense": danon.attention_plan(q, k, v, kind="exact", key_padding_mask=kpm, **small),
    }


def _args(q, k, v, plan, kpm, softcap=None):
    return (q, k, v, plan.block_idx, plan.token_idx, plan.summary_idx, plan.summary_k, plan.summary_v,
            plan.summary_count, plan.summary_pos, kpm, None, plan.slopes, 0.3, plan.causal, plan.block_size,
            -1 if plan.window is None else plan.window, -1 if plan.band is None else plan.band, softcap)


@pytest.mark.parametrize("kind", ["msra", "ucsa", "dala", "band", "dense", "dense-softcap"])
def test_aten_decomposition_equals_the_op(kind):
    q, k, v, kpm, plans = _plans()
    plan = plans[kind.split("-")[0]]
    args = _args(q, k, v, plan, kpm if kind in ("msra", "dense", "dense-softcap") else None,
                 softcap=2.0 if kind == "dense-softcap" else None)
    want_out, want_lse = torch.ops.danon.attention(*args)
    out, lse = attention_aten(*args)
    assert float((out - want_out).norm() / want_out.norm()) < 1e-5
    finite = torch.isfinite(want_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert torch.allclose(lse[finite], want_lse[finite], atol=1e-5)


@pytest.mark.parametrize("family", ["msra", pytest.param("dala", marks=pytest.mark.slow), "ucsa"])
def test_graph_handed_to_tensorrt_runs_in_eager_and_equals_the_op(family):
    """What compile_tensorrt passes to torch_tensorrt: no danon op, same outputs as the model."""
    torch.manual_seed(0)
    kw = {"msra": dict(window=32, num_levels=2), "dala": dict(window=32, memory_size=16),
          "ucsa": dict(local_window_size=32, global_tokens=16, top_k_blocks=2)}[family]
    model = getattr(danon, f"create_{family}_model")(hidden_size=32, num_heads=4, num_kv_heads=2, num_layers=1,
                                                     vocab_size=97, block_size=16, **kw).eval()
    ids = torch.randint(0, 97, (1, 100))
    captured = {}

    def backend(gm, example_inputs):
        captured["program"] = decompose_for_tensorrt(gm, example_inputs)
        captured["inputs"] = example_inputs
        return gm.forward
    with torch.no_grad():
        want = torch.compile(model, backend=backend, dynamic=False)(ids)
        program = captured["program"]
        assert not any("danon" in str(n.target) for n in program.graph.nodes)
        got = program.module()(*captured["inputs"])
    got = got[0] if isinstance(got, (tuple, list)) else got
    assert float((got - want).norm() / want.norm()) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TRT, reason="needs CUDA and torch-tensorrt")
def test_tensorrt_target_runs_a_model():
    torch.manual_seed(0)
    model = danon.create_msra_model(hidden_size=64, num_heads=4, num_layers=2, vocab_size=97, block_size=16,
                                    window=32).eval().cuda()
    ids = torch.randint(0, 97, (1, 256), device="cuda")
    with torch.no_grad():
        want = model(ids)
        got = torch.compile(model, backend="danon", options={"target": "tensorrt"}, dynamic=False)(ids)
    assert float((got.float() - want.float()).norm() / want.float().norm()) < 2e-3
