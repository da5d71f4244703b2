"""Causality as properties, on random draws: a causal output at position t never depends on a later
position (q, k, v or padding), nor on how many positions follow it; the same for gradients, the nn
modules and the model factories. fp64 throughout, so that 1e-12 separates "unchanged" from a leak.

UCSA failed both properties before its causal selection rule (docs/design.md, UCSA): its block
selection read the mean of the whole query block and, with sparsity_factor, took a share of all N.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import danon

FNS = {"exact": danon.exact_attention, "ucsa": danon.ucsa_attention, "msra": danon.msra_attention,
       "dala": danon.dala_attention}

# every option that changes a plan's shape or selection, at block 16 so that short sequences are sparse
OPTIONS = [
    ("exact", dict()),
    ("exact", dict(sliding_window=40)),
    ("ucsa", dict(local_window_size=32, global_tokens=16, top_k_blocks=2)),
    ("ucsa", dict(local_window_size=16, global_tokens=0, sparsity_factor=0.2)),
    ("ucsa", dict(local_window_size=16, global_tokens=32, sparsity_factor=0.5, compress=False)),
    ("ucsa", dict(local_window_size=32, global_tokens=16, top_k_blocks=3, compress=False)),
    ("ucsa", dict(local_window_size=16, global_tokens=16, top_k_blocks=4, gamma=0.6)),
    ("msra", dict(window=32, num_levels=2, compression_factor=2)),
    ("msra", dict(window=16, num_levels="auto", compression_factor=2)),
    ("msra", dict(window=32, num_levels="auto", compression_factor=4)),
    ("dala", dict(window=32, memory_size=8)),
    ("dala", dict(window=16, memory_size=20, decay="none", compress_rest=False)),
]
IDS = [f"{kind}-" + "-".join(f"{k}={v}" for k, v in kw.items()) for kind, kw in OPTIONS]
TOL = 1e-12

draws = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _inputs(seed, n, heads, padded, requires_grad=False):
    H, Hkv = heads
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, H, n, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, Hkv, n, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, Hkv, n, 8, generator=g, dtype=torch.float64)
    kpm = None
    if padded:
        kpm = torch.rand(2, n, generator=g) > 0.3
        kpm[:, 0] = True
    if requires_grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
    return q, k, v, kpm


def _perturbed_after(t, q, k, v, kpm, seed):
    """Fresh values at every position > t (and a fresh padding pattern there)."""
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for x in (q, k, v):
        y = x.detach().clone()
        y[:, :, t + 1:] = torch.randn(y[:, :, t + 1:].shape, generator=g, dtype=y.dtype)
        out.append(y)
    if kpm is not None:
        kpm = kpm.clone()
        kpm[:, t + 1:] = torch.rand(kpm[:, t + 1:].shape, generator=g) > 0.5
    return (*out, kpm)


def _call(kind, kw, q, k, v, kpm):
    return FNS[kind](q, k, v, causal=True, key_padding_mask=kpm, block_size=16, **kw)


case = given(seed=st.integers(0, 2 ** 16), n=st.integers(2, 260), cut=st.floats(0.0, 1.0),
             heads=st.sampled_from([(2, 2), (4, 2), (4, 1)]), padded=st.booleans())


@pytest.mark.parametrize("kind, kw", OPTIONS, ids=IDS)
@case
@draws
def test_later_positions_do_not_change_earlier_outputs(kind, kw, seed, n, cut, heads, padded):
    q, k, v, kpm = _inputs(seed, n, heads, padded)
    t = min(n - 2, int(cut * (n - 1)))
    before = _call(kind, kw, q, k, v, kpm)[:, :, :t + 1]
    after = _call(kind, kw, *_perturbed_after(t, q, k, v, kpm, seed))[:, :, :t + 1]
    assert (before - after).abs().max().item() <= TOL


@pytest.mark.parametrize("kind, kw", OPTIONS, ids=IDS)
@case
@draws
def test_a_prefix_run_equals_the_full_run_on_the_prefix(kind, kw, seed, n, cut, heads, padded):
    q, k, v, kpm = _inputs(seed, n, heads, padded)
    p = max(1, int(cut * n))
    full = _call(kind, kw, q, k, v, kpm)[:, :, :p]
    prefix = _call(kind, kw, q[:, :, :p], k[:, :, :p], v[:, :, :p], None if kpm is None else kpm[:, :p])
    assert (full - prefix).abs().max().item() <= TOL


@pytest.mark.parametrize("kind, kw", OPTIONS, ids=IDS)
@case
@draws
def test_gradients_of_a_prefix_loss_never_reach_later_positions_and_equal_the_prefix_run(
        kind, kw, seed, n, cut, heads, padded):
    q, k, v, kpm = _inputs(seed, n, heads, padded, requires_grad=True)
    p = max(1, int(cut * n))
    weight = torch.randn(2, heads[0], p, 8, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    (_call(kind, kw, q, k, v, kpm)[:, :, :p] * weight).sum().backward()
    later = max(x.grad[:, :, p:].abs().max().item() if p < n else 0.0 for x in (q, k, v))
    assert later == 0.0
    qp, kp, vp = (x.detach()[:, :, :p].clone().requires_grad_() for x in (q, k, v))
    (_call(kind, kw, qp, kp, vp, None if kpm is None else kpm[:, :p]) * weight).sum().backward()
    for full, prefix in ((q, qp), (k, kp), (v, vp)):
        assert (full.grad[:, :, :p] - prefix.grad).abs().max().item() <= TOL


def test_the_properties_catch_the_old_ucsa_selection():
    """The checks above can fail: the whole-block mean (the pre-fix rule, still the non-causal one)
    read into a causal plan leaks the block's later rows into its earlier ones."""
    from danon.core import ucsa as ucsa_module
    q, k, v, _ = _inputs(3, 256, (4, 2), False)
    t = 200
    kw = dict(local_window_size=32, global_tokens=16, top_k_blocks=2)
    original = ucsa_module.selection_queries
    try:
        ucsa_module.selection_queries = lambda q, b, hkv, causal, per_head=False: original(q, b, hkv, False, per_head)
        before = _call("ucsa", kw, q, k, v, None)[:, :, :t + 1]
        after = _call("ucsa", kw, *_perturbed_after(t, q, k, v, None, 3))[:, :, :t + 1]
    finally:
        ucsa_module.selection_queries = original
    assert (before - after).abs().max().item() > 1e-3


