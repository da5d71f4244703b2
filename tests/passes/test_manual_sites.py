"""Hand-written attention chains (matmul -> scale -> mask -> softmax -> matmul) as danon sites.

Each form is a small module; the danon backend must replace its chain (source "manual"), give the
eager result and the eager gradients. Chains that look like attention but are not provably it
stay as they are, and the report says why.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import danon

B, H, N, D = 2, 4, 48, 16



def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def _randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _qkv(Hkv=H, nq=N, nk=N, seed=0, dtype=torch.float32):
    return [_randn(B, h, n, D, seed=seed + i, dtype=dtype) for i, (h, n) in enumerate(((H, nq), (Hkv, nk), (Hkv, nk)))]


def _attend(seed=5, shape=(B, 1, N, N)):
    """A random bool 'attend' mask in which every query sees at least one key."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(*shape, generator=g) > 0.4
    m[..., 0] = True
    return m


# ----------------------------------------------------------------------------------------------
# The forms: each module's forward(q, k, v, *extra)


class Llama(nn.Module):
    """transformers' eager_attention_forward: matmul(q, k.transpose(2, 3)) * scaling + mask, fp32 softmax."""

    def __init__(self, dropout=0.0):
        super().__init__()
        self.dropout = dropout

    def forward(self, q, k, v, mask=None):
        w = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5
        if mask is not None:
            w = w + mask
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        w = F.dropout(w, p=self.dropout, training=self.training)
        return torch.matmul(w, v)


class DivSqrt(nn.Module):
    """k transposed in a statement of its own, `@`, division by sqrt(D), Tensor.softmax."""

    def forward(self, q, k, v):
        kt = k.transpose(-1, -2)
        s = q @ kt / math.sqrt(D)
        return s.softmax(-1) @ v


class ScaleOnQ(nn.Module):
    def forward(self, q, k, v):
        q = q * D ** -0.5
        return torch.softmax(torch.matmul(q, k.transpose(-2, -1)), dim=-1) @ v


class ScaleOnQAndK(nn.Module):
    """q and k each scaled by D^-1/4 (k after its transpose), and a second scale on the scores."""

    def forward(self, q, k, v):
        s = torch.matmul(q * D ** -0.25, k.transpose(-2, -1) * D ** -0.25) * 0.7
        return torch.softmax(s, dim=3).matmul(v)


class AdditiveMask(nn.Module):
    """T5 style: a mul(1) stays, a float position bias [1, H, N, N] plus a padding mask [B, 1, 1, N]."""

    def __init__(self, learn_bias=False):
        super().__init__()
        bias = _randn(1, H, N, N, seed=11)
        self.bias = nn.Parameter(bias) if learn_bias else None
        self.register_buffer("fixed", bias)

    def forward(self, q, k, v, pad):
        s = torch.matmul(q, k.transpose(3, 2)) * 1.0
        s = s + (self.bias if self.bias is not None else self.fixed)
        s = s + pad
        return F.softmax(s.float(), dim=-1).type_as(s) @ v


class MaskedFill(nn.Module):
    def __init__(self, value=float("-inf")):
        super().__init__()
        self.value = value

    def forward(self, q, k, v, attend):
        s = torch.matmul(q, k.transpose(-1, -2)) * D ** -0.5
        s = s.masked_fill(~attend, self.value if self.value is not None else torch.finfo(s.dtype).min)
        return torch.matmul(torch.softmax(s, dim=-1), v)


class Where(nn.Module):
    def forward(self, q, k, v, attend):
        s = torch.matmul(q, k.transpose(-1, -2)) * D ** -0.5
        s = torch.where(attend, s, torch.finfo(s.dtype).min)
        return torch.matmul(torch.softmax(s, dim=-1), v)


class FillAndAdd(nn.Module):
    """A causal masked_fill (mask == 0 idiom, -1e9) and an additive padding mask."""

    def forward(self, q, k, v, pad):
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D)
        causal = torch.tril(torch.ones(N, N, dtype=torch.long))
        s = s.masked_fill(causal == 0, -1e9)
        s = s + pad
        return torch.matmul(torch.softmax(s, dim=-1), v)


class Upcast(nn.Module):
    """Scores upcast with .float(), softmax with dtype=float32, cast back with .to(q.dtype)."""

    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(-1, -2)).float() * D ** -0.5
        p = nn.functional.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, v)


