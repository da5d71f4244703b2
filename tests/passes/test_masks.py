"""Mask classification by provenance: masks built the way real models build them, compiled with danon."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import danon
from danon.passes.attention import find_sites

B, H, N, D, BUF = 2, 2, 24, 8, 40      # N is neither D nor BUF: an [N, N] node is a dense mask
OPTIONS = {"target": "eager"}



def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def _qkv(n=N, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=g).requires_grad_(grad) for _ in range(3)]


def _attention_mask(n=N, left=(0, 5), right=(0, 0)):
    """A transformers-style [B, N] long mask: 1 = token, 0 = padding."""
    mask = torch.ones(B, n, dtype=torch.long)
    for b in range(B):
        mask[b, :left[b]] = 0
        if right[b]:
            mask[b, n - right[b]:] = 0
    return mask


def _hf_causal_padding(q, attention_mask, window=None):
    """transformers' sdpa_mask without vmap: index functions broadcast over (b, h, q, kv), and-ed, expanded."""
    batch, n = q.shape[0], q.shape[2]
    padding_mask = attention_mask.to(device=q.device, dtype=torch.bool)
    batch_idx = torch.arange(batch, device=q.device)[:, None, None, None]
    q_idx = (torch.arange(n, device=q.device) + 0)[None, None, :, None]
    kv_idx = (torch.arange(n, device=q.device) + 0)[None, None, None, :]
    result = q_idx.new_ones((), dtype=torch.bool)
    result = result & (kv_idx <= q_idx).to(q.device)
    if window is not None:
        result = result & (kv_idx > q_idx - window).to(q.device)
    result = result & padding_mask[batch_idx, kv_idx].to(q.device)
    return result.expand(batch, -1, n, n)


class MaskedSDPA(nn.Module):
    """One SDPA call whose mask is built inside the graph by `kind`."""

    def __init__(self, kind, window=6):
        super().__init__()
        self.kind, self.window = kind, window
        self.register_buffer("tril", torch.tril(torch.ones(BUF, BUF, dtype=torch.bool)))
        self.register_buffer("tril_float", torch.tril(torch.ones(BUF, BUF)))
        self.bias = nn.Parameter(torch.randn(1, H, N, N) * 0.1)

    def mask(self, q, attention_mask):
        n = q.shape[2]
        i = torch.arange(n, device=q.device)
        k = self.kind
        if k == "tril buffer":
            return self.tril[:n, :n]
        if k == "tril buffer float":                                     # nanoGPT: bias[:, :, :T, :T] == 0 -> -inf
            return torch.zeros(n, n).masked_fill(self.tril_float[:n, :n] == 0, float("-inf"))
        if k == "arange le":
            return i[None, :] <= i[:, None]
        if k == "arange gt, inverted":
            return ~(i[None, :] > i[:, None])
        if k == "triu -inf":
            return torch.triu(torch.full((n, n), float("-inf")), diagonal=1)
        if k == "padding":
            return attention_mask.bool()[:, None, None, :]
        if k == "padding float":
            return torch.zeros_like(attention_mask, dtype=q.dtype).masked_fill(attention_mask == 0,
                                                                             float("-inf"))[:, None, None, :]
        if k == "transformers causal+padding":
            return _hf_causal_padding(q, attention_mask)
        if k == "sliding window":
            return _hf_causal_padding(q, attention_mask, window=self.window)
        if k == "sliding window, no padding":
            return (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < self.window)
        if k == "learned bias":
            return self.bias
        if k == "bias + padding":                                          # T5: position bias merged with padding
            return self.bias + torch.zeros_like(attention_mask, dtype=q.dtype).masked_fill(
                attention_mask == 0, torch.finfo(q.dtype).min)[:, None, None, :]
        if k == "padded rows attend everywhere":                           # the old torch fix: all-True rows
            m = _hf_causal_padding(q, attention_mask)
            return m | ~m.any(-1, keepdim=True)
        if k == "finfo.min":                                               # what eager paths add instead of -inf
            return torch.zeros(n, n).masked_fill(i[None, :] > i[:, None], torch.finfo(q.dtype).min)
        if k == "bottom-right causal":
            return i[None, :] <= i[:, None] + 1
        raise ValueError(k)

    def forward(self, q, k, v, attention_mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask(q, attention_mask))


