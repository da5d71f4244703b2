"""The executors agree: the fast CPU paths (flash on gathered key sets) against the reference executor.

The reference is itself checked against the float64 oracle (test_oracle_families.py) and by
gradcheck here, so agreement carries that correctness over to the paths users actually run.
"""
import itertools

import pytest
import torch

import danon
from danon.core.attention_args import BackwardArgs, attention_args
from danon.kernels import cpu, gather, reference

FAMILY_KW = {
    "msra": dict(window=16, num_levels=2, compression_factor=2),
    "ucsa": dict(local_window_size=16, top_k_blocks=2, global_tokens=16),
    "dala": dict(window=16, memory_size=8),
}


def _inputs(H, Hkv, N, D=8, dtype=torch.float64, seed=0, pad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, H, N, D, dtype=dtype, generator=g)
    k = torch.randn(2, Hkv, N, D, dtype=dtype, generator=g)
    v = torch.randn(2, Hkv, N, D, dtype=dtype, generator=g)
    kpm = None
    if pad:
        kpm = torch.rand(2, N, generator=g) > 0.3
        kpm[1, :20] = False   # left padding: early causal queries see no key
    return q, k, v, kpm


def _op_args(plan, q, k, v, kpm, scale=0.3):
    return attention_args(q, k, v, plan, scale=scale, key_padding_mask=kpm)


@pytest.mark.parametrize("kind,causal,pad,Hkv", list(itertools.product(["msra", "ucsa", "dala"], [False, True],
                                                                       [False, True], [4, 1])))
@pytest.mark.parametrize("chunked", [False, True])
def test_fast_path_equals_reference(kind, causal, pad, Hkv, chunked, monkeypatch):
    if chunked:   # one query block per chunk: windows inside the keys are views, those at the ends padded copies
        monkeypatch.setattr(gather, "GATHER_BUDGET", 1)
    q, k, v, kpm = _inputs(4, Hkv, 150, pad=pad)
    plan = danon.attention_plan(q, k, v, kind=kind, causal=causal, key_padding_mask=kpm, block_size=16,
                                **FAMILY_KW[kind])
    args = _op_args(plan, q, k, v, kpm)
    out, lse = cpu.attention_forward(args)
    ref_out, ref_lse = reference.reference_forward(args)
    assert not out.isnan().any()
    assert torch.allclose(out, ref_out, atol=1e-12, rtol=0)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse[finite], ref_lse[finite], atol=1e-12, rtol=0)

    grad_out = torch.randn_like(out)
    fast = cpu.attention_backward(args, BackwardArgs(grad_out, torch.zeros_like(lse), out, lse, True, False, False))
    slow = reference.reference_backward(args, BackwardArgs(grad_out, None, out, lse, True, False, False), False)
    for name, a, b in zip(["dq", "dk", "dv", "d_summary_k", "d_summary_v"], fast[:5], slow[:5]):
        assert a.shape == b.shape, name
        assert torch.allclose(a, b, atol=1e-11, rtol=0), name


@pytest.mark.parametrize("Hkv,pad,plan_kw", [(4, False, dict(window=16, memory_size=8)),
                                              (1, True, dict(window=32, memory_size=8, compress_rest=True)),
                                              (2, True, dict(window=0, memory_size=4))])
@pytest.mark.parametrize("chunked", [False, True])
def test_alibi_slopes_gradient_on_the_gathered_path_equals_reference(Hkv, pad, plan_kw, chunked, monkeypatch):
    # learnable ALiBi (DALA's default) under causal masking: the gathered path, not the reference, computes it
    if chunked:   # one query block per chunk: the window's and own block's ALiBi masks built once and shared
        monkeypatch.setattr(gather, "GATHER_BUDGET", 1)
    q, k, v, kpm = _inputs(4, Hkv, 150, pad=pad)
    slopes = torch.tensor([0.05, 0.1, 0.3, 0.01], dtype=torch.float64)
    plan = danon.attention_plan(q, k, v, kind="dala", causal=True, key_padding_mask=kpm, block_size=16,
                                slopes=slopes, **plan_kw)
    args = _op_args(plan, q, k, v, kpm)
    out, lse = cpu.attention_forward(args)
    grad_out = torch.randn_like(out)
    slow = reference.reference_backward(args, BackwardArgs(grad_out, None, out, lse, True, False, True), False)
    monkeypatch.setattr(cpu, "reference_backward", None)   # the fast path must not fall back
    fast = cpu.attention_backward(args, BackwardArgs(grad_out, torch.zeros_like(lse), out, lse, True, False, True))
    assert slow[6].abs().min() > 1e-3   # a real gradient to compare, per head
    for name, a, b in zip(["dq", "dk", "dv", "d_summary_k", "d_summary_v", "d_mask", "d_slopes"], fast, slow):
        assert a.shape == b.shape, name
        assert torch.allclose(a, b, atol=1e-10, rtol=0), name


