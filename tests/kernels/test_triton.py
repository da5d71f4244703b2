"""The Triton executor (danon/kernels/triton.py) against the float64 oracle and the CPU executor.

On CPU the kernels run in Triton's interpreter (the same kernel source the GPU compiles), whatever
TRITON_INTERPRET says: danon/kernels/triton.py loads an interpreted copy of them for CPU tensors. The
interpreter is slow (each tile op is numpy called from Python), so shapes are small and the grid
is narrow here; the wider grid is marked slow and the realistic sizes are the GPU tests at the end.
"""
import os
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/: oracle.py
from oracle import oracle_attention, rel_err  # noqa: E402

import danon  # noqa: E402
from danon.core.attention_args import AttentionArgs, BackwardArgs, attention_args  # noqa: E402
from danon.kernels import reference  # noqa: E402
from danon.kernels import triton as triton_executor  # noqa: E402
from danon.kernels import triton_attention, triton_attention_backward  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
BS = 16
# every sparse family is genuinely sparse at N = 100..150 with b = 16 (summaries and listed keys exist)
FAMILY = {
    "exact": {},
    "msra": dict(window=16, num_levels=2, compression_factor=2),
    "ucsa": dict(local_window_size=16, global_tokens=16, top_k_blocks=2),
    "dala": dict(window=16, memory_size=8),
}
KINDS = list(FAMILY)


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode()) % 10 ** 6


