"""Gradients of every family (DESIGN.md section 3: summaries are differentiable, gradients reach
k and v through the means; selections are not; fully masked rows give zeros, never NaN)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/: oracle.py
from oracle import oracle_attention, oracle_plan  # noqa: E402

import danon  # noqa: E402

B, H, HKV, N, D, BS = 1, 2, 1, 80, 8, 16

# N = 80, b = 16 (5 key blocks): every sparse family has summaries, causal or not (checked below).
CONFIGS = {
    "exact": {},
    "ucsa": dict(local_window_size=16, global_tokens=16, top_k_blocks=1),
    "msra": dict(window=16, num_levels=1, compression_factor=2),
    "dala": dict(window=16, memory_size=4),
}


def call(kind, q, k, v, **kw):
    if kind == "exact":
        return danon.exact_attention(q, k, v, **kw)
    kw = {"block_size": BS} | kw
    return getattr(danon, f"{kind}_attention")(q, k, v, **kw)


def make(seed, dtype=torch.float64, n=N):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, n, D, generator=g, dtype=dtype)
    k = torch.randn(B, HKV, n, D, generator=g, dtype=dtype)
    v = torch.randn(B, HKV, n, D, generator=g, dtype=dtype)
    pad = torch.rand(B, n, generator=g) > 0.2
    pad[:, 0] = True
    imp = torch.randn(B, HKV, n, generator=g, dtype=dtype)
    return q, k, v, pad, imp


def family_kw(kind, imp):
    kw = dict(CONFIGS[kind])
    if kind == "dala":
        kw["importance"] = imp  # explicit: selection independent of the perturbed k
    return kw


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["exact", "ucsa", "msra", "dala"])
def test_gradcheck(kind, causal, masked):
    q, k, v, pad, imp = make(seed=40 + 2 * causal + masked)
    pad = pad if masked else None
    kw = family_kw(kind, imp)
    if kind != "exact":
        plans = oracle_plan(q, k, kind, causal=causal, key_padding_mask=pad, block_size=BS, **kw)
        assert any(len(s) > 0 for (_, _, s) in plans.values()), "config must have summaries"
    qs, ks, vs = (t.clone().requires_grad_(True) for t in (q, k, v))

    def f(q_, k_, v_):
        return call(kind, q_, k_, v_, causal=causal, key_padding_mask=pad, **kw)

    assert torch.autograd.gradcheck(f, (qs, ks, vs), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("causal", [False, True])
# the sparse families' full gradchecks take 18-27 s each (the plan backward rebuilds the plan per column):
# -m slow; the default run keeps their fast-mode gradcheck above and the fp64 oracle gradients below
@pytest.mark.parametrize("kind", ["exact"] + [pytest.param(k, marks=pytest.mark.slow) for k in ("ucsa", "msra", "dala")])
def test_full_gradcheck_small(kind, causal):
    """Full (not fast-mode) gradcheck on a smaller shape: N = 64 (4 blocks of 16), window 1 block."""
    n = 64
    q, k, v, pad, imp = make(seed=50 + causal, n=n)
    kw = {
        "exact": {},
        "ucsa": dict(local_window_size=1, global_tokens=16, top_k_blocks=0),
        "msra": dict(window=1, num_levels=1, compression_factor=2),
        "dala": dict(window=1, memory_size=3, importance=imp[..., :n]),
    }[kind]
    if kind != "exact":
        plans = oracle_plan(q, k, kind, causal=causal, key_padding_mask=pad, block_size=BS, **kw)
        assert any(len(s) > 0 for (_, _, s) in plans.values()), "config must have summaries"
    qs, ks, vs = (t.clone().requires_grad_(True) for t in (q, k, v))

    def f(q_, k_, v_):
        return call(kind, q_, k_, v_, causal=causal, key_padding_mask=pad, **kw)

    assert torch.autograd.gradcheck(f, (qs, ks, vs), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["exact", "ucsa", "msra", "dala"])
def test_gradients_match_oracle(kind, causal):
    """Every entry of dq, dk, dv against the float64 oracle's autograd gradients."""
    q, k, v, pad, imp = make(seed=60 + causal)
    kw = family_kw(kind, imp)
    g = torch.randn(B, H, N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(61))
    grads = []
    for fn in (lambda *a: call(kind, *a, causal=causal, key_padding_mask=pad, **kw),
               lambda *a: oracle_attention(*a, kind, causal=causal, key_padding_mask=pad,
                                           block_size=BS, **kw)):
        qs, ks, vs = (t.clone().requires_grad_(True) for t in (q, k, v))
        (fn(qs, ks, vs) * g).sum().backward()
        grads.append((qs.grad, ks.grad, vs.grad))
    for name, a, b in zip("qkv", *grads):
        err = ((a - b).norm() / b.norm()).item()
        assert err < 1e-10, f"d{name}: rel err {err:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["exact", "ucsa", "msra", "dala"])