def _gradcheck(fn, *inputs):
    return torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def _leaf(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def test_gradcheck_learnable_alibi_slopes():
    # 3 blocks: block 2 sees block 1 exactly and block 0 as routed tokens plus a summary
    q, k, v = _leaf(1, 2, 40, 4), _leaf(1, 1, 40, 4), _leaf(1, 1, 40, 4)
    slopes = torch.tensor([0.1, 0.3], dtype=torch.float64, requires_grad=True)
    for causal in (False, True):
        assert _gradcheck(lambda q, k, v, s: danon.dala_attention(q, k, v, causal=causal, block_size=16, window=16,
                                                                  memory_size=4, slopes=s), q, k, v, slopes)


def test_gradcheck_softcap_and_general_masks():
    q, k, v = _leaf(1, 2, 40, 4), _leaf(1, 1, 40, 4), _leaf(1, 1, 40, 4)
    assert _gradcheck(lambda q, k, v: danon.exact_attention(q, k, v, causal=True, softcap=2.0), q, k, v)
    bias4 = _leaf(1, 1, 40, 40)
    assert _gradcheck(lambda q, k, v, m: danon.exact_attention(q, k, v, attn_mask=m), q, k, v, bias4)
    bias2 = _leaf(40, 40)
    assert _gradcheck(lambda q, k, v, m: danon.exact_attention(q, k, v, attn_mask=m, causal=True), q, k, v, bias2)


def test_gradcheck_through_lse():
    q, k, v = _leaf(1, 4, 40, 8), _leaf(1, 2, 40, 8), _leaf(1, 2, 40, 8)

    def out_plus_lse(q, k, v):
        out, lse = torch.ops.danon.attention(q, k, v, None, None, None, None, None, None, None, None, None, None,
                                             0.3, True, 16, -1, -1, None)
        return out.sum() + lse.sum()

    assert _gradcheck(out_plus_lse, q, k, v)


def test_opcheck_attention_op():
    q, k, v, _ = _inputs(4, 2, 100, dtype=torch.float32)
    plan = danon.attention_plan(q, k, v, kind="dala", causal=True, block_size=16, window=32, memory_size=8)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), plan.block_idx, plan.token_idx,
            plan.summary_idx, plan.summary_k.detach().requires_grad_(), plan.summary_v.detach().requires_grad_(),
            plan.summary_count, plan.summary_pos, None, None, plan.slopes, 0.25, True, 16, plan.window, -1, None)
    result = torch.library.opcheck(torch.ops.danon.attention.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("kind", ["exact", "msra", "ucsa", "dala"])
def test_compiles_fullgraph_with_inductor(kind):
    q, k, v, _ = _inputs(4, 2, 300, D=16, dtype=torch.float32)
    kw = {"exact": {}, **{name: dict(block_size=16, **kw) for name, kw in FAMILY_KW.items()}}[kind]

    def fn(q, k, v):
        return danon.attention(q, k, v, kind=kind, causal=True, **kw)

    expected = fn(q, k, v)
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    assert torch.allclose(compiled(q, k, v), expected, atol=1e-6, rtol=0)


def test_flop_counter_sees_sparse_savings():
    from torch.utils.flop_counter import FlopCounterMode
    q, k, v, _ = _inputs(1, 1, 1024, D=16, dtype=torch.float32)
    counts = {}
    for kind, kw in [("exact", {}), ("msra", dict(window=64, block_size=16))]:
        with FlopCounterMode(display=False) as counter:
            danon.attention(q, k, v, kind=kind, causal=True, **kw)
        counts[kind] = counter.get_total_flops()
    # exact causal: 2 matmuls over ~N/2 keys per query
    assert counts["exact"] == 2 * 2 * 1024 * 512 * (16 + 16)   # B = 2, causal: N/2 keys per query
    assert 0 < counts["msra"] < counts["exact"] / 2


def test_attn_mask_with_a_sparse_plan_is_refused():
    q, k, v, _ = _inputs(2, 2, 64, dtype=torch.float32)
    plan = danon.attention_plan(q, k, v, kind="msra", block_size=16, window=16)
    with pytest.raises(ValueError, match="attn_mask"):
        cpu.attention_forward(attention_args(q, k, v, plan, scale=0.3, attn_mask=torch.zeros(64, 64)))


@pytest.mark.parametrize("kind", ["exact", "msra", "ucsa", "dala"])
def test_non_contiguous_and_shared_inputs(kind):
    """The usual [B, N, H, D] -> transpose(1, 2) layout, and q, k, v being one tensor, forward and backward."""
    kw = {"exact": {}, **{name: dict(block_size=16, **kw) for name, kw in FAMILY_KW.items()}}[kind]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 128, 4, 8, generator=g).transpose(1, 2).requires_grad_()       # N multiple of the block
    assert not x.is_contiguous()
    out = danon.attention(x, x, x, kind=kind, causal=True, **kw)
    ref = danon.attention(x.detach().contiguous(), x.detach().contiguous(), x.detach().contiguous(), kind=kind,
                          causal=True, **kw)
    assert torch.allclose(out, ref, atol=1e-6)
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _layouts(batch):
    """(name, q, k, v) in layouts models produce, each a view of fresh storage."""
    g = torch.Generator().manual_seed(5)
    yield "transposed", *(torch.randn(batch, 144, 4, 8, generator=g).transpose(1, 2) for _ in range(3))
    q, k, v = torch.randn(3, batch, 4, 144, 8, generator=g).unbind(0)     # contiguous, at storage offsets
    yield "unbound", q, k, v