class Softcap(nn.Module):
    """Gemma 2: scale, then truediv(c), tanh, mul(c), then the mask."""

    def __init__(self, cap=5.0):
        super().__init__()
        self.cap = cap

    def forward(self, q, k, v, mask):
        w = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5
        w = w / self.cap
        w = torch.tanh(w)
        w = w * self.cap
        w = w + mask
        w = nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        w = nn.functional.dropout(w, p=0.0, training=self.training)
        return torch.matmul(w, v)


class DropoutModule(nn.Module):
    """nn.Dropout(0.1) on the weights (a no-op in eval) and nn.Softmax."""

    def __init__(self, p=0.1):
        super().__init__()
        self.drop = nn.Dropout(p)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, q, k, v):
        return self.drop(self.softmax(q @ k.transpose(-2, -1) * D ** -0.5)) @ v


class MergedHeads(nn.Module):
    """B * H merged into one dim for bmm, viewed back to [B, H, N, D]."""

    def forward(self, q, k, v):
        b, h, n, d = q.shape
        q3, k3, v3 = (x.reshape(b * h, x.shape[2], d) for x in (q, k, v))
        s = torch.bmm(q3, k3.transpose(1, 2)) * d ** -0.5
        return torch.bmm(torch.softmax(s, dim=-1), v3).view(b, h, n, d)


class MergedHeadsNoViewBack(nn.Module):
    """B * H merged, a [B*H, N, N] float mask, and the output used as 3-D [B*H, N, D]."""

    def forward(self, q, k, v, mask):
        b, h, n, d = q.shape
        q3, k3, v3 = (x.reshape(b * h, x.shape[2], d) for x in (q, k, v))
        s = torch.bmm(q3, k3.transpose(1, 2)) * d ** -0.5 + mask
        out = torch.bmm(torch.softmax(s, dim=-1), v3)
        return out.sum(-1)


class PreTransposed(nn.Module):
    """k handed in already transposed ([B, H, D, N]): matmul(q, kt), no transpose in the chain."""

    def forward(self, q, k, v):
        kt = k.permute(0, 1, 3, 2).contiguous()
        return torch.matmul(torch.softmax(torch.matmul(q, kt) * 0.2, dim=-1), v)


class Einsum(nn.Module):
    def forward(self, q, k, v):
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5
        return torch.einsum("bhqk,bhkd->bhqd", s.softmax(dim=-1), v)


class MultiQueryBroadcast(nn.Module):
    """One kv head broadcast over the query heads by matmul itself (multi-query attention)."""

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * D ** -0.5, dim=-1) @ v


def _extra(name):
    if name in ("Llama+mask", "Softcap"):
        m = torch.zeros(B, 1, N, N).masked_fill(~_attend(), torch.finfo(torch.float32).min)
        return (m,)
    if name in ("AdditiveMask", "AdditiveMask learnt bias", "FillAndAdd"):
        pad = torch.zeros(B, 1, 1, N)
        pad[1, ..., -7:] = float("-inf")        # right padding: with the causal fill every query keeps a key
        return (pad,)
    if name in ("MaskedFill -inf", "MaskedFill finfo.min", "Where"):
        return (_attend(),)
    if name == "MergedHeadsNoViewBack":
        return (_randn(B * H, N, N, seed=9),)
    return ()


FORMS = {
    "Llama": (Llama, {}),
    "Llama+mask": (Llama, {}),
    "DivSqrt": (DivSqrt, {}),
    "ScaleOnQ": (ScaleOnQ, {}),
    "ScaleOnQAndK": (ScaleOnQAndK, {}),
    "AdditiveMask": (AdditiveMask, {}),
    "AdditiveMask learnt bias": (AdditiveMask, {"learn_bias": True}),
    "MaskedFill -inf": (MaskedFill, {}),
    "MaskedFill finfo.min": (MaskedFill, {"value": None}),
    "Where": (Where, {}),
    "FillAndAdd": (FillAndAdd, {}),
    "Upcast": (Upcast, {}),
    "Softcap": (Softcap, {}),
    "DropoutModule": (DropoutModule, {"p": 0.0}),
    "MergedHeads": (MergedHeads, {}),
    "MergedHeadsNoViewBack": (MergedHeadsNoViewBack, {}),
    "PreTransposed": (PreTransposed, {}),
    "Einsum": (Einsum, {}),
    "MultiQueryBroadcast": (MultiQueryBroadcast, {}),
}
EXPECTED = {   # what the site must carry: scale, softcap, mask class, k heads, q shape in the report
    "Llama": dict(scale=D ** -0.5, mask="none"),
    "Llama+mask": dict(scale=D ** -0.5, mask="general"),
    "DivSqrt": dict(scale=1 / math.sqrt(D), mask="none"),
    "ScaleOnQ": dict(scale=D ** -0.5, mask="none"),
    "ScaleOnQAndK": dict(scale=D ** -0.5 * 0.7, mask="none"),
    "AdditiveMask": dict(scale=1.0, mask="general"),
    "AdditiveMask learnt bias": dict(scale=1.0, mask="general"),
    "MaskedFill -inf": dict(scale=D ** -0.5, mask="general"),
    "MaskedFill finfo.min": dict(scale=D ** -0.5, mask="general"),
    "Where": dict(scale=D ** -0.5, mask="general"),
    "FillAndAdd": dict(scale=1 / math.sqrt(D), mask="general"),
    "Upcast": dict(scale=D ** -0.5, mask="none"),
    "Softcap": dict(scale=D ** -0.5, softcap=5.0, mask="general"),
    "DropoutModule": dict(scale=D ** -0.5, mask="none"),
    "MergedHeads": dict(scale=D ** -0.5, mask="none"),
    "MergedHeadsNoViewBack": dict(scale=D ** -0.5, mask="general", q_shape=(1, B * H, N, D)),
    "PreTransposed": dict(scale=0.2, mask="none"),
    "Einsum": dict(scale=D ** -0.5, mask="none"),
    "MultiQueryBroadcast": dict(scale=D ** -0.5, mask="none", k_heads=1),
}