CLASSIFIED = {
    "tril buffer": "causal",
    "tril buffer float": "causal",
    "arange le": "causal",
    "arange gt, inverted": "causal",
    "triu -inf": "causal",
    "padding": "key_padding",
    "padding float": "key_padding",
    "transformers causal+padding": "causal+key_padding",
    "sliding window": "sliding_window",
    "sliding window, no padding": "sliding_window",
    "finfo.min": "causal",      # same weights as -inf in every row that sees a key (here: every row)
}
GENERAL = ["learned bias", "bias + padding", "padded rows attend everywhere", "bottom-right causal"]


def _compile_capturing(module, **compile_kw):
    graphs = []

    def backend(gm, example_inputs):
        out = danon.danon_backend(gm, example_inputs, OPTIONS)
        graphs.append(gm)
        return out

    return torch.compile(module, backend=backend, **compile_kw), graphs


def _square_nodes(gm, n):
    """Nodes (other than inputs) whose value ends in an [n, n] matrix: a dense mask still built."""
    found = []
    for node in gm.graph.nodes:
        value = node.meta.get("example_value")
        if node.op != "placeholder" and isinstance(value, torch.Tensor) and value.dim() >= 2 \
                and tuple(value.shape[-2:]) == (n, n):
            found.append(node.name)
    return found


def _classified_sites(module, *args, **compile_kw):
    """(mask_class, causal, window, has key padding) per site, straight from the driver's find_sites."""
    found = []

    def backend(gm, example_inputs):
        found.extend((s.mask_class, s.causal, s.window, s.key_padding is not None, s.mask is None)
                     for s in find_sites(gm))
        return gm.forward

    torch.compile(module, backend=backend, **compile_kw)(*args)
    return found


@pytest.mark.parametrize("kind", list(CLASSIFIED))
def test_classified_masks_replace_the_dense_mask(kind):
    module = MaskedSDPA(kind)
    q, k, v = _qkv(grad=True)
    am = _attention_mask(left=(0, 5), right=(0, 0)) if "window" not in kind else _attention_mask(left=(0, 3))
    expected = module(q, k, v, am)
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))

    report = danon.explain(module, q, k, v, am, **OPTIONS)
    assert [(s.mask, s.replaced, s.family) for s in report.sites] == [(CLASSIFIED[kind], True, "exact")], str(report)
    assert CLASSIFIED[kind] in str(report)

    torch._dynamo.reset()
    compiled, graphs = _compile_capturing(module)
    out = compiled(q, k, v, am)
    assert _rel(out, expected) < 1e-5
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for g, e in zip(grads, expected_grads):
        assert _rel(g, e) < 1e-5
    assert len(graphs) == 1 and _square_nodes(graphs[0], N) == [], graphs[0].code


@pytest.mark.parametrize("kind", GENERAL)
def test_other_masks_stay_general_and_exact(kind):
    module = MaskedSDPA(kind)
    q, k, v = _qkv(grad=True)
    am = _attention_mask()
    expected = module(q, k, v, am)
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    report = danon.explain(module, q, k, v, am, **OPTIONS)
    assert [(s.mask, s.replaced) for s in report.sites] == [("general", True)], str(report)
    torch._dynamo.reset()
    compiled, graphs = _compile_capturing(module)
    out = compiled(q, k, v, am)
    assert _rel(out, expected) < 1e-5
    if kind != "learned bias":                  # the dense mask is still built (and the check above can see one)
        assert _square_nodes(graphs[0], N)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for g, e in zip(grads, expected_grads):
        assert _rel(g, e) < 1e-5


def test_window_and_key_padding_are_read_off_the_construction():
    q, k, v = _qkv()
    am = _attention_mask(left=(0, 4))
    assert _classified_sites(MaskedSDPA("sliding window", window=6), q, k, v, am) == \
        [("sliding_window", True, 6, True, True)]
    torch._dynamo.reset()
    assert _classified_sites(MaskedSDPA("sliding window, no padding", window=5), q, k, v, am) == \
        [("sliding_window", True, 5, False, True)]
    torch._dynamo.reset()
    assert _classified_sites(MaskedSDPA("transformers causal+padding"), q, k, v, am) == \
        [("causal+key_padding", True, None, True, True)]


