"""k and v as models hand them over: repeat_kv (GQA by repetition) and concatenation with an empty cache.

The pass must run the site on the un-repeated, un-concatenated tensors (the op does GQA natively),
and only where that is provably the same tensor.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import danon
from danon.sites import attention_site

B, H, HKV, N, D = 2, 4, 2, 40, 16
REP = H // HKV



def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def _qkv(hkv=HKV, n=N, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(B, h, n, D, generator=g) for h in (H, hkv, hkv)]
    return [x.requires_grad_(grad) for x in t]


def repeat_kv(x, n_rep):
    """transformers' repeat_kv, verbatim."""
    batch, num_key_value_heads, slen, head_dim = x.shape
    if n_rep == 1:
        return x
    x = x[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return x.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def tile_kv(x, n_rep):
    """Repeats the kv heads as a tile (head h -> h % Hkv): NOT grouped-query attention's order."""
    b, kv, s, d = x.shape
    return x[:, None].expand(b, n_rep, kv, s, d).reshape(b, n_rep * kv, s, d)


def manual_attention(q, k, v):
    w = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v)


class Attn(nn.Module):
    """k, v through `prepare` (a repeat, a cache), then SDPA (causal) or the hand-written chain."""

    def __init__(self, prepare, kind="sdpa"):
        super().__init__()
        self.prepare, self.kind = prepare, kind

    def forward(self, q, k, v, *cache):
        k, v = self.prepare(k, v, *cache)
        if self.kind == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return manual_attention(q, k, v)


def _repeat(k, v):
    return repeat_kv(k, REP), repeat_kv(v, REP)


def _interleave(k, v):
    return torch.repeat_interleave(k, REP, dim=1), v.repeat_interleave(REP, dim=1)


def _cache_then_repeat(k, v, k_cache, v_cache):
    """What transformers' DynamicCache does on the first step, then repeat_kv."""
    return repeat_kv(torch.cat([k_cache, k], dim=-2), REP), repeat_kv(torch.cat([v_cache, v], dim=-2), REP)


def _legacy_empty_cache(k, v):
    """The empty cache as transformers' graphs have it: torch.tensor([]), which cat skips."""
    empty = torch.tensor([], dtype=k.dtype, device=k.device)
    return torch.cat([empty, k], dim=-2), torch.cat([torch.tensor([], dtype=v.dtype), v], dim=-2)


def _compile_capturing(module, *args, dynamic=None, options=None):
    """Compile with the danon backend through a wrapper that keeps the rewritten graphs."""
    graphs = []

    def backend(gm, example_inputs):
        fn = danon.danon_backend(gm, example_inputs, dict(options or {"target": "eager"}))
        graphs.append(gm)
        return fn

    return torch.compile(module, backend=backend, dynamic=dynamic), graphs


def _calls(gm):
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def _site_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is attention_site]


def _assert_no_repeat_or_cat(gm):
    for n in _calls(gm):
        assert n.target not in ("expand", "reshape", "repeat_interleave"), gm.code
        assert n.target not in (torch.repeat_interleave, torch.cat), gm.code


CASES = {
    # name: (prepare, kind, cache rows or None, source)
    "sdpa repeat_kv": (_repeat, "sdpa", None, "sdpa"),
    "sdpa repeat_interleave": (_interleave, "sdpa", None, "sdpa"),
    "manual repeat_kv": (_repeat, "manual", None, "manual"),
    "manual repeat_interleave": (_interleave, "manual", None, "manual"),
    "sdpa empty cache + repeat_kv": (_cache_then_repeat, "sdpa", 0, "sdpa"),
    "manual empty cache + repeat_kv": (_cache_then_repeat, "manual", 0, "manual"),
    "sdpa torch.tensor([]) cache": (_legacy_empty_cache, "sdpa", None, "sdpa"),
}


def _case_args(name, grad=False):
    prepare, kind, rows, source = CASES[name]
    hkv = H if prepare is _legacy_empty_cache else HKV
    q, k, v = _qkv(hkv=hkv, grad=grad)
    cache = () if rows is None else (torch.zeros(B, hkv, rows, D), torch.zeros(B, hkv, rows, D))
    return Attn(prepare, kind), (q, k, v, *cache), hkv, source


@pytest.mark.parametrize("name", list(CASES))
def test_site_reads_the_unrepeated_uncached_kv(name):
    module, args, hkv, source = _case_args(name)
    report = danon.explain(module, *args, target="eager")
    assert [(s.source, s.replaced) for s in report.sites] == [(source, True)], str(report)
    assert report.sites[0].k_shape == (B, hkv, N, D)
    compiled, graphs = _compile_capturing(module)
    out = compiled(*args)
    assert _rel(out, module(*args)) < 1e-5
    (gm,) = graphs
    (call,) = _site_calls(gm)
    k_node, v_node = call.args[1], call.args[2]
    assert k_node.op == "placeholder" and v_node.op == "placeholder", gm.code      # the inputs themselves
    _assert_no_repeat_or_cat(gm)