def _sites_of(module, *args, **options):
    """The manual Sites the pass finds (captured from the recogniser) and the compile report."""
    from danon.passes import attention as driver
    found = []
    real = driver.find_manual_sites

    def spy(gm):
        sites = real(gm)
        found.extend(sites)
        return sites

    driver.find_manual_sites = spy
    try:
        report = danon.explain(module, *args, target="eager", **options)
    finally:
        driver.find_manual_sites = real
    return found, report


def _inputs(name):
    q, k, v = _qkv(Hkv=1 if name == "MultiQueryBroadcast" else H)
    return [q, k, v, *_extra(name)]


@pytest.mark.parametrize("name", list(FORMS))
def test_manual_form_is_replaced_and_equals_eager(name):
    cls, kw = FORMS[name]
    module = cls(**kw).eval()
    args = _inputs(name)
    want = EXPECTED[name]
    sites, report = _sites_of(module, *args)
    assert [s.source for s in report.sites] == ["manual"], str(report)
    row = report.sites[0]
    assert row.replaced and row.family == "exact", str(report)
    assert row.mask == want["mask"]
    assert row.q_shape == want.get("q_shape", (B, H, N, D))
    assert row.k_shape[1] == want.get("k_heads", row.q_shape[1])
    (site,) = sites
    assert site.kept is None and site.scale == pytest.approx(want["scale"], rel=1e-6)
    assert site.softcap == want.get("softcap")
    assert site.value("q").dim() == 4 and site.value("k").dim() == 4 and site.value("v").dim() == 4
    if site.mask is not None and name in ("MaskedFill -inf", "MaskedFill finfo.min", "Where"):
        assert site.value("mask").dtype == torch.bool       # the negated fill mask: True = attend

    expected = module(*args)
    out = torch.compile(module, backend="danon", options={"target": "eager"})(*args)
    assert _rel(out, expected) < 1e-5


@pytest.mark.parametrize("name", ["Llama+mask", "ScaleOnQAndK", "AdditiveMask learnt bias", "MaskedFill -inf",
                                  "Where", "Softcap", "DropoutModule", "MergedHeads", "MergedHeadsNoViewBack",
                                  "PreTransposed", "Einsum", "MultiQueryBroadcast"])
def test_manual_form_gradients_equal_eager_in_training(name):
    cls, kw = FORMS[name]
    module = cls(**kw).train()
    q, k, v, *extra = _inputs(name)
    q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
    leaves = [q, k, v] + [p for p in module.parameters()]
    expected = module(q, k, v, *extra)
    expected_grads = torch.autograd.grad(expected.square().sum(), leaves)
    report = danon.explain(module, q, k, v, *extra, target="eager")
    assert [s.replaced for s in report.sites] == [True], str(report)
    torch._dynamo.reset()
    out = torch.compile(module, backend="danon", options={"target": "eager"})(q, k, v, *extra)
    assert _rel(out, expected) < 1e-5
    grads = torch.autograd.grad(out.square().sum(), leaves)
    for g, e in zip(grads, expected_grads):
        assert _rel(g, e) < 1e-5