def test_fully_masked_rows_zero_and_finite_grads(kind, dtype):
    """Causal + left padding: the first `lp` queries see no key. Their outputs are exactly zero,
    every gradient is finite, and no gradient reaches those queries or the padded keys."""
    lp = 20
    q, k, v, _, imp = make(seed=70, dtype=dtype)
    pad = torch.ones(B, N, dtype=torch.bool)
    pad[:, :lp] = False
    kw = family_kw(kind, imp.to(dtype))
    qs, ks, vs = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = call(kind, qs, ks, vs, causal=True, key_padding_mask=pad, **kw)
    assert not torch.isnan(out).any()
    assert (out[:, :, :lp] == 0).all()
    assert (out[:, :, lp:].abs().sum(-1) > 0).all()
    g = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(71))
    (out * g).sum().backward()
    for t in (qs, ks, vs):
        assert torch.isfinite(t.grad).all()
    assert (qs.grad[:, :, :lp] == 0).all()
    assert (ks.grad[:, :, :lp] == 0).all()
    assert (vs.grad[:, :, :lp] == 0).all()
    assert qs.grad[:, :, lp:].abs().sum() > 0


@pytest.mark.parametrize("kind", ["ucsa", "msra", "dala"])
def test_summary_gradients_reach_far_keys(kind):
    """Gradients reach k and v through the summaries: the keys of block 1, which the last query
    block sees only through a summary, get non-zero gradients from the last queries."""
    q, k, v, _, imp = make(seed=80)
    kw = family_kw(kind, imp)
    if kind == "dala":
        kw["memory_size"] = 0
    elif kind == "ucsa":
        kw["top_k_blocks"] = 0
    plans = oracle_plan(q, k, kind, causal=True, key_padding_mask=None, block_size=BS, **kw)
    blocks, extra, summaries = plans[(0, 0, N // BS - 1)]
    far = range(BS, 2 * BS)
    assert 1 not in blocks and not set(far) & set(extra)
    assert any(set(far) <= set(s) for s in summaries)
    qs, ks, vs = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = call(kind, qs, ks, vs, causal=True, **kw)
    out[:, :, -BS:].sum().backward()
    assert ks.grad[:, :, BS:2 * BS].abs().sum(-1).gt(0).all()
    assert vs.grad[:, :, BS:2 * BS].abs().sum(-1).gt(0).all()


def _closed_form_matches_autograd(build, backward, options, nq, nk, masked, seed, **kw):
    """A family's closed-form summary backward against autograd through the plan `build` makes, in float64 on random
    summary gradients: B 2, H 4, Hkv 2, padding if `masked`. Returns the plan."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, nq, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, nk, D, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    pad = None
    if masked:
        pad = torch.rand(2, nk, generator=g) > 0.3
        pad[1, :20] = False
    plan = build(q, k, v, key_padding_mask=pad, block_size=BS, **kw)
    assert plan.summary_k is not None
    gk, gv = (torch.randn(plan.summary_k.shape, generator=g, dtype=torch.float64) for _ in range(2))
    expected = torch.autograd.grad([plan.summary_k, plan.summary_v], [k, v], [gk, gv])
    with torch.no_grad():
        rebuilt = build(q, k.detach(), v.detach(), key_padding_mask=pad, block_size=BS, **kw)
    got = backward(rebuilt, options, pad, gk, gv, k.detach(), v.detach())
    for name, x, y in zip(("dk", "dv"), got, expected):
        assert x.shape == y.shape and x.dtype == y.dtype, name
        assert torch.allclose(x, y, atol=1e-12, rtol=0), (name, (x - y).abs().max())
    assert expected[0].abs().sum() > 0
    return plan


@pytest.mark.parametrize("causal,masked,nq,memory", [(True, False, 80, 4), (True, True, 80, 4), (False, True, 80, 4),
                                                     (False, False, 80, 0), (True, True, 37, 4), (True, False, 5, 6)])
def test_dala_closed_form_summary_backward_equals_autograd_through_the_plan(causal, masked, nq, memory):
    """danon::plan_backward's closed form for DALA (dala_summary_backward): routed tokens or none, fewer queries than
    keys, causal or not."""
    from danon.core.dala import dala_plan, dala_summary_backward
    plan = _closed_form_matches_autograd(dala_plan, dala_summary_backward, {}, nq, N, masked, 90 + nq + memory,
                                         causal=causal, window=16, memory_size=memory, decay="alibi",
                                         compress_rest=True)
    assert (plan.token_idx is not None) == (memory > 0)


@pytest.mark.parametrize("causal,masked,nk,levels,c", [(True, False, 80, 1, 2), (True, True, 90, 2, 2),
                                                       (False, True, 80, 2, 3), (False, False, 256, 3, 2),
                                                       (True, True, 250, "auto", 4)])
def test_msra_closed_form_summary_backward_equals_autograd_through_the_plan(causal, masked, nk, levels, c):
    """msra_summary_backward: a partial last block and partial top-level spans, up to 3 levels."""
    from danon.core.msra import msra_plan, msra_summary_backward
    _closed_form_matches_autograd(msra_plan, msra_summary_backward, {"compression_factor": c}, nk, nk, masked,
                                  100 + nk, causal=causal, window=16, num_levels=levels, compression_factor=c)


@pytest.mark.parametrize("causal,masked,nq,nk,gamma", [(True, False, 80, 80, None), (True, True, 90, 90, None),
                                                       (False, True, 80, 80, 0.9), (True, True, 37, 90, None),
                                                       (False, False, 256, 256, None)])
def test_ucsa_closed_form_summary_backward_equals_autograd_through_the_plan(causal, masked, nq, nk, gamma):
    """ucsa_summary_backward: each block's mean, the selection (by scores or by estimated mass) without gradient,
    a partial last block, padding, fewer queries than keys."""
    from danon.core.ucsa import ucsa_plan, ucsa_summary_backward
    kw = dict(past_queries=torch.randn(2, 4, nk - nq, D, dtype=torch.float64)) if nq < nk else {}
    _closed_form_matches_autograd(ucsa_plan, ucsa_summary_backward, {}, nq, nk, masked, 110 + nq, causal=causal,
                                  local_window_size=16, global_tokens=16, top_k_blocks=1, compress=True,
                                  sparsity_factor=None, gamma=gamma, **kw)


@pytest.mark.parametrize("kind", ["ucsa", "msra", "dala"])
def test_summary_backward_reuses_the_forward_plan(kind, monkeypatch):
    """danon::plan saves its plan for the backward: every family's closed form reads it (no second build of the
    plan, which at N = 16k cost about 8 ms for MSRA and 20 ms for DALA, and at 64k several hundred for UCSA)."""
    import danon.core.plan_op as plan_op
    builds = []
    real = plan_op._run_builder
    monkeypatch.setattr(plan_op, "_run_builder", lambda *a, **kw: builds.append(kw) or real(*a, **kw))
    q, k, v, pad, imp = make(200)
    k.requires_grad_()
    out = call(kind, q, k, v, causal=True, **family_kw(kind, imp))
    assert len(builds) == 1
    out.backward(torch.randn_like(out))
    assert len(builds) == 1
    assert torch.isfinite(k.grad).all() and k.grad.abs().sum() > 0
