"""nn.MultiheadAttention and nn.TransformerEncoderLayer under the danon backend: expanded, replaced, equal to eager."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import danon
import danon.sites  # the public name of what a rewritten site calls (danon.core.run.attention_site)
from danon.passes.modules import expand_module_calls

B, N, E, HEADS = 2, 12, 16, 2
OPTIONS = {"target": "eager"}



def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def _x(batch_first, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    shape = (B, N, E) if batch_first else (N, B, E)
    return torch.randn(*shape, generator=g).requires_grad_(grad)


def _key_padding_mask():
    """bool [B, N], True = padding (the nn.MultiheadAttention convention)."""
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[1, N - 4:] = True
    return mask


class MHA(nn.Module):
    def __init__(self, batch_first, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, **kw)

    def forward(self, x, key_padding_mask=None):
        return self.attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0]


class Encoder(nn.Module):
    def __init__(self, norm_first=False, activation="relu"):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.TransformerEncoderLayer(E, HEADS, 32, dropout=0.0, batch_first=True, norm_first=norm_first,
                                                activation=activation)

    def forward(self, x, src_key_padding_mask=None):
        return self.layer(x, src_key_padding_mask=src_key_padding_mask)


class CausalEncoder(Encoder):
    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])    # triu of -inf, built in the graph
        return self.layer(x, src_mask=mask, is_causal=True)


def _compile_capturing(module):
    graphs = []

    def backend(gm, example_inputs):
        out = danon.danon_backend(gm, example_inputs, OPTIONS)
        graphs.append(gm)
        return out

    return torch.compile(module, backend=backend), graphs


def _check_report(module, args, mask):
    report = danon.explain(module, *args, **OPTIONS)
    assert [(s.source, s.mask, s.replaced, s.family) for s in report.sites] == [("module", mask, True, "exact")], \
        str(report)
    assert "1 of 1" in str(report) and "module" in str(report)
    torch._dynamo.reset()


def _targets(gm):
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("padding", [False, True])
def test_multihead_attention_training_matches_eager(batch_first, padding):
    module = MHA(batch_first).train()
    x = _x(batch_first, grad=True)
    args = (x, _key_padding_mask()) if padding else (x,)
    _check_report(module, args, "key_padding" if padding else "none")
    expected = module(*args)
    params = [x] + list(module.parameters())
    expected_grads = torch.autograd.grad(expected.square().sum(), params)
    compiled, graphs = _compile_capturing(module)
    out = compiled(*args)
    assert out.shape == expected.shape and out.stride() == expected.stride()
    assert _rel(out, expected) < 1e-5
    for g, e in zip(torch.autograd.grad(out.square().sum(), params), expected_grads):
        assert _rel(g, e) < 1e-5
    assert F.multi_head_attention_forward not in _targets(graphs[0])
    assert danon.sites.attention_site in _targets(graphs[0])


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("padding", [False, True])
def test_multihead_attention_eval_matches_eager(batch_first, padding):
    module = MHA(batch_first).eval()
    x = _x(batch_first)
    args = (x, _key_padding_mask()) if padding else (x,)
    with torch.no_grad():
        _check_report(module, args, "key_padding" if padding else "none")
        expected = module(*args)
        out = torch.compile(module, backend="danon", options=OPTIONS)(*args)
    assert out.shape == expected.shape and out.stride() == expected.stride()
    assert _rel(out, expected) < 1e-5


def test_multihead_attention_expansion_alone_is_exact():
    """expand_module_calls by itself (SDPA left in place): the same ops as the function, the same bits."""
    module = MHA(batch_first=True).eval()
    x, kpm = _x(True), _key_padding_mask()
    kept = []

    def backend(gm, example_inputs):
        kept.extend(expand_module_calls(gm))
        gm.graph.lint()
        gm.recompile()
        assert F.scaled_dot_product_attention in _targets(gm)
        return gm.forward

    out = torch.compile(module, backend=backend)(x, kpm)
    assert kept == []
    expected = module(x, kpm)
    assert torch.equal(out, expected) and out.stride() == expected.stride()


def test_multihead_attention_cross_attention_and_separate_weights():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.shared = nn.MultiheadAttention(E, HEADS)                     # packed in_proj_weight, k is v
            self.separate = nn.MultiheadAttention(E, HEADS, kdim=8, vdim=8)   # q/k/v_proj_weight

        def forward(self, x, memory, memory8):
            a = self.shared(x, memory, memory, need_weights=False)[0]
            return a + self.separate(x, memory8, memory8, need_weights=False)[0]

    module = Cross().eval()
    x, memory, memory8 = torch.randn(N, B, E), torch.randn(7, B, E), torch.randn(7, B, 8)
    report = danon.explain(module, x, memory, memory8, **OPTIONS)
    assert [(s.source, s.replaced) for s in report.sites] == [("module", True)] * 2, str(report)
    torch._dynamo.reset()
    out = torch.compile(module, backend="danon", options=OPTIONS)(x, memory, memory8)
    assert _rel(out, module(x, memory, memory8)) < 1e-5


def test_multihead_attention_weights_that_are_used_are_kept_and_reported():
    class Weights(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True)

        def forward(self, x):
            out, weights = self.attn(x, x, x)
            return out, weights

    module = Weights().eval()
    x = _x(True)
    report = danon.explain(module, x, **OPTIONS)
    assert len(report.sites) == 1 and not report.sites[0].replaced, str(report)
    assert report.sites[0].source == "module" and "need_weights" in report.sites[0].reason
    torch._dynamo.reset()
    out, weights = torch.compile(module, backend="danon", options=OPTIONS)(x)
    expected, expected_weights = module(x)
    assert _rel(out, expected) < 1e-5 and _rel(weights, expected_weights) < 1e-5


def test_multihead_attention_default_need_weights_with_unused_weights_is_expanded():
    class Default(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x)[0]                 # need_weights=True by default, weights dropped

    module = Default().eval()
    x = _x(True)
    with torch.no_grad():
        _check_report(module, (x,), "none")
        out = torch.compile(module, backend="danon", options=OPTIONS)(x)
        assert _rel(out, module(x)) < 1e-5


@pytest.mark.parametrize("norm_first,activation", [(False, "relu"), (True, "gelu")])
@pytest.mark.parametrize("padding", [False, True])
def test_transformer_encoder_layer_training_matches_eager(norm_first, activation, padding):
    module = Encoder(norm_first, activation).train()
    x = _x(True, grad=True)
    args = (x, _key_padding_mask()) if padding else (x,)
    _check_report(module, args, "key_padding" if padding else "none")
    expected = module(*args)
    params = [x] + list(module.parameters())
    expected_grads = torch.autograd.grad(expected.square().sum(), params)
    out = torch.compile(module, backend="danon", options=OPTIONS)(*args)
    assert out.shape == expected.shape and out.stride() == expected.stride()
    assert _rel(out, expected) < 1e-5
    for g, e in zip(torch.autograd.grad(out.square().sum(), params), expected_grads):
        assert _rel(g, e) < 1e-5


@pytest.mark.parametrize("norm_first,activation", [(False, "relu"), (True, "gelu")])
@pytest.mark.parametrize("padding", [False, True])
def test_transformer_encoder_layer_fast_path_is_expanded(norm_first, activation, padding):
    module = Encoder(norm_first, activation).eval()
    x = _x(True)
    args = (x, _key_padding_mask()) if padding else (x,)
    with torch.no_grad():
        _check_report(module, args, "key_padding" if padding else "none")
        expected = module(*args)                          # the fused fast path
        compiled, graphs = _compile_capturing(module)
        out = compiled(*args)
    assert out.shape == expected.shape and out.stride() == expected.stride()
    assert _rel(out, expected) < 1e-5
    assert torch._transformer_encoder_layer_fwd not in _targets(graphs[0])
    assert danon.sites.attention_site in _targets(graphs[0])


@pytest.mark.parametrize("train", [True, False])
def test_transformer_encoder_layer_causal_src_mask_is_causal(train):
    module = CausalEncoder().train(train)
    x = _x(True)
    with torch.set_grad_enabled(train):
        _check_report(module, (x,), "causal")
        expected = module(x)
        compiled, graphs = _compile_capturing(module)
        out = compiled(x)
    assert _rel(out, expected) < 1e-5
    squares = [n.name for n in graphs[0].graph.nodes if isinstance(n.meta.get("example_value"), torch.Tensor)
               and tuple(n.meta["example_value"].shape[-2:]) == (N, N)]
    assert squares == [], graphs[0].code                 # no [N, N] mask is built


def test_transformer_encoder_layer_float_src_mask_keeps_the_fast_path_meaning():
    """The fast path reads a float mask as "masked where nonzero"; the expansion means the same."""
    class Biased(Encoder):
        def forward(self, x, mask):
            return self.layer(x, src_mask=mask)

    module = Biased().eval()
    x = _x(True)
    mask = torch.zeros(N, N)
    mask[torch.rand(N, N, generator=torch.Generator().manual_seed(3)) > 0.6] = 0.5
    mask.fill_diagonal_(0.0)
    with torch.no_grad():
        expected = module(x, mask)
        report = danon.explain(module, x, mask, **OPTIONS)
        assert [(s.source, s.mask, s.replaced) for s in report.sites] == [("module", "general", True)], str(report)
        torch._dynamo.reset()
        out = torch.compile(module, backend="danon", options=OPTIONS)(x, mask)
    assert _rel(out, expected) < 1e-5