@pytest.mark.parametrize("name", ["Llama+mask", "Softcap", "MergedHeads"])
def test_manual_forms_under_the_default_inductor_target(name):
    cls, kw = FORMS[name]
    module = cls(**kw).eval()
    args = _inputs(name)
    report = danon.explain(module, *args)
    assert [(s.source, s.replaced) for s in report.sites] == [("manual", True)], str(report)
    torch._dynamo.reset()
    out = torch.compile(module, backend="danon")(*args)
    assert _rel(out, module(*args)) < 1e-5


def test_bfloat16_chain_with_fp32_upcast_is_replaced():
    module = Llama().eval()
    q, k, v = _qkv(dtype=torch.bfloat16)
    mask = torch.zeros(B, 1, N, N, dtype=torch.bfloat16).masked_fill(~_attend(), torch.finfo(torch.bfloat16).min)
    report = danon.explain(module, q, k, v, mask, target="eager")
    assert [(s.source, s.replaced, s.dtype) for s in report.sites] == [("manual", True, "bfloat16")], str(report)
    out = torch.compile(module, backend="danon", options={"target": "eager"})(q, k, v, mask)
    reference = module(q.double(), k.double(), v.double(), mask.double())
    assert out.dtype == torch.bfloat16
    assert _rel(out.double(), reference) < 2e-2
    assert _rel(out.double(), reference) <= 1.5 * _rel(module(q, k, v, mask).double(), reference) + 1e-3


def test_a_manual_site_runs_a_sparse_family():
    module = Llama().eval()
    q, k, v = _qkv(nq=256, nk=256)
    options = dict(attention="msra", window=32, block_size=16, num_levels=2, min_seq_len=0, target="eager")
    report = danon.explain(module, q, k, v, **options)
    assert report.sites[0].source == "manual" and report.sites[0].family == "msra", str(report)
    out = torch.compile(module, backend="danon", options=options)(q, k, v)
    expected = danon.msra_attention(q, k, v, window=32, block_size=16, num_levels=2, scale=D ** -0.5)
    assert torch.allclose(out, expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Chains that are not provably attention: kept, with the reason in the report


class ReturnsWeights(nn.Module):
    def forward(self, q, k, v):
        w = torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1)
        return w @ v, w


class ReturnsScores(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-1, -2) * 0.25
        return torch.softmax(s, dim=-1) @ v, s.mean()


class TensorScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.25))

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1) @ v


class SoftmaxOverQueries(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-2) @ v


class IntegerMask(nn.Module):
    def forward(self, q, k, v, mask):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.25 + mask, dim=-1) @ v


class SmallFill(nn.Module):
    def forward(self, q, k, v, attend):
        s = (q @ k.transpose(-1, -2)).masked_fill(~attend, -5.0)
        return torch.softmax(s, dim=-1) @ v


class ScaleAfterMask(nn.Module):
    def forward(self, q, k, v, mask):
        return torch.softmax((q @ k.transpose(-1, -2) + mask) * 0.25, dim=-1) @ v


class HeadMask(nn.Module):
    """BERT's head_mask: the weights multiplied by a tensor before the product with v."""

    def forward(self, q, k, v, head_mask):
        return (torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1) * head_mask) @ v


class InPlaceFill(nn.Module):
    """masked_fill_ on the scores without using its result: the scores change under the chain's feet."""

    def forward(self, q, k, v, attend):
        s = q @ k.transpose(-1, -2) * 0.25
        s.masked_fill_(~attend, float("-inf"))
        return torch.softmax(s, dim=-1) @ v


class WideValues(nn.Module):
    def forward(self, q, k, v, v_wide):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1) @ v_wide


def test_values_wider_than_queries_are_replaced_and_equal_eager():
    module = WideValues()
    q, k, v = _qkv()
    args = (q, k, v, _randn(B, H, N, 2 * D, seed=6))
    report = danon.explain(module, *args, target="eager")
    assert [s.replaced for s in report.sites] == [True], str(report)
    out = torch.compile(module, backend="danon", options={"target": "eager"})(*args)
    expected = module(*args)
    assert float((out - expected).norm() / expected.norm()) < 1e-5