@pytest.mark.parametrize("kind", ["msra", "ucsa", "dala"])
@pytest.mark.parametrize("batch", [1, 2])
def test_views_of_other_storage_equal_contiguous_copies(kind, batch):
    """Batch 1 makes [B, H, N, D] -> [B*H, N, D] a strided view, and unbind leaves k, v contiguous at an
    offset: the executor's strided key windows must read the tensor, not its storage."""
    kw = dict(block_size=16, **FAMILY_KW[kind])
    for name, *qkv in _layouts(batch):
        views = [x.detach().requires_grad_() for x in qkv]         # detach keeps the view's layout
        copies = [x.detach().clone().requires_grad_() for x in qkv]
        out = danon.attention(*views, kind=kind, causal=True, **kw)
        ref = danon.attention(*copies, kind=kind, causal=True, **kw)
        assert torch.allclose(out, ref, atol=1e-6), name
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
        out.backward(grad)
        ref.backward(grad)
        for a, b in zip(views, copies):
            assert torch.allclose(a.grad, b.grad, atol=1e-5), name


@pytest.mark.parametrize("causal,pad", [(False, False), (True, True)])
def test_lists_shorter_than_their_capacity_gather_only_the_used_slots_and_equal_the_reference(causal, pad):
    """UCSA's gamma lists fewer blocks than its capacity; the fast path gathers up to the last slot a chunk uses
    (not the capacity), forward and backward, and still equals the reference."""
    q, k, v, kpm = _inputs(4, 2, 300, pad=pad, seed=3)
    plan = danon.attention_plan(q, k, v, kind="ucsa", causal=causal, key_padding_mask=kpm, block_size=16,
                                local_window_size=16, global_tokens=0, top_k_blocks=12, gamma=0.4, scale=0.3)
    used = (plan.block_idx >= 0).sum(-1)
    assert int(used.max()) < plan.block_idx.shape[-1], "the plan must leave slots unused for this test"
    args = _op_args(plan, q, k, v, kpm)
    out, lse = cpu.attention_forward(args)
    ref_out, ref_lse = reference.reference_forward(args)
    assert torch.allclose(out, ref_out, atol=1e-12, rtol=0)
    grad_out = torch.randn_like(out)
    fast = cpu.attention_backward(args, BackwardArgs(grad_out, torch.zeros_like(lse), out, lse, True, False, False))
    slow = reference.reference_backward(args, BackwardArgs(grad_out, None, out, lse, True, False, False), False)
    for name, a, b in zip(["dq", "dk", "dv", "d_summary_k", "d_summary_v"], fast[:5], slow[:5]):
        assert torch.allclose(a, b, atol=1e-11, rtol=0), name
