"""Edge cases a PyTorch user meets: empty sizes, Dv != D, half precision with float masks, hand-made plans."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import danon
from danon.core.attention_args import AttentionArgs
from danon.kernels import cpu, reference

KINDS = ["exact", "msra", "ucsa", "dala"]
SMALL = {"exact": {}, "msra": dict(block_size=16, window=16), "ucsa": dict(block_size=16, local_window_size=16),
         "dala": dict(block_size=16, window=16, memory_size=4)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 2, 0, 8), (0, 2, 5, 8)])
def test_empty_inputs_give_empty_outputs_and_gradients(kind, shape):
    q = torch.randn(*shape, requires_grad=True)
    out = danon.attention(q, q, q, kind=kind, causal=True, **SMALL[kind])
    assert out.shape == shape
    out.sum().backward()
    assert q.grad.shape == shape


def test_no_keys_gives_zeros_like_the_no_visible_key_rule():
    q = torch.randn(1, 2, 5, 8)
    k = torch.randn(1, 2, 0, 8)
    assert torch.equal(danon.exact_attention(q, k, k), torch.zeros(1, 2, 5, 8))


@pytest.mark.parametrize("kind", KINDS)
def test_value_head_dim_may_differ(kind):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 64, 16, generator=g), torch.randn(1, 2, 64, 16, generator=g)
    v = torch.randn(1, 2, 64, 24, generator=g)
    out = danon.attention(q, k, v, kind=kind, causal=True, **SMALL[kind])
    assert out.shape == (1, 2, 64, 24)
    if kind == "exact":
        assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5)


def test_half_precision_with_a_float_mask_keeps_the_mask_in_fp32():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(3))
    bias = 1000 + 0.5 * torch.randn(1, 2, 64, 64, generator=g)
    ref = danon.exact_attention(q.double(), k.double(), v.double(), attn_mask=bias.double())
    out = danon.exact_attention(q.half(), k.half(), v.half(), attn_mask=bias)
    assert float((out.double() - ref).norm() / ref.norm()) < 2e-3


def test_sliding_window_with_more_queries_than_keys():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 1, 40, 4, generator=g), torch.randn(1, 1, 7, 4, generator=g), torch.randn(1, 1, 7, 4, generator=g)
    out = danon.exact_attention(q, k, v, sliding_window=16, block_size=16)
    i, j = torch.arange(40)[:, None] + (7 - 40), torch.arange(7)[None, :]     # query i sits at position Nk - Nq + i
    band = (i - j).abs() < 16
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=band)
    ref = torch.where(band.any(-1, keepdim=True), ref, torch.zeros(()))
    assert torch.allclose(out, ref, atol=1e-6)


def test_hand_made_plan_with_tokens_in_the_own_block_agrees_across_executors():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 64, 8, generator=g, dtype=torch.float64) for _ in range(3))
    token_idx = torch.tensor([[[[0, 3, -1], [16, 20, 5], [33, 40, 2], [48, 63, 10]]]], dtype=torch.int32)
    args = AttentionArgs(q, k, v, None, token_idx, None, None, None, None, None, None, None, None, 0.3, True, 16, -1,
                         -1, None)
    fast, _ = cpu.attention_forward(args)
    slow, _ = reference.reference_forward(args)
    assert torch.allclose(fast, slow, atol=1e-12)


def test_flop_counter_counts_forward_and_backward():
    q = torch.randn(1, 2, 256, 16, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        danon.attention(q, q, q, kind="msra", causal=True, block_size=16, window=32).sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    forward = counts["danon.attention"]
    assert forward > 0 and counts["danon.attention_backward"] == 3 * forward


def test_op_rejects_a_zero_band():
    q = torch.randn(1, 1, 32, 8)
    with pytest.raises(ValueError, match="band"):
        torch.ops.danon.attention(q, q, q, None, None, None, None, None, None, None, None, None, None,
                                  0.3, True, 16, 0, 0, None)


def test_flags_must_be_real_booleans_and_slopes_need_alibi():
    q = torch.randn(1, 2, 64, 8)
    with pytest.raises(TypeError, match="causal"):
        danon.msra_attention(q, q, q, causal="False")
    with pytest.raises(ValueError, match="slopes"):
        danon.dala_attention(q, q, q, decay="none", slopes=torch.ones(2))


def test_tensors_on_different_devices_are_named():
    q = torch.randn(1, 2, 64, 8)
    with pytest.raises(ValueError, match="k is on meta"):
        danon.exact_attention(q, q.to("meta"), q)
    with pytest.raises(ValueError, match="key_padding_mask is on meta"):
        danon.exact_attention(q, q, q, key_padding_mask=torch.ones(1, 64, dtype=torch.bool, device="meta"))


def test_coverage_of_a_banded_plan_counts_only_the_band():
    q = torch.randn(1, 1, 512, 8)
    cov = danon.plan_coverage(danon.attention_plan(q, q, kind="exact", causal=True, block_size=64, sliding_window=5))
    assert cov["exact"] < 0.05 and abs(sum(cov.values()) - 1) < 1e-9


@pytest.mark.parametrize("kind", KINDS)
def test_inputs_whose_last_dim_is_not_contiguous(kind):
    """The fused CPU kernel misreads stride(-1) != 1: the executors must hand it contiguous rows."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 16, 64, generator=g).transpose(-1, -2).requires_grad_()     # [1, 2, 64, 16], stride(-1) = 64
    assert x.stride(-1) != 1
    out = danon.attention(x, x, x, kind=kind, causal=True, **SMALL[kind])
    y = x.detach().contiguous().requires_grad_()
    ref = danon.attention(y, y, y, kind=kind, causal=True, **SMALL[kind])
    assert torch.allclose(out, ref, atol=1e-6)
    out.sum().backward()
    ref.sum().backward()
    assert torch.allclose(x.grad, y.grad, atol=1e-5)
