"""Limits: every family with a large enough window / k equals exact attention, and the exact
family equals torch's scaled_dot_product_attention (DESIGN.md sections 2 and 3)."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/: oracle.py
from oracle import alibi_slopes, oracle_attention, rel_err  # noqa: E402

import danon  # noqa: E402

B, H, N, D = 2, 4, 200, 16


def inputs(Hkv, seed, N=N, Nk=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    Nk = N if Nk is None else Nk
    q = torch.randn(B, H, N, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
    pad = torch.rand(B, Nk, generator=g) > 0.2
    pad[:, 0] = True  # no fully masked row (SDPA's convention for those differs from danon's)
    return q, k, v, pad


LIMITS = [
    ("ucsa", dict(local_window_size=10 ** 6)),
    ("ucsa", dict(local_window_size=N)),
    ("ucsa", dict(local_window_size=16, global_tokens=16, top_k_blocks=10 ** 3)),
    ("ucsa", dict(local_window_size=16, global_tokens=16, sparsity_factor=1.0)),
    ("msra", dict(window=10 ** 6)),
    ("msra", dict(window=N, num_levels=1, compression_factor=2)),
    ("msra", dict(window=N, num_levels="auto")),
    ("dala", dict(window=10 ** 6, decay="none")),
    ("dala", dict(window=N, decay="none", memory_size=4)),
    ("dala", dict(window=16, memory_size=10 ** 6, decay="none")),
]


@pytest.mark.parametrize("Hkv", [4, 1])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind,kw", LIMITS)
def test_family_limit_equals_exact(kind, kw, causal, Hkv):
    q, k, v, pad = inputs(Hkv, seed=21)
    fn = getattr(danon, f"{kind}_attention")
    out = fn(q, k, v, causal=causal, key_padding_mask=pad, block_size=16, **kw)
    ex = danon.exact_attention(q, k, v, causal=causal, key_padding_mask=pad)
    ref = oracle_attention(q, k, v, "exact", causal=causal, key_padding_mask=pad, block_size=16)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(ex, ref) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_dala_limit_is_alibi_attention(causal):
    """With a window covering everything DALA is exact attention with ALiBi's bias."""
    q, k, v, pad = inputs(2, seed=22)
    out = danon.dala_attention(q, k, v, causal=causal, key_padding_mask=pad, block_size=16,
                               window=10 ** 6)
    pos = torch.arange(N, dtype=torch.float64)
    bias = -alibi_slopes(H)[:, None, None] * (pos[:, None] - pos[None, :]).abs()  # [H, N, N]
    allowed = pad[:, None, None, :].expand(B, H, N, N)
    if causal:
        allowed = allowed & torch.ones(N, N, dtype=torch.bool).tril()
    mask = bias.expand(B, H, N, N).masked_fill(~allowed, float("-inf"))
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                         enable_gqa=True)
    assert rel_err(out, ref) < 1e-5


# --------------------------------------------------------------------------- exact == SDPA


def sdpa(q, k, v, **kw):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True, **kw)