MODULES = [
    ("MSRAAttention", dict(window=32, num_levels="auto", compression_factor=2)),
    ("DALAAttention", dict(window=32, memory_size=8)),
    ("UCSAAttention", dict(local_window_size=32, global_tokens=16, top_k_blocks=2)),
    ("UCSAAttention", dict(local_window_size=16, global_tokens=0, sparsity_factor=0.25)),
    ("HybridAttention", dict(window=32, memory_size=8, local_window_size=32, global_tokens=16, sparsity_factor=0.25)),
]


@pytest.mark.parametrize("name, kw", MODULES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(MODULES)])
@given(seed=st.integers(0, 2 ** 16), n=st.integers(2, 200), cut=st.floats(0.0, 1.0), padded=st.booleans())
@settings(max_examples=6, deadline=None)
def test_modules_prefix_equals_the_full_run_and_later_tokens_change_nothing(name, kw, seed, n, cut, padded):
    torch.manual_seed(seed)
    layer = getattr(danon.nn, name)(32, 4, 2, causal=True, block_size=16, **kw).double()
    x = torch.randn(2, n, 32, dtype=torch.float64)
    mask = (torch.rand(2, n) > 0.3) if padded else None
    if mask is not None:
        mask[:, 0] = True
    p = max(1, int(cut * n))
    full = layer(x, mask)
    assert (full[:, :p] - layer(x[:, :p], None if mask is None else mask[:, :p])).abs().max().item() <= TOL
    x2 = x.clone()
    x2[:, p:] = torch.randn(2, n - p, 32, dtype=torch.float64)
    assert (full[:, :p] - layer(x2, mask)[:, :p]).abs().max().item() <= TOL


FACTORIES = [
    (danon.create_msra_model, dict(block_size=16, window=32, num_levels="auto", compression_factor=2)),
    (danon.create_dala_model, dict(block_size=16, window=32, memory_size=8)),
    (danon.create_ucsa_model, dict(block_size=16, local_window_size=32, global_tokens=16, sparsity_factor=0.25)),
    (danon.create_super_hybrid_model, dict(block_size=16, window=32, memory_size=8, local_window_size=32,
                                           global_tokens=16, top_k_blocks=2)),
    (danon.create_dense_model, dict()),
]


@pytest.mark.parametrize("factory, kw", FACTORIES, ids=[f.__name__ for f, _ in FACTORIES])
def test_factory_models_give_the_prefix_of_the_logits_for_a_prefix(factory, kw):
    torch.manual_seed(0)
    model = factory(hidden_size=32, num_heads=4, num_kv_heads=2, num_layers=2, vocab_size=61, **kw).double().eval()
    with torch.no_grad():   # sharper attention than at init, so that a wrong selection shows in the logits
        for layer in model.layers:
            layer.attention.q_proj.weight.mul_(8)
    ids = torch.randint(0, 61, (2, 300))
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[1, :37] = False                    # left padding on the second row
    with torch.no_grad():
        full = model(ids, mask)
        for p in (1, 17, 128, 211):
            assert (full[:, :p] - model(ids[:, :p], mask[:, :p])).abs().max().item() <= 1e-10