def _inputs(B, H, Hkv, N, D, seed, dtype=torch.float32, Nk=None, pad=False):
    """Fresh random q, k, v (rounded to dtype), and optionally a key padding mask: random ~30% padding
    in batch 0 and 20 left-padded keys in batch 1 (so under causal masking its first rows see no key)."""
    g = torch.Generator().manual_seed(seed)
    Nk = N if Nk is None else Nk
    q = torch.randn(B, H, N, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
    kpm = None
    if pad:
        kpm = torch.rand(B, Nk, generator=g) > 0.3
        if B > 1:
            kpm[1] = True
            kpm[1, :20] = False
    return q, k, v, kpm


def _grads(out, tensors, go):
    return torch.autograd.grad((out.double() * go).sum(), tensors, retain_graph=True)


def _run_family(kind, q, k, v, kpm, causal, dtype):
    """Triton forward + backward and the float64 oracle's, on the same (rounded) inputs."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    plan = danon.attention_plan(*leaves, kind=kind, causal=causal, key_padding_mask=kpm, block_size=BS,
                                **FAMILY[kind])
    out, lse = triton_attention(*leaves, plan, key_padding_mask=kpm)
    ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = oracle_attention(*ref_leaves, kind, causal=causal, key_padding_mask=kpm, block_size=BS, **FAMILY[kind])
    go = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    return leaves, plan, out, lse, _grads(out, leaves, go), ref, _grads(ref, ref_leaves, go), go


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_family_fp32_against_oracle_and_cpu_executor(kind, causal):
    """GQA (H = 2, Hkv = 1), key padding with rows that see no key, a partial last block (N = 150)."""
    q, k, v, kpm = _inputs(2, 2, 1, 150, 16, _seed(kind, causal), pad=True)
    leaves, plan, out, lse, grads, ref, ref_grads, go = _run_family(kind, q, k, v, kpm, causal, torch.float32)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[torch.float32]
    for name, g, r in zip("qkv", grads, ref_grads):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, r) < TOL[torch.float32], name
    if causal:   # batch 1's first 20 queries see no key: zeros and lse -inf, gradients zero
        assert (out[1, :, :20] == 0).all() and torch.isneginf(lse[1, :, :20]).all()
        assert (grads[0][1, :, :20] == 0).all()

    # the CPU executor on the same plan agrees, forward and backward
    cpu_out, cpu_lse = torch.ops.danon.attention(
        *leaves, plan.block_idx, plan.token_idx, plan.summary_idx, plan.summary_k, plan.summary_v,
        plan.summary_count, plan.summary_pos, kpm, None, plan.slopes, 16 ** -0.5, causal, BS,
        -1 if plan.window is None else plan.window, -1, None)
    assert rel_err(out, cpu_out) < TOL[torch.float32]
    assert torch.equal(torch.isneginf(lse), torch.isneginf(cpu_lse))
    finite = torch.isfinite(cpu_lse)
    assert torch.allclose(lse[finite], cpu_lse[finite], atol=1e-5, rtol=0)
    cpu_grads = _grads(cpu_out, leaves, go)
    for name, g, r in zip("qkv", grads, cpu_grads):
        assert rel_err(g, r) < TOL[torch.float32], name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_family_half_precision(kind, dtype):
    """fp16 / bf16 inputs (fp32 accumulation) against the float64 oracle of the same rounded inputs."""
    q, k, v, kpm = _inputs(1, 2, 1, 100, 16, _seed(kind, dtype), dtype=dtype)
    _, _, out, _, grads, ref, ref_grads, _ = _run_family(kind, q, k, v, kpm, True, dtype)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype, name
        assert rel_err(g, r) < TOL[dtype], name


def _op_args(q, k, v, plan, kpm):
    return (q, k, v, plan.block_idx, plan.token_idx, plan.summary_idx, plan.summary_k, plan.summary_v,
            plan.summary_count, plan.summary_pos, kpm, None, plan.slopes)


def test_alibi_softcap_lse_and_slope_gradients_match_the_reference_executor():
    """DALA's ALiBi slopes with their gradient, a softcap, and a gradient through the lse, against
    danon/kernels/reference.py (the hand-written backward the CPU executor falls back to for these)."""
    q, k, v, kpm = _inputs(2, 4, 2, 120, 32, seed=5, pad=True)
    plan = danon.attention_plan(q, k, v, kind="dala", causal=True, key_padding_mask=kpm, block_size=32,
                                window=32, memory_size=8)
    slopes = torch.tensor([0.3, 0.1, 0.05, 0.02])
    plan.slopes = slopes
    args = _op_args(q, k, v, plan, kpm)
    opts = (0.2, True, 32, plan.window, -1, 1.5)
    a = AttentionArgs(*args, *opts)
    out, lse = triton_executor.attention_forward(a)
    ref_out, ref_lse = reference.reference_forward(a)
    assert rel_err(out, ref_out) < 1e-5
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse)) and torch.allclose(lse[finite], ref_lse[finite], atol=1e-5)
    g = torch.Generator().manual_seed(9)
    go, glse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    got = triton_executor.attention_backward(a, BackwardArgs(go, glse, out, lse, True, False, True))
    want = reference.reference_backward(a, BackwardArgs(go, glse, ref_out, ref_lse, True, False, True), True)
    for name, a, b in zip(["dq", "dk", "dv", "d_summary_k", "d_summary_v", "d_mask", "d_slopes"], got, want):
        assert a.shape == b.shape, name
        if b.numel():
            assert rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("causal", [False, True])
def test_exact_cross_attention_band_and_layouts(causal):
    """The exact family with Nq != Nk, a sliding window (band), Dv != D, b = 32, strided q/k/v."""
    g = torch.Generator().manual_seed(11 + causal)
    # [B, N, H, D] tensors viewed as [B, H, N, D]: strided, last dim contiguous
    q = torch.randn(2, 70, 4, 32, generator=g).transpose(1, 2)
    k = torch.randn(2, 130, 2, 32, generator=g).transpose(1, 2)
    v = torch.randn(2, 130, 2, 48, generator=g)[..., :16].transpose(1, 2)   # Dv = 16, rows not contiguous
    assert not q.is_contiguous() and not v.is_contiguous()
    plan = danon.attention_plan(q, k, v, kind="exact", causal=causal, block_size=32)
    out, _ = triton_attention(q, k, v, plan, scale=0.3)
    # causal masking aligned bottom-right (query i at position Nk - Nq + i); SDPA's is_causal is top-left
    visible = torch.arange(130)[None, :] <= torch.arange(70)[:, None] + (130 - 70) if causal else None
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1), attn_mask=visible,
        scale=0.3)
    assert rel_err(out, want) < 1e-5

    x = torch.randn(1, 2, 150, 16, generator=g)
    kpm = torch.rand(1, 150, generator=g) > 0.2
    kpm[0, 0] = True   # every row sees a key (SDPA, the reference here, gives NaN for one that sees none)
    plan = danon.attention_plan(x, x, x, kind="exact", causal=causal, sliding_window=40, block_size=16,
                                key_padding_mask=kpm)
    xs = [x.clone().requires_grad_() for _ in range(3)]
    out, _ = triton_attention(*xs, plan, key_padding_mask=kpm)
    ref_leaves = [x.double().requires_grad_() for _ in range(3)]
    i = torch.arange(150)
    allowed = ((i[:, None] - i[None, :]).abs() < 40) & kpm[0][None, :]
    if causal:
        allowed &= i[None, :] <= i[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_leaves, attn_mask=allowed)
    assert rel_err(out, ref) < 1e-5
    go = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    for name, a, b in zip("qkv", _grads(out, xs, go), _grads(ref, ref_leaves, go)):
        assert rel_err(a, b) < 1e-5, name


def test_summary_gradients_by_hand_match_autograd():
    """triton_attention_backward's summary gradients, carried through the plan's means by autograd,
    give the same dk and dv as differentiating triton_attention."""
    q, k, v, _ = _inputs(1, 2, 2, 96, 16, seed=21)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    plan = danon.attention_plan(*leaves, kind="msra", causal=False, block_size=16, window=16, num_levels=1)
    out, lse = triton_attention(*leaves, plan)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    dq, dk, dv = torch.autograd.grad((out * go).sum(), leaves, retain_graph=True)
    g = triton_attention_backward(go, *leaves, plan, out.detach(), lse.detach())
    assert g["slopes"] is None and g["summary_k"].shape == plan.summary_k.shape
    assert g["summary_k"].abs().sum() > 0   # the summaries really are attended to
    dk_means, dv_means = torch.autograd.grad((plan.summary_k, plan.summary_v), (leaves[1], leaves[2]),
                                             (g["summary_k"], g["summary_v"]))
    assert torch.allclose(g["q"], dq, atol=1e-6)
    assert torch.allclose(g["k"] + dk_means, dk, atol=1e-6)
    assert torch.allclose(g["v"] + dv_means, dv, atol=1e-6)


def test_outputs_are_poisoned_until_the_kernel_writes_them(monkeypatch):
    """The executor allocates out, lse and dq filled with NaN, so a row a kernel forgets shows up as NaN
    (and the finiteness checks above are meaningful): with launches that do nothing, all of it is NaN."""
    class Skip:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    class NoKernels:
        _forward = _backward_dq = _backward_dkdv_near = Skip()

    monkeypatch.setattr(triton_executor, "_kernels", lambda interpret: NoKernels())
    q, k, v, _ = _inputs(1, 2, 1, 40, 16, seed=1)
    opts = (0.25, False, 16, -1, -1, None)
    a = AttentionArgs(q, k, v, *[None] * 10, *opts)
    out, lse = triton_executor.attention_forward(a)
    assert out.isnan().all() and lse.isnan().all()
    dq = triton_executor.attention_backward(a, BackwardArgs(torch.ones_like(q), None, q, lse, False, False, False))[0]
    assert dq.isnan().all()


def test_interpreted_and_compiled_copies_do_not_depend_on_the_environment():
    """CPU tensors get interpreted kernels and CUDA tensors compiled ones, whatever TRITON_INTERPRET was
    when triton was imported (Inductor imports it early)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    assert isinstance(triton_executor._kernels(True)._forward, InterpretedFunction)
    assert isinstance(triton_executor._kernels(False)._forward, JITFunction)


def test_clear_errors():
    q, k, v, _ = _inputs(1, 2, 1, 32, 16, seed=2)
    plan = danon.attention_plan(q, k, v, kind="exact", causal=True, block_size=16)
    with pytest.raises(ValueError, match="causal=False contradicts the plan"):
        triton_attention(q, k, v, plan, causal=False)
    with pytest.raises(ValueError, match="float64"):
        triton_attention(q.double(), k.double(), v.double(), plan)
    with pytest.raises(ValueError, match="attn_mask"):
        triton_executor.attention_forward(AttentionArgs(q, k, v, *[None] * 8, torch.ones(32, 32, dtype=torch.bool),
                                                        None, 0.25, True, 16, -1, -1, None))
    with pytest.raises(ValueError, match="block_idx must have shape"):
        triton_executor.attention_forward(AttentionArgs(q, k, v, torch.zeros(1, 1, 5, 1, dtype=torch.int32),
                                                        *[None] * 9, 0.25, True, 16, -1, -1, None))


# --------------------------------------------------------------------------- wider grid (slow)

@pytest.mark.slow
@pytest.mark.parametrize("N,b", [(256, 16), (200, 32)])
@pytest.mark.parametrize("Hkv", [4, 1])
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_family_grid_slow(kind, causal, pad, Hkv, N, b):
    global BS
    q, k, v, kpm = _inputs(2, 4, Hkv, N, 32, _seed(kind, causal, pad, Hkv, N, b), pad=pad)
    old, BS = BS, b
    try:
        _, _, out, _, grads, ref, ref_grads, _ = _run_family(kind, q, k, v, kpm, causal, torch.float32)
    finally:
        BS = old
    assert rel_err(out, ref) < TOL[torch.float32]
    for name, g, r in zip("qkv", grads, ref_grads):
        assert rel_err(g, r) < TOL[torch.float32], name


# --------------------------------------------------------------------------- GPU, realistic sizes

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_family_against_float64_reference(kind, causal, D, dtype):
    """N = 2000 (a partial last block), GQA, padding, b = 64: the compiled kernels against the reference
    executor run in float64 on the same inputs and the same plan, forward and backward."""
    fam = {"exact": {}, "msra": dict(window=256, num_levels=2), "ucsa": dict(local_window_size=256, top_k_blocks=4),
           "dala": dict(window=256, memory_size=64)}[kind]
    q, k, v, kpm = (x.cuda() for x in _inputs(2, 8, 2, 2000, D, _seed(kind, causal, D), dtype=dtype, pad=True))
    plan = danon.attention_plan(q, k, v, kind=kind, causal=causal, key_padding_mask=kpm, block_size=64, **fam)
    args = _op_args(q, k, v, plan, kpm)
    args64 = [x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in args]
    opts = (D ** -0.5, causal, 64, -1 if plan.window is None else plan.window, -1, None)
    a, a64 = AttentionArgs(*args, *opts), AttentionArgs(*args64, *opts)
    out, lse = triton_executor.attention_forward(a)
    ref, ref_lse = reference.reference_forward(a64)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]
    go = torch.randn(out.shape, device="cuda").to(dtype)
    got = triton_executor.attention_backward(a, BackwardArgs(go, None, out, lse, True, False, False))
    want = reference.reference_backward(a64, BackwardArgs(go.double(), None, ref, ref_lse, True, False, False), False)
    for name, a, b in zip(["dq", "dk", "dv", "d_summary_k", "d_summary_v"], got, want):
        assert a.shape == b.shape, name
        if b.numel():
            assert torch.isfinite(a).all(), name
            assert rel_err(a, b) < TOL[dtype], name


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_op_dispatches_to_triton_and_compiles(kind, monkeypatch):
    """danon::attention on CUDA runs the Triton executor, eagerly and under torch.compile."""
    q, k, v, _ = (x.cuda() if x is not None else None for x in _inputs(1, 8, 2, 1024, 64, seed=4, dtype=torch.bfloat16))
    kw = {"exact": {}, "msra": dict(window=128), "ucsa": dict(local_window_size=128, top_k_blocks=2),
          "dala": dict(window=128, memory_size=32)}[kind]
    plan = danon.attention_plan(q, k, v, kind=kind, causal=True, **kw)
    want, _ = triton_attention(q, k, v, plan)
    calls = []
    original = triton_executor.attention_forward
    monkeypatch.setattr(triton_executor, "attention_forward", lambda *a: calls.append(1) or original(*a))
    got = danon.attention(q, k, v, kind=kind, causal=True, **kw)
    compiled = torch.compile(lambda q, k, v: danon.attention(q, k, v, kind=kind, causal=True, **kw))(q, k, v)
    assert len(calls) >= 2
    assert torch.equal(got, want)
    assert rel_err(compiled, want) < TOL[torch.bfloat16]