@pytest.mark.parametrize("name", ["sdpa repeat_kv", "manual repeat_kv", "manual empty cache + repeat_kv"])
def test_gradients_through_unrepeated_kv_equal_eager(name):
    module, args, hkv, source = _case_args(name, grad=True)
    q, k, v = args[:3]
    expected = module(*args)
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    out = torch.compile(module, backend="danon", options={"target": "eager"})(*args)
    assert _rel(out, expected) < 1e-5
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert grads[1].shape == (B, HKV, N, D)
    for g, e in zip(grads, expected_grads):
        assert _rel(g, e) < 1e-5


def test_inductor_target_with_repeat_kv():
    module, args, _, _ = _case_args("manual empty cache + repeat_kv")
    report = danon.explain(module, *args)
    assert report.sites[0].replaced and report.sites[0].k_shape == (B, HKV, N, D), str(report)
    torch._dynamo.reset()
    out = torch.compile(module, backend="danon")(*args)
    assert _rel(out, module(*args)) < 1e-5


def test_dynamic_sequence_length_keeps_seeing_through_repeat_kv():
    module = Attn(_repeat, "sdpa")
    compiled, graphs = _compile_capturing(module, dynamic=True)
    for n in (32, 48, 56):
        q, k, v = _qkv(n=n)
        assert _rel(compiled(q, k, v), module(q, k, v)) < 1e-5
    assert len(graphs) == 1
    _assert_no_repeat_or_cat(graphs[0])


# ----------------------------------------------------------------------------------------------
# Not provably the same tensor: left as they are (the site still runs, on the tensors as given)


def _nonempty_cache(k, v, k_cache, v_cache):
    return torch.cat([k_cache, k], dim=-2), torch.cat([v_cache, v], dim=-2)


def _tile(k, v):
    return tile_kv(k, REP), tile_kv(v, REP)


def _repeat_k_only(k, v):
    return repeat_kv(k, REP), v


NOT_SEEN_THROUGH = {
    # name: (prepare, kv heads handed in, v heads, cache rows, kept node targets)
    "non-empty cache": (_nonempty_cache, H, H, 8, {torch.cat}),
    "tiled heads (h % Hkv)": (_tile, HKV, HKV, None, {"expand", "reshape"}),
    "k repeated, v not": (_repeat_k_only, HKV, H, None, {"expand", "reshape"}),
}


@pytest.mark.parametrize("name", list(NOT_SEEN_THROUGH))
@pytest.mark.parametrize("kind", ["sdpa", "manual"])
def test_kv_that_are_not_provably_equal_stay(name, kind):
    prepare, hk, hv, rows, remaining = NOT_SEEN_THROUGH[name]
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, H, N, D, generator=g)
    k, v = torch.randn(B, hk, N, D, generator=g), torch.randn(B, hv, N, D, generator=g)
    cache = () if rows is None else (torch.randn(B, hk, rows, D, generator=g), torch.randn(B, hv, rows, D, generator=g))
    module = Attn(prepare, kind)
    args = (q, k, v, *cache)
    report = danon.explain(module, *args, target="eager")
    if kind == "sdpa" and rows:
        # SDPA's is_causal with Nq < Nk is aligned top-left, the op's bottom-right: the site is kept as it is
        assert [s.replaced for s in report.sites] == [False], str(report)
        assert "top-left" in report.sites[0].reason
    else:
        assert [s.replaced for s in report.sites] == [True], str(report)
    assert report.sites[0].k_shape == (B, H, N + (rows or 0), D)
    compiled, graphs = _compile_capturing(module)
    assert _rel(compiled(*args), module(*args)) < 1e-5
    targets = {n.target for n in _calls(graphs[0])}
    assert remaining <= targets


# ----------------------------------------------------------------------------------------------
# A real model: transformers' Llama with grouped-query attention, eager and sdpa attention


def _tiny_llama(impl):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, attn_implementation=impl)
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_llama_gqa_sites_read_unrepeated_kv(impl):
    model = _tiny_llama(impl).eval()
    ids = torch.randint(0, 100, (B, 32), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, 32, dtype=torch.long)
    mask[1, -5:] = 0
    with torch.no_grad():
        report = danon.explain(model, ids, mask, target="eager")
        rows = report.sites
        assert len(rows) == 2 and all(r.replaced for r in rows), str(report)
        assert {r.source for r in rows} == {"manual" if impl == "eager" else "sdpa"}
        assert all(r.k_shape == (B, 2, 32, 16) for r in rows), str(report)
        torch._dynamo.reset()
        out = torch.compile(model, backend="danon", options={"target": "eager"})(ids, mask).logits
        assert _rel(out, model(ids, mask).logits) < 1e-5


def test_llama_eager_attention_gradients_in_training():
    model = _tiny_llama("eager").train()
    ids = torch.randint(0, 100, (B, 32), generator=torch.Generator().manual_seed(2))
    report = danon.explain(model, ids, target="eager")
    assert len(report.sites) == 2 and all(r.replaced and r.source == "manual" for r in report.sites), str(report)
    params = [p for p in model.parameters() if p.requires_grad]
    expected = model(ids, labels=ids).loss
    expected_grads = torch.autograd.grad(expected, params)
    torch._dynamo.reset()
    loss = torch.compile(model, backend="danon", options={"target": "eager"})(ids, labels=ids).loss
    assert _rel(loss, expected) < 1e-5
    for g, e in zip(torch.autograd.grad(loss, params), expected_grads):
        assert _rel(g, e) < 1e-5