def test_an_all_ones_attention_mask_is_still_key_padding():
    """transformers builds a dense bool mask even for an all-ones attention_mask under compile: provenance decides."""
    module = MaskedSDPA("transformers causal+padding")
    q, k, v = _qkv()
    ones = torch.ones(B, N, dtype=torch.long)
    assert _classified_sites(module, q, k, v, ones) == [("causal+key_padding", True, None, True, True)]
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="danon", options=OPTIONS)
    for am in (ones, _attention_mask(left=(3, 7)), _attention_mask(left=(0, 0), right=(6, 2))):
        assert _rel(compiled(q, k, v, am), module(q, k, v, am)) < 1e-5      # same graph, new padding


def test_a_window_wider_than_the_traced_length_survives_dynamic_shapes():
    """At N = 24 a window of 32 looks causal; the graph also runs at N = 48, where it is not."""
    module = MaskedSDPA("sliding window", window=32)
    q, k, v = _qkv()
    sites = _classified_sites(module, q, k, v, _attention_mask(), dynamic=True)
    assert sites == [("sliding_window", True, 32, True, True)]
    torch._dynamo.reset()
    compiled, graphs = _compile_capturing(module, dynamic=True)
    for n in (24, 48):
        q, k, v = _qkv(n=n, seed=n)
        am = _attention_mask(n=n, left=(0, 3))
        assert _rel(compiled(q, k, v, am), module(q, k, v, am)) < 1e-5
    assert len(graphs) == 1


def test_a_user_supplied_dense_mask_is_general():
    class UserMask(nn.Module):
        def forward(self, q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    q, k, v = _qkv()
    causal = torch.ones(N, N, dtype=torch.bool).tril()       # causal by value, but an input: it may change
    report = danon.explain(UserMask(), q, k, v, causal, **OPTIONS)
    assert report.sites[0].mask == "general"


class Mutated(nn.Module):
    """A causal mask made all-True in place between two SDPA calls that both read the same node."""

    def forward(self, q, k, v):
        i = torch.arange(q.shape[2])
        mask = i[None, :] <= i[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        mask.fill_(True)
        return out + F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_a_mask_mutated_outside_its_construction_is_general():
    q, k, v = _qkv()
    classes = [s[0] for s in _classified_sites(Mutated(), q, k, v)]
    assert classes == ["general", "general"]


def test_a_mask_mutated_in_place_keeps_its_meaning():
    q, k, v = _qkv()
    module = Mutated()
    assert _rel(torch.compile(module, backend="danon", options=OPTIONS)(q, k, v), module(q, k, v)) < 1e-5


def _tiny_transformers_model(name):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, vocab_size=64, attn_implementation="sdpa")
    if name == "llama":
        model = transformers.LlamaModel(transformers.LlamaConfig(**common))
    elif name == "mistral":
        model = transformers.MistralModel(transformers.MistralConfig(sliding_window=5, **common))
    else:
        model = transformers.T5EncoderModel(transformers.T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=1,
                                                                  num_heads=2, vocab_size=64,
                                                                  attn_implementation="sdpa"))

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return Wrapped().eval()


@pytest.mark.parametrize("name,mask", [("llama", "causal+key_padding"), ("mistral", "sliding_window"),
                                       ("t5", "general")])
def test_transformers_models(name, mask):
    model = _tiny_transformers_model(name)
    n = 20                                                    # not the head dim (16)
    ids = torch.randint(0, 64, (B, n), generator=torch.Generator().manual_seed(0))
    am = torch.ones(B, n, dtype=torch.long)
    am[1, :4] = 0                                             # left padding
    with torch.no_grad():
        expected = model(ids, am)
        report = danon.explain(model, ids, am, **OPTIONS)
        assert [(s.mask, s.replaced) for s in report.sites] == [(mask, True)], str(report)
        torch._dynamo.reset()
        compiled, graphs = _compile_capturing(model)
        out = compiled(ids, am)
    assert _rel(out, expected) < 1e-5
    if mask != "general":
        assert _square_nodes(graphs[0], n) == [], graphs[0].code