@pytest.mark.parametrize("kind", KINDS)
def test_queries_after_a_cache_match_the_cpu_executor(kind):
    """Decode steps and a chunk (Nq < Nk, causal, aligned bottom-right): the kernels take the rows' position
    offset Nk - Nq; forward and backward equal the CPU executor's on the same plan, with padding and GQA."""
    q, k, v, kpm = _inputs(2, 2, 1, 90, 16, _seed(kind, "cache"), pad=True)
    for nq in (1, 5, 23):                                # inside one block, at a block's end, across blocks
        rows = q[:, :, 90 - nq:]
        plan = danon.attention_plan(rows, k, v, kind=kind, causal=True, key_padding_mask=kpm, block_size=BS,
                                    **FAMILY[kind], **({"past_queries": q[:, :, :90 - nq]} if kind == "ucsa" else {}))
        results = []
        for run in (lambda *x: triton_attention(*x, plan, key_padding_mask=kpm)[0],
                    lambda *x: danon.core.attention_op.run_plan(*x, plan, scale=16 ** -0.5, key_padding_mask=kpm)):
            leaves = [x.detach().requires_grad_() for x in (rows, k, v)]
            out = run(*leaves)
            go = torch.randn(out.shape, generator=torch.Generator().manual_seed(nq))
            results.append((out.detach(), torch.autograd.grad((out * go).sum(), leaves)))
        (out, grads), (want, want_grads) = results
        assert triton_executor.supports(attention_args(rows, k, v, plan, scale=16 ** -0.5, key_padding_mask=kpm))
        assert rel_err(out, want) < TOL[torch.float32], nq
        for got, ref in zip(grads, want_grads):
            assert rel_err(got, ref) < TOL[torch.float32], nq