@pytest.mark.parametrize("Hkv", [4, 2, 1])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.2])
def test_exact_equals_sdpa(causal, Hkv, scale):
    q, k, v, _ = inputs(Hkv, seed=23)
    out = danon.exact_attention(q, k, v, causal=causal, scale=scale)
    ref = sdpa(q, k, v, is_causal=causal, scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("Nq,Nk", [(80, 200), (200, 80)])
@pytest.mark.parametrize("causal", [False, True])
def test_exact_equals_sdpa_cross_lengths(Nq, Nk, causal):
    q, k, v, _ = inputs(2, seed=24, N=Nq, Nk=Nk)
    out = danon.exact_attention(q, k, v, causal=causal)
    # causal masking aligned bottom-right: query i sits at position Nk - Nq + i (SDPA's is_causal is top-left)
    visible = torch.arange(Nk)[None, :] <= torch.arange(Nq)[:, None] + (Nk - Nq)
    ref = sdpa(q, k, v, attn_mask=visible) if causal else sdpa(q, k, v)
    ref = torch.where(visible.any(-1, keepdim=True) | (not causal), ref, torch.zeros(()))
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("shape", ["full", "broadcast_heads", "2d"])
@pytest.mark.parametrize("Hkv", [4, 2])
def test_exact_bool_attn_mask(shape, Hkv):
    q, k, v, _ = inputs(Hkv, seed=25)
    g = torch.Generator().manual_seed(26)
    if shape == "full":
        m = torch.rand(B, H, N, N, generator=g) > 0.3
    elif shape == "broadcast_heads":
        m = torch.rand(B, 1, N, N, generator=g) > 0.3
    else:
        m = torch.rand(N, N, generator=g) > 0.3
    m[..., 0] = True  # keep every row non-empty
    out = danon.exact_attention(q, k, v, attn_mask=m)
    ref = sdpa(q, k, v, attn_mask=m)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Hkv", [4, 1])
def test_exact_float_attn_mask_with_padding(causal, Hkv):
    q, k, v, pad = inputs(Hkv, seed=27)
    g = torch.Generator().manual_seed(28)
    add = torch.randn(B, 1, N, N, generator=g)
    out = danon.exact_attention(q, k, v, attn_mask=add, key_padding_mask=pad, causal=causal, scale=0.3)
    allowed = pad[:, None, None, :].expand(B, 1, N, N)
    if causal:
        allowed = allowed & torch.ones(N, N, dtype=torch.bool).tril()
    full = add.double().masked_fill(~allowed, float("-inf"))
    ref = sdpa(q, k, v, attn_mask=full, scale=0.3)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_exact_key_padding_equals_sdpa(causal):
    q, k, v, pad = inputs(2, seed=29)
    out = danon.exact_attention(q, k, v, causal=causal, key_padding_mask=pad)
    m = pad[:, None, None, :]
    if causal:
        m = m & torch.ones(N, N, dtype=torch.bool).tril()
    ref = sdpa(q, k, v, attn_mask=m)
    assert rel_err(out, ref) < 1e-5


# --------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind,kw", [
    ("exact", {}),
    ("ucsa", dict(block_size=16, local_window_size=32, global_tokens=16, top_k_blocks=2)),
    ("msra", dict(block_size=16, window=32, num_levels=2, compression_factor=2)),
    ("dala", dict(block_size=16, window=32, memory_size=8)),
])
def test_attention_dispatch(kind, kw, causal):
    q, k, v, pad = inputs(2, seed=30)
    out = danon.attention(q, k, v, kind=kind, causal=causal, key_padding_mask=pad, **kw)
    direct = getattr(danon, f"{kind}_attention")(q, k, v, causal=causal, key_padding_mask=pad, **kw)
    torch.testing.assert_close(out, direct, rtol=0, atol=0)
    ref = oracle_attention(q, k, v, kind, causal=causal, key_padding_mask=pad,
                           **({"block_size": 16} | kw))
    assert rel_err(out, ref) < 1e-5


# --------------------------------------------------------------------------- plan coverage


def _coverage(kind, causal=True, **kw):
    q, k, v, pad = inputs(2, seed=31)
    plan = danon.attention_plan(q, k, kind=kind, causal=causal, key_padding_mask=pad, **kw)
    cov = danon.plan_coverage(plan)
    assert set(cov) >= {"exact", "summary", "skipped"}
    assert abs(cov["exact"] + cov["summary"] + cov["skipped"] - 1.0) < 1e-6
    return cov


@pytest.mark.parametrize("causal", [False, True])
def test_coverage_limits(causal):
    assert _coverage("exact", causal)["exact"] == pytest.approx(1.0)
    assert _coverage("ucsa", causal, block_size=16, local_window_size=10 ** 6)["exact"] == pytest.approx(1.0)
    assert _coverage("msra", causal, block_size=16, window=10 ** 6)["exact"] == pytest.approx(1.0)
    assert _coverage("dala", causal, block_size=16, window=10 ** 6)["exact"] == pytest.approx(1.0)


@pytest.mark.parametrize("causal", [False, True])
def test_coverage_sparse(causal):
    for kind, kw in [
        ("ucsa", dict(block_size=16, local_window_size=32, global_tokens=16, top_k_blocks=2)),
        ("msra", dict(block_size=16, window=32, num_levels=2, compression_factor=2)),
        ("dala", dict(block_size=16, window=32, memory_size=8)),
    ]:
        cov = _coverage(kind, causal, **kw)
        assert cov["summary"] > 0, (kind, cov)
        assert cov["skipped"] == pytest.approx(0.0, abs=1e-9), (kind, cov)
        assert cov["exact"] < 1.0, (kind, cov)
    cov = _coverage("ucsa", causal, block_size=16, local_window_size=32, global_tokens=16,
                    top_k_blocks=2, compress=False)
    assert cov["skipped"] > 0 and cov["summary"] == pytest.approx(0.0, abs=1e-9)
    cov = _coverage("dala", causal, block_size=16, window=32, memory_size=8, compress_rest=False)
    assert cov["skipped"] > 0 and cov["summary"] == pytest.approx(0.0, abs=1e-9)
