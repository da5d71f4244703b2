"""The exact family's banded plan (Mistral-style sliding window) against a dense masked reference."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import danon


def _band(n, w, causal):
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return ((i - j < w) & (j <= i)) if causal else ((i - j).abs() < w)


@pytest.mark.parametrize("causal,w,n,pad,Hkv", list(itertools.product([True, False], [1, 5, 16, 17, 40, 500],
                                                                      [37, 100], [False, True], [4, 2])))
def test_banded_exact_equals_dense_masked_attention(causal, w, n, pad, Hkv):
    g = torch.Generator().manual_seed(n + w)
    q = torch.randn(2, 4, n, 8, dtype=torch.float64, generator=g).requires_grad_()
    k = torch.randn(2, Hkv, n, 8, dtype=torch.float64, generator=g).requires_grad_()
    v = torch.randn(2, Hkv, n, 8, dtype=torch.float64, generator=g).requires_grad_()
    kpm = (torch.rand(2, n, generator=g) > 0.3) if pad else None
    mask = _band(n, w, causal)[None, None]
    if kpm is not None:
        mask = mask & kpm[:, None, None, :]
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(4 // Hkv, 1), v.repeat_interleave(4 // Hkv, 1),
                                         attn_mask=mask)
    ref = torch.where(mask.any(-1, keepdim=True), ref, torch.zeros(()))       # SDPA gives NaN for empty rows
    out = danon.exact_attention(q, k, v, causal=causal, sliding_window=w, key_padding_mask=kpm, block_size=16)
    assert torch.allclose(out, ref, atol=1e-10, rtol=0)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad),
                    torch.autograd.grad(danon.exact_attention(q, k, v, attn_mask=mask), (q, k, v), grad)):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)


def test_banded_plan_costs_n_times_w():
    q = torch.randn(1, 1, 8192, 8)
    plan = danon.attention_plan(q, q, kind="exact", causal=True, sliding_window=256)
    assert plan.keys_per_query() == 256
    assert plan.window == 4


def test_sliding_window_argument_checks():
    q = torch.randn(1, 1, 32, 8)
    with pytest.raises(ValueError, match="sliding_window"):
        danon.exact_attention(q, q, q, sliding_window=0)
    with pytest.raises(ValueError, match="sliding_window"):
        danon.exact_attention(q, q, q, sliding_window=4, attn_mask=torch.ones(32, 32, dtype=torch.bool))