NEGATIVE = {
    "weights returned": (ReturnsWeights, (), "outside the attention chain", False),
    "scores used elsewhere": (ReturnsScores, (), "outside the attention chain", False),
    "tensor scale": (TensorScale, (), "tensor", False),
    "softmax over dim -2": (SoftmaxOverQueries, (), "softmax over dim", False),
    "integer mask": (IntegerMask, (torch.randint(0, 2, (B, 1, N, N)),), "torch.int64", False),
    "fill with -5": (SmallFill, (_attend(),), "-5.0", False),
    "scale after mask": (ScaleAfterMask, (_randn(B, 1, N, N, seed=3),), "scaled after", False),
    "head mask": (HeadMask, (_randn(1, H, 1, 1, seed=4),), "mul", False),
    "dropout in training": (DropoutModule, (), "dropout", True),
    "scores filled in place": (InPlaceFill, (_attend(),), "modified in place by masked_fill_", None),
}


@pytest.mark.parametrize("name", list(NEGATIVE))
def test_chains_that_are_not_provably_attention_are_kept_with_a_reason(name):
    cls, extra, reason, training = NEGATIVE[name]      # training None: compared in test_a_kept_chain_with_an_in_place_fill_still_equals_eager
    module = cls().train(bool(training))
    q, k, v = _qkv()
    args = (q, k, v, *extra)
    sites, report = _sites_of(module, *args)
    assert len(report.sites) == 1, str(report)
    row = report.sites[0]
    assert row.source == "manual" and not row.replaced, str(report)
    assert reason in row.reason, row.reason
    assert reason in str(report)
    assert sites[0].kept == row.reason
    if training is False:
        torch.manual_seed(0)
        expected = module(*args)
        out = torch.compile(module, backend="danon", options={"target": "eager"})(*args)
        as_tuple = (lambda x: x if isinstance(x, tuple) else (x,))
        for o, e in zip(as_tuple(out), as_tuple(expected)):
            assert torch.equal(o, e)          # left untouched: bit for bit the eager graph


def test_a_kept_chain_with_an_in_place_fill_still_equals_eager():
    module = InPlaceFill()
    q, k, v = _qkv()
    args = (q, k, v, _attend())
    out = torch.compile(module, backend="danon", options={"target": "eager"})(*args)
    assert torch.equal(out, module(*args))


class SymbolicScale(nn.Module):
    """1 / sqrt(D) from the traced head size: symbolic under dynamic shapes, which is the op's default scale."""

    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling

    def forward(self, q, k, v):
        s = q @ k.transpose(-1, -2)
        s = s * q.shape[-1] ** -0.5 if self.spelling == "pow" else s / math.sqrt(q.size(-1))
        return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("module", [SymbolicScale("pow"), SymbolicScale("sqrt"), Llama(), MergedHeads()],
                         ids=["D ** -0.5", "/ math.sqrt(D)", "Llama", "MergedHeads"])
def test_dynamic_shapes_compile_once_and_replace_the_chain(module):
    from danon.sites import attention_site
    graphs = []

    def backend(gm, example_inputs):
        fn = danon.danon_backend(gm, example_inputs, {"target": "eager"})
        graphs.append(gm)
        return fn

    compiled = torch.compile(module.eval(), backend=backend, dynamic=True)
    for n in (32, 40, 56):
        q, k, v = _qkv(nq=n, nk=n, seed=n)
        assert _rel(compiled(q, k, v), module(q, k, v)) < 1e-5
    assert len(graphs) == 1
    targets = [n.target for n in graphs[0].graph.nodes if n.op in ("call_function", "call_method")]
    assert targets.count(attention_site) == 1 and torch.softmax not in targets, graphs[0].code


def test_dropout_in_training_is_kept_and_still_runs():
    module = DropoutModule(p=0.5).train()
    q, k, v = _qkv()
    torch.manual_seed(0)
    out = torch.compile(module, backend="danon", options={"target": "eager"})(q, k, v)
    assert out.shape == (B, H, N, D) and torch.isfinite(out).all()


def test_a_softmax_that_is_not_attention_is_not_reported():
    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(D, 4)

        def forward(self, x):
            w = torch.softmax(self.gate(x), dim=-1)
            return torch.matmul(w.transpose(-1, -2), x)

    report = danon.explain(Router(), _randn(B, N, D), target="eager")
    assert report.sites == []


def test_two_chains_in_one_graph_are_two_sites():
    class Two(nn.Module):
        def forward(self, q, k, v):
            a = Llama()(q, k, v)
            return Llama()(a, k, v) + DivSqrt()(q, a, v)

    q, k, v = _qkv()
    report = danon.explain(Two(), q, k, v, target="eager")
    assert [(s.source, s.replaced) for s in report.sites] == [("manual", True)] * 3, str(report)
    out = torch.compile(Two(), backend="danon", options={"target": "eager"})(q, k, v)
    assert _rel(out, Two()(q, k, v)) < 1e-5
