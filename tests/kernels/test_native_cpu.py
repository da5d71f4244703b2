"""danon's own CPU forward kernel (danon/kernels/csrc, fused_cpu.py) against the float64 reference executor.

fp32 inputs through the kernel, the same inputs in float64 through the reference (itself checked against the
oracle in tests/core): every family, causal or not, padding, GQA, ALiBi, partial last blocks, fewer queries
than keys, hand-made plans with -1 slots and query blocks that see no key. The kernel must be built here: CI
has a compiler, so a kernel that fails to build fails these tests rather than skipping them.
"""
import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import danon
from danon.core.attention_args import BackwardArgs, attention_args
from danon.core.plan import Plan
from danon.kernels import cpu, fused_cpu, gather, native_cpu, reference

FAMILY_KW = {
    "msra": dict(window=16, num_levels=2, compression_factor=2),
    "ucsa": dict(local_window_size=16, top_k_blocks=2, global_tokens=16),
    "dala": dict(window=16, memory_size=8),
}
ATOL = 2e-6   # fp32 kernel against the fp64 reference; observed about 5e-7


def _inputs(H, Hkv, N, D=8, nq=None, seed=0, pad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, H, nq or N, D, generator=g)
    k = torch.randn(2, Hkv, N, D, generator=g)
    v = torch.randn(2, Hkv, N, D, generator=g)
    kpm = None
    if pad:
        kpm = torch.rand(2, N, generator=g) > 0.3
        kpm[1, :20] = False   # left padding: early causal queries see no key
    return q, k, v, kpm


def _float64(a):
    cast = {name: getattr(a, name).double() for name in ("q", "k", "v", "summary_k", "summary_v", "slopes")
            if getattr(a, name) is not None and getattr(a, name).is_floating_point()}
    return a._replace(**cast)


def _reference_gradients(a, grad_out, need_slopes=False):
    """The float64 reference executor's gradients of `a` (fp32 inputs upcast): (dq, dk, dv, dsk, dsv, dmask, dslopes)."""
    a64 = _float64(a)
    ref_out, ref_lse = reference.reference_forward(a64)
    return reference.reference_backward(a64, BackwardArgs(grad_out.double(), None, ref_out, ref_lse, True, False,
                                                           need_slopes), False)


@pytest.fixture(autouse=True)
def one_thread_for_the_backward_split(monkeypatch):
    """fused_backward splits a (batch, kv head) pair's query blocks when there are fewer pairs than threads:
    pretend there is one thread, so that these tests run the same unsplit backward on any machine (the kernel
    itself still uses every thread); the split has its own tests below."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)


@pytest.fixture
def kernel_only(monkeypatch):
    """The executor must not fall back: the gathered and reference paths raise if called."""
    def refuse(*args, **kwargs):
        raise AssertionError("the call left danon's kernel")

    for name in ("gathered_forward", "gathered_backward", "reference_forward", "reference_backward"):
        monkeypatch.setattr(cpu, name, refuse)


def _check_against_reference(a):
    res = fused_cpu.fused_forward(a)
    assert res is not None, "the kernel did not take a call it supports"
    out, lse = res
    ref_out, ref_lse = reference.reference_forward(_float64(a))
    assert out.dtype == torch.float32 and not out.isnan().any() and not lse.isnan().any()
    assert torch.allclose(out.double(), ref_out, atol=ATOL, rtol=0), (out.double() - ref_out).abs().max()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse.double()[finite], ref_lse[finite], atol=ATOL, rtol=0)
    return out, lse, ref_out, ref_lse


def test_the_kernel_builds_on_this_machine():
    assert native_cpu.available()
    assert hasattr(torch.ops.danon_cpu, "sparse_forward")


@pytest.mark.parametrize("kind,causal,pad,Hkv", list(itertools.product(["msra", "ucsa", "dala"], [False, True],
                                                                       [False, True], [4, 1])))
@pytest.mark.parametrize("N", [128, 150])
def test_every_family_equals_the_float64_reference(kind, causal, pad, Hkv, N):
    q, k, v, kpm = _inputs(4, Hkv, N, pad=pad)   # 150: the last block is partial; 128 unpadded: no key bias
    plan = danon.attention_plan(q, k, v, kind=kind, causal=causal, key_padding_mask=kpm, block_size=16,
                                **FAMILY_KW[kind])
    _check_against_reference(attention_args(q, k, v, plan, scale=0.3, key_padding_mask=kpm))


@pytest.mark.parametrize("kind", ["msra", "ucsa", "dala"])
@pytest.mark.parametrize("nq", [1, 40, 100])
def test_fewer_queries_than_keys(kind, nq):
    q_all, k, v, _ = _inputs(4, 2, 150)
    q = q_all[:, :, 150 - nq:]
    extra = dict(past_queries=q_all[:, :, :150 - nq]) if kind == "ucsa" else {}   # UCSA's selection query
    plan = danon.attention_plan(q, k, v, kind=kind, causal=True, block_size=16, **FAMILY_KW[kind], **extra)
    _check_against_reference(attention_args(q, k, v, plan, scale=0.3))


def test_alibi_slopes_equal_the_reference_without_causal_masking():
    q, k, v, kpm = _inputs(4, 2, 128, pad=True)
    plan = danon.attention_plan(q, k, v, kind="msra", causal=False, key_padding_mask=kpm, block_size=16,
                                **FAMILY_KW["msra"])
    slopes = torch.rand(4, generator=torch.Generator().manual_seed(1)) * 0.5
    _check_against_reference(attention_args(q, k, v, plan, scale=0.3, key_padding_mask=kpm, slopes=slopes))


def test_hand_made_plan_with_empty_slots_tokens_and_blocks_that_see_nothing():
    """No window: the own block counts only where listed; -1 slots; a query block whose list is all -1."""
    b, N, Hkv = 16, 128, 2
    q, k, v, _ = _inputs(4, Hkv, N)
    tq = N // b
    block_idx = torch.full((2, Hkv, tq, 3), -1, dtype=torch.int32)
    token_idx = torch.full((2, Hkv, tq, 4), -1, dtype=torch.int32)
    for t in range(1, tq):
        block_idx[:, :, t, 0] = t - 1
        block_idx[:, 0, t, 1] = t                      # the own block, listed for kv head 0 only
        token_idx[:, :, t, :2] = torch.tensor([0, 3])  # two tokens of block 0
    block_idx[0, :, 5] = -1                            # batch 0, block 5: nothing but two tokens
    token_idx[1, :, 6] = -1
    block_idx[1, :, 6] = -1                            # batch 1, block 6: no key at all
    plan = Plan(kind="exact", block_size=b, causal=True, seq_len_q=N, seq_len_k=N, block_idx=block_idx,
                token_idx=token_idx)
    out, lse, _, _ = _check_against_reference(attention_args(q, k, v, plan, scale=0.3))
    assert torch.isinf(lse[1, :, 6 * b:7 * b]).all() and (out[1, :, 6 * b:7 * b] == 0).all()
    assert torch.isinf(lse[:, :, :b]).all()            # block 0 lists nothing


def test_causal_output_never_depends_on_later_positions_nor_on_how_many_follow():
    q, k, v, _ = _inputs(4, 2, 256, D=16)
    cut = 150

    def run(q_, k_, v_):
        plan = danon.attention_plan(q_, k_, v_, kind="msra", causal=True, block_size=16, **FAMILY_KW["msra"])
        return fused_cpu.fused_forward(attention_args(q_, k_, v_, plan, scale=0.25))[0]

    full = run(q, k, v)
    prefix = run(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut])
    changed = [x.clone() for x in (q, k, v)]
    for x in changed:
        x[:, :, cut:] = torch.randn_like(x[:, :, cut:]) * 3
    later_changed = run(*changed)
    assert torch.allclose(prefix, full[:, :, :cut], atol=1e-6, rtol=0)
    assert torch.allclose(later_changed[:, :, :cut], full[:, :, :cut], atol=1e-6, rtol=0)


def test_the_cpu_executor_runs_fp32_sparse_calls_through_the_kernel_and_float64_through_aten(monkeypatch):
    q, k, v, _ = _inputs(4, 2, 128)
    plan = danon.attention_plan(q, k, v, kind="dala", causal=True, block_size=16, **FAMILY_KW["dala"])
    calls = []
    real = gather.gathered_forward
    monkeypatch.setattr(cpu, "gathered_forward", lambda gp: calls.append(gp.dtype) or real(gp))
    cpu.attention_forward(attention_args(q, k, v, plan, scale=0.3))
    assert calls == []
    a64 = _float64(attention_args(q, k, v, plan, scale=0.3))
    cpu.attention_forward(a64)
    assert calls == [torch.float64]


def test_half_precision_inputs_accumulate_in_fp32_through_the_kernel():
    q, k, v, kpm = _inputs(4, 2, 150, pad=True)
    q, k, v = (x.bfloat16() for x in (q, k, v))
    plan = danon.attention_plan(q, k, v, kind="msra", causal=True, key_padding_mask=kpm, block_size=16,
                                **FAMILY_KW["msra"])
    a = attention_args(q, k, v, plan, scale=0.3, key_padding_mask=kpm)
    out, _ = cpu.attention_forward(a)
    ref, _ = reference.reference_forward(_float64(a))
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.double(), ref, atol=2e-2, rtol=0)


@pytest.mark.parametrize("kind", ["msra", "dala", "ucsa"])
def test_gradients_after_the_kernel_forward_equal_the_float64_reference(kind, kernel_only):
    q, k, v, kpm = _inputs(4, 2, 150, pad=True)
    plan = danon.attention_plan(q, k, v, kind=kind, causal=True, key_padding_mask=kpm, block_size=16,
                                **FAMILY_KW[kind])
    a = attention_args(q, k, v, plan, scale=0.3, key_padding_mask=kpm)
    out, lse = cpu.attention_forward(a)
    grad_out = torch.randn_like(out)
    need_slopes = a.slopes is not None
    fast = cpu.attention_backward(a, BackwardArgs(grad_out, torch.zeros_like(lse), out, lse, True, False,
                                                  need_slopes))
    slow = _reference_gradients(a, grad_out, need_slopes)
    for name, x, y in zip(["dq", "dk", "dv", "d_summary_k", "d_summary_v"], fast[:5], slow[:5]):
        assert torch.allclose(x.double(), y, atol=1e-5, rtol=0), name


def test_calls_the_kernel_does_not_take_return_none():
    q, k, v, _ = _inputs(4, 2, 128)
    plan = danon.attention_plan(q, k, v, kind="msra", causal=True, block_size=16, **FAMILY_KW["msra"])
    a = attention_args(q, k, v, plan, scale=0.3)
    assert fused_cpu.fused_forward(_float64(a)) is None              # float64 stays on the aten path
    assert fused_cpu.fused_forward(a._replace(softcap=5.0)) is None
    q, k, v, _ = _inputs(2, 1, 8192, D=4)
    wide = danon.attention_plan(q, k, v, kind="msra", causal=True, block_size=64, window=64 * 64)
    assert fused_cpu._keys_per_block(attention_args(q, k, v, wide, scale=0.3), 128) > fused_cpu.MAX_KEYS_PER_BLOCK
    assert fused_cpu.fused_forward(attention_args(q, k, v, wide, scale=0.3)) is None   # more than one tile holds


def test_without_the_kernel_the_executor_gives_the_same_result():
    """DANON_CPU_KERNEL=0 (or no compiler): the aten path, same numbers."""
    code = ("import torch, danon\n"
            "from danon.kernels import native_cpu\n"
            "assert native_cpu.load() is None\n"
            "g = torch.Generator().manual_seed(0)\n"
            "q, k, v = (torch.randn(1, 4, 200, 16, generator=g) for _ in range(3))\n"
            "torch.save(danon.attention(q, k, v, kind='dala', causal=True, block_size=16, window=32,"
            " memory_size=8), __import__('sys').argv[1])\n")
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"danon_no_kernel_{os.getpid()}.pt")
    env = dict(os.environ, DANON_CPU_KERNEL="0")
    subprocess.run([sys.executable, "-c", code, path], check=True, env=env, timeout=120)
    without = torch.load(path)
    os.remove(path)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 200, 16, generator=g) for _ in range(3))
    with_kernel = danon.attention(q, k, v, kind="dala", causal=True, block_size=16, window=32, memory_size=8)
    assert torch.allclose(with_kernel, without, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind,causal,pad,Hkv", list(itertools.product(["msra", "ucsa", "dala"], [False, True],
                                                                       [False, True], [4, 1])))
@pytest.mark.parametrize("N", [128, 150])
def test_backward_equals_the_float64_reference(kind, causal, pad, Hkv, N):
    """dq, dk, dv, the summaries' and the ALiBi slopes' gradients (with or without causal masking).

    N = 128 without padding: every key real, the kernel leaves raw logits unbiased (no key-bias pass)."""
    q, k, v, kpm = _inputs(4, Hkv, N, pad=pad)
    plan = danon.attention_plan(q, k, v, kind=kind, causal=causal, key_padding_mask=kpm, block_size=16,
                                **FAMILY_KW[kind])
    a = attention_args(q, k, v, plan, scale=0.3, key_padding_mask=kpm)
    if a.slopes is None and kind == "msra":
        a = a._replace(slopes=torch.rand(4, generator=torch.Generator().manual_seed(1)) * 0.5)
    _check_backward_against_reference(a)


@pytest.mark.parametrize("scale", [-0.3, 0.0, 1e-39, 0.3])
def test_every_scale_equals_the_float64_reference_forward_and_backward(scale):
    """The kernel softmaxes raw products in units of the scale (biases and ALiBi divided by it) when the scale is
    positive with a finite inverse, and scales every key in place otherwise (a negative or zero scale, or one whose
    inverse overflows fp32, 1e-39): both paths, with padding (key biases) and ALiBi slopes, hold to float64."""
    q, k, v, kpm = _inputs(4, 2, 150, pad=True)
    plan = danon.attention_plan(q, k, v, kind="msra", causal=True, key_padding_mask=kpm, block_size=16,
                                **FAMILY_KW["msra"])
    slopes = torch.rand(4, generator=torch.Generator().manual_seed(1)) * 0.5
    a = attention_args(q, k, v, plan, scale=scale, key_padding_mask=kpm)._replace(slopes=slopes)
    _check_against_reference(a)
    _check_backward_against_reference(a)


def test_sharp_softmax_over_the_whole_exp_range_holds_to_float64():
    """The kernel's own exp (softmax_exp: 2^n e^r, the scale instruction for 2^n) on rows whose logits fall from
    the max down past fp32's underflow (e^-88): p takes values in every 2 nats from 1 down, the masked keys (-inf)
    give 0. Logits this large carry fp32's rounding (about 1e-5 absolute at |logit| ~ 100), so the kernel is held
    to float64 as closely as the reference executor run in fp32 gets, forward and backward."""
    q, k, v, kpm = _inputs(4, 2, 150, D=16, pad=True)
    scale = 5.0
    plan = danon.attention_plan(q, k, v, kind="ucsa", causal=True, key_padding_mask=kpm, block_size=16,
                                **FAMILY_KW["ucsa"])
    a = attention_args(q, k, v, plan, scale=scale, key_padding_mask=kpm)
    logits = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double().repeat_interleave(2, 1)) * scale
    drop = logits.amax(-1, keepdim=True) - logits   # how far below its row's max each key falls
    for nats in range(0, 88, 2):
        assert ((drop >= nats) & (drop < nats + 2)).any(), nats
    out, lse = fused_cpu.fused_forward(a)
    ref_out, ref_lse = reference.reference_forward(_float64(a))
    out32, lse32 = reference.reference_forward(a)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    for name, x, x32, y in (("out", out, out32, ref_out), ("lse", lse[finite], lse32[finite], ref_lse[finite])):
        error, fp32_error = ((x.double() - y).abs().max().item(), (x32.double() - y).abs().max().item())
        assert error <= 1.25 * fp32_error + 1e-7, (name, error, fp32_error)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    fast = fused_cpu.fused_backward(a, grad_out, out, lse)
    slow = _reference_gradients(a, grad_out)
    slow32 = reference.reference_backward(a, BackwardArgs(grad_out, None, out32, lse32, True, False, False), False)
    # the backward recomputes p from the lse (as aten's flash backward does), whose fp32 rounding at |lse| ~ 100
    # the fp32 reference, which keeps p, does not pay: about twice its error in dv
    for name, x, x32, y in zip(["dq", "dk", "dv"], fast[:3], slow32[:3], slow[:3]):
        error, fp32_error = (x.double() - y).abs().max().item(), (x32.double() - y).abs().max().item()
        assert error <= 2.5 * fp32_error, (name, error, fp32_error)


def test_steep_alibi_holds_to_float64_and_leaves_the_callers_denormals_alone():
    """The kernel flushes denormal results to zero (MXCSR.FTZ) while it runs: with slopes this steep, many of the
    window's p lie under fp32's smallest normal 1.2e-38 (checked below in float64, so the case is exercised), and out,
    lse and every gradient still hold to the float64 reference. The threads' own mode is restored: torch's arithmetic
    after the calls, on both threads, still produces denormals."""
    q, k, v, _ = _inputs(4, 2, 150)
    plan = danon.attention_plan(q, k, v, kind="msra", causal=True, block_size=16, **FAMILY_KW["msra"])
    a = attention_args(q, k, v, plan, scale=0.3)._replace(slopes=torch.tensor([4.0, 3.0, 2.5, 1.0]))
    a64 = _float64(a)
    _, ref_lse = reference.reference_forward(a64)
    i = torch.arange(150, dtype=torch.float64)
    logits = 0.3 * a64.q[:, :, :, None, :].mul(a64.k.repeat_interleave(2, 1)[:, :, None]).sum(-1)
    logits = logits - a64.slopes.view(1, 4, 1, 1) * (i[:, None] - i[None, :]).abs()
    seen = (i[None, :] <= i[:, None]) & (i[None, :] // 16 >= i[:, None] // 16 - 1)   # own and previous block
    p = (logits - ref_lse[..., None]).exp().masked_fill(~seen, 0)
    assert ((p > 0) & (p < torch.finfo(torch.float32).tiny)).sum() > 100, "no p in fp32's denormal range"
    _check_against_reference(a)
    _check_backward_against_reference(a)
    tiny = torch.full((1 << 20,), torch.finfo(torch.float32).tiny) / 4   # parallel over torch's threads
    assert (tiny > 0).all(), "the kernel left flush-to-zero on in a thread"


def _check_backward_against_reference(a):
    out, lse = fused_cpu.fused_forward(a)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    fast = fused_cpu.fused_backward(a, grad_out, out, lse)
    assert fast is not None
    need_slopes = a.slopes is not None
    slow = _reference_gradients(a, grad_out, need_slopes)
    for name, x, y in zip(["dq", "dk", "dv", "d_summary_k", "d_summary_v"], fast[:5], slow[:5]):
        if x is None:
            assert y.numel() == 0, name
            continue
        assert not x.isnan().any(), name
        assert torch.allclose(x.double(), y, atol=1e-5, rtol=0), (name, (x.double() - y).abs().max())
    if need_slopes:
        # a sum over every (row, key) of dS |i - j|, signed terms up to ~100: no closer than fp32 arithmetic gets,
        # which the reference executor run in fp32 measures on the same inputs
        r32_out, r32_lse = reference.reference_forward(a)
        r32 = reference.reference_backward(a, BackwardArgs(grad_out, None, r32_out, r32_lse, True, False, True),
                                           False)[6]
        fp32_error = (r32.double() - slow[6]).abs().max().item()
        error = (fast[5].double() - slow[6]).abs().max().item()
        scale = slow[6].abs().max().item()   # ~16 fp32 ulps of the largest component, or 8x the fp32 reference's
        assert error <= max(8 * fp32_error, 2e-6 * scale), (error, fp32_error, scale)


def _summaries_read_in_place(plan):
    """(rows, mixed): how many (batch, kv head, query block) rows the kernel reads summaries of in place, and how many
    of those also gather some (summary_range in the .cpp: the largest cluster of listed indices at most 32 apart,
    >= 128 of them spanning at most twice as many, the span and the rest fitting the row's width)."""
    rows = mixed = 0
    for row in plan.summary_idx.reshape(-1, plan.summary_idx.shape[-1]).tolist():
        idx = [i for i in row if i >= 0]
        best, cur = [], []
        for i in idx:
            cur = cur + [i] if cur and 0 < i - cur[-1] <= 32 else [i]
            best = cur if len(cur) > len(best) else best
        span = best[-1] - best[0] + 1 if best else 0
        if len(best) >= 128 and span <= 2 * len(best) and span + len(idx) - len(best) <= len(row):
            rows += 1
            mixed += len(idx) > len(best)
    return rows, mixed


@pytest.mark.parametrize("kind,causal,pad,n,levels", [("ucsa", True, False, 2400, None), ("ucsa", True, True, 2400, None),
                                                      ("ucsa", False, True, 2400, None), ("msra", True, True, 4400, 1),
                                                      ("msra", False, False, 4400, 1), ("msra", True, False, 8800, 2)])
def test_summaries_read_in_place_equal_the_float64_reference(kind, causal, pad, n, levels):
    """Rows with many listed summaries (UCSA's every past block, MSRA's top level) read the largest cluster of them in
    place as a range of the summary table, the unlisted ones in between masked and the others (MSRA's lower levels)
    gathered: forward and backward (MSRA with ALiBi slopes and summary positions) against the float64 reference,
    on plans where that path is taken (over a hundred summaries per row at these lengths)."""
    kw = dict(FAMILY_KW[kind], **({"num_levels": levels} if kind == "msra" else {}))
    q, k, v, kpm = _inputs(4, 2, n, pad=pad)
    plan = danon.attention_plan(q, k, v, kind=kind, causal=causal, key_padding_mask=kpm, block_size=16, **kw)
    rows, mixed = _summaries_read_in_place(plan)
    assert rows >= 10
    assert mixed >= 10 or levels != 2   # the 2-level MSRA plan: top level in place, level 1 gathered
    a = attention_args(q, k, v, plan, scale=0.3, key_padding_mask=kpm)
    if kind == "msra":   # ALiBi over the range needs the summaries' positions (else they are gathered)
        g = torch.Generator().manual_seed(1)
        a = a._replace(slopes=torch.rand(4, generator=g) * 0.5,
                       summary_pos=torch.rand(a.summary_k.shape[:3], generator=g) * n)
    _check_against_reference(a)
    _check_backward_against_reference(a)


def test_a_summary_listed_twice_counts_twice_as_in_the_reference():
    """A hand-made plan that lists a summary twice in a row whose summaries would be read in place: the kernel
    gathers that row instead (the range would count it once), and agrees with the float64 reference."""
    q, k, v, kpm = _inputs(4, 2, 2400)
    plan = danon.attention_plan(q, k, v, kind="ucsa", causal=True, block_size=16, **FAMILY_KW["ucsa"])
    idx = plan.summary_idx.clone()
    last = idx[0, 0, -1]
    assert (last >= 0).sum() >= 128 and (last < 0).any()
    last[(last < 0).nonzero()[0, 0]] = last[0]   # the row's first summary again, in a free slot
    plan.summary_idx = idx
    a = attention_args(q, k, v, plan, scale=0.3)
    _check_against_reference(a)
    _check_backward_against_reference(a)


def test_backward_of_rows_that_see_no_key_is_zero_not_nan():
    q, k, v, kpm = _inputs(4, 2, 128, pad=True)   # batch 1: the first 20 keys are padding
    plan = danon.attention_plan(q, k, v, kind="msra", causal=True, key_padding_mask=kpm, block_size=16,
                                **FAMILY_KW["msra"])
    a = attention_args(q, k, v, plan, scale=0.3, key_padding_mask=kpm)
    out, lse = fused_cpu.fused_forward(a)
    assert torch.isinf(lse[1, :, :20]).all()
    dq, dk, dv, *_ = fused_cpu.fused_backward(a, torch.randn_like(out), out, lse)
    assert not dq.isnan().any() and (dq[1, :, :20] == 0).all()
    assert (dk[1, :, :20] == 0).all() and (dv[1, :, :20] == 0).all()   # padding keys get no gradient


@pytest.mark.parametrize("kind", ["msra", "dala", "ucsa"])
@pytest.mark.parametrize("threads", [3, 7, 64])
def test_backward_split_by_query_blocks_equals_the_float64_reference(kind, threads, monkeypatch):
    """Fewer (batch, kv head) pairs (2) than threads: each pair's query blocks run as ceil(threads / 2) parts (at
    most one per query block), each adding into its own copy of dk, dv and the summaries' and slopes' gradients,
    summed at the end: the same gradients as one part, and as the float64 reference."""
    q, k, v, kpm = _inputs(4, 1, 150, pad=True)
    plan = danon.attention_plan(q, k, v, kind=kind, causal=True, key_padding_mask=kpm, block_size=16,
                                **FAMILY_KW[kind])
    a = attention_args(q, k, v, plan, scale=0.3, key_padding_mask=kpm)
    if a.slopes is None:
        a = a._replace(slopes=torch.rand(4, generator=torch.Generator().manual_seed(1)) * 0.5)
    out, lse = fused_cpu.fused_forward(a)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    ops, seen = native_cpu.load(), []

    class Spy:   # records the splits the kernel was asked for
        def sparse_backward(self, *args):
            seen.append(args[-1])
            return ops.sparse_backward(*args)

    monkeypatch.setattr(native_cpu, "load", lambda profile=False: Spy())
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    split = fused_cpu.fused_backward(a, grad_out, out, lse)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    whole = fused_cpu.fused_backward(a, grad_out, out, lse)
    assert seen == [-(-threads // 2), 1]
    slow = _reference_gradients(a, grad_out, True)
    for name, x, y, z in zip(["dq", "dk", "dv", "d_summary_k", "d_summary_v"], split[:5], whole[:5], slow[:5]):
        if x is None:
            assert y is None and z.numel() == 0, name
            continue
        assert torch.allclose(x.double(), z, atol=1e-5, rtol=0), (name, (x.double() - z).abs().max())
        assert torch.allclose(x, y, atol=1e-6, rtol=1e-6), (name, (x - y).abs().max())   # sums in another order
    assert torch.allclose(split[5], whole[5], atol=1e-6 * whole[5].abs().max().item(), rtol=0)


def test_backward_split_spends_at_most_its_memory_budget_on_copies(monkeypatch):
    """Each part beyond the first costs a copy of dk and dv: the split stops where SPLIT_COPY_BYTES would be
    exceeded (here one copy is 2 x 2 x 150 x 16 x 4 bytes), and the gradients stay the unsplit ones."""
    q, k, v, _ = _inputs(4, 1, 150)
    plan = danon.attention_plan(q, k, v, kind="msra", causal=True, block_size=16, **FAMILY_KW["msra"])
    a = attention_args(q, k, v, plan, scale=0.3)
    out, lse = fused_cpu.fused_forward(a)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    whole = fused_cpu.fused_backward(a, grad_out, out, lse)
    ops, seen = native_cpu.load(), []

    class Spy:
        def sparse_backward(self, *args):
            seen.append(args[-1])
            return ops.sparse_backward(*args)

    monkeypatch.setattr(native_cpu, "load", lambda profile=False: Spy())
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    copy = 2 * 1 * 150 * (8 + 8) * 4
    for budget, parts in [(0, 1), (copy, 2), (2 * copy + copy // 2, 3), (10 ** 9, 32)]:
        monkeypatch.setattr(fused_cpu, "SPLIT_COPY_BYTES", budget)
        split = fused_cpu.fused_backward(a, grad_out, out, lse)
        assert seen[-1] == parts, (budget, seen)
        for x, y in zip(split[:3], whole[:3]):
            assert torch.allclose(x, y, atol=1e-6, rtol=1e-6)


def test_backward_split_of_a_hand_made_plan_zeroes_what_no_part_saw(monkeypatch):
    """Keys no query of a part sees (past the window, never listed) must still come back 0 from every part's copy."""
    q, k, v, _ = _inputs(2, 1, 128)
    plan = danon.attention_plan(q, k, v, kind="msra", causal=True, block_size=16, window=16, num_levels=1)
    a = attention_args(q, k, v, plan, scale=0.3)
    out, lse = fused_cpu.fused_forward(a)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    whole = fused_cpu.fused_backward(a, grad_out, out, lse)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)      # 8 parts: one query block each
    split = fused_cpu.fused_backward(a, grad_out, out, lse)
    for x, y in zip(split[:3], whole[:3]):
        assert not x.isnan().any() and torch.allclose(x, y, atol=1e-6, rtol=0)


def test_training_through_danon_attention_matches_float64_autograd(monkeypatch):
    """End to end: the op's autograd with the kernel's forward and backward, against float64 autograd."""
    q, k, v, kpm = _inputs(4, 2, 150, D=16, pad=True)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    leaves64 = [x.double().requires_grad_() for x in (q, k, v)]
    kw = dict(kind="msra", causal=True, key_padding_mask=kpm, block_size=16, window=32, num_levels=2)
    out64 = danon.attention(*leaves64, **kw)            # float64: the gathered path
    grad = torch.randn_like(out64)
    out64.backward(grad)
    for name in ("gathered_forward", "gathered_backward", "reference_forward", "reference_backward"):
        monkeypatch.setattr(cpu, name, lambda *a, **k: pytest.fail("the fp32 call left danon's kernel"))
    out = danon.attention(*leaves, **kw)
    out.backward(grad.float())
    assert torch.allclose(out.double(), out64, atol=1e-5, rtol=0)
    for x, y in zip(leaves, leaves64):
        assert torch.allclose(x.grad.double(), y.grad, atol=1e-4, rtol=0)


@pytest.mark.parametrize("nq", [1, 40])
def test_backward_with_fewer_queries_than_keys_equals_the_float64_reference(nq):
    """The query rows are padded to whole blocks before the first one: those rows must add no gradient."""
    q_all, k, v, _ = _inputs(4, 2, 150)
    q = q_all[:, :, 150 - nq:]
    plan = danon.attention_plan(q, k, v, kind="msra", causal=True, block_size=16, **FAMILY_KW["msra"])
    a = attention_args(q, k, v, plan, scale=0.3)
    out, lse = fused_cpu.fused_forward(a)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    fast = fused_cpu.fused_backward(a, grad_out, out, lse)
    slow = _reference_gradients(a, grad_out)
    for name, x, y in zip(["dq", "dk", "dv", "d_summary_k", "d_summary_v"], fast[:5], slow[:5]):
        assert torch.allclose(x.double(), y, atol=1e-5, rtol=0), name


def test_a_failed_build_warns_and_leaves_the_aten_path(monkeypatch):
    """No compiler (the build raises): a RuntimeWarning naming the cause, and None, not an exception."""
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("c++: command not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with pytest.warns(RuntimeWarning, match="c\\+\\+: command not found"):
        assert native_cpu.load.__wrapped__() is None



def test_broadcast_and_strided_inputs_and_gradients_equal_contiguous_ones(kernel_only):
    """Row strides below D are BLAS leading dimensions it refuses: the backward of out.sum(2) has row stride 0,
    an expanded q too. They are copied, not passed on (MKL would leave the outputs as they were)."""
    q, k, v, _ = _inputs(4, 2, 128, D=16)
    kw = dict(kind="msra", causal=True, block_size=16, window=32, num_levels=2)
    weight = torch.randn(2, 4, 16)
    row = torch.randn(2, 4, 1, 16).expand(2, 4, 128, 16)             # q with row stride 0
    results = []
    for contiguous in (False, True):
        leaves = [x.clone().requires_grad_() for x in (row, k, v)]
        q_in = leaves[0].contiguous() if contiguous else leaves[0]
        out = danon.attention(q_in, *leaves[1:], **kw)
        (out.sum(2) * weight).sum().backward()                      # grad_out [2, 4, 128, 16], row stride 0
        results.append([out.detach()] + [x.grad for x in leaves])
    for x, y in zip(*results):
        assert torch.allclose(x, y, atol=1e-5, rtol=0)


def test_dense_plans_and_more_queries_than_keys_are_not_taken():
    q, k, v, _ = _inputs(4, 2, 64)
    dense = attention_args(q, k, v, None, scale=0.3, causal=True, block_size=16)
    assert fused_cpu.fused_forward(dense) is None                    # the flash path's: no window, no lists
    plan = danon.attention_plan(q, k, v, kind="msra", causal=True, block_size=16, **FAMILY_KW["msra"])
    longer_q = attention_args(torch.cat([q, q], 2), k, v, plan, scale=0.3)
    assert fused_cpu.fused_forward(longer_q) is None


def test_backward_of_a_hand_made_plan_with_query_blocks_that_see_nothing():
    b, N, Hkv = 16, 96, 2
    q, k, v, _ = _inputs(4, Hkv, N)
    tq = N // b
    block_idx = torch.full((2, Hkv, tq, 2), -1, dtype=torch.int32)
    for t in range(2, tq):
        block_idx[:, :, t, 0] = t - 2
        block_idx[:, 1, t, 1] = t                                   # the own block, for kv head 1 only
    plan = Plan(kind="exact", block_size=b, causal=True, seq_len_q=N, seq_len_k=N, block_idx=block_idx)
    a = attention_args(q, k, v, plan, scale=0.3)
    out, lse = fused_cpu.fused_forward(a)
    assert torch.isinf(lse[:, :, :2 * b]).all()                      # blocks 0 and 1 list nothing
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    fast = fused_cpu.fused_backward(a, grad_out, out, lse)
    slow = _reference_gradients(a, grad_out)
    for name, x, y in zip(["dq", "dk", "dv"], fast[:3], slow[:3]):
        assert not x.isnan().any() and torch.allclose(x.double(), y, atol=1e-5, rtol=0), name


@pytest.mark.parametrize("kind", ["msra", "dala", "ucsa"])
def test_forward_gives_the_same_bits_however_its_work_is_split_over_threads(kind):
    """The forward's runs of query blocks start as one range per thread and an idle thread takes runs from the end
    of another's (work stealing): every query block is computed once, by the same code, whichever thread runs it,
    so 1, 3 or 5 threads give the same bits, each the float64 reference's values (a run left out would show as
    uninitialised output). More threads than this machine's cores make them take runs from one another's ranges
    in practice, though nothing forces a steal in a given call."""
    q, k, v, kpm = _inputs(4, 2, 600, pad=True)   # 38 query blocks of 16 per (batch, kv head), 4 pairs
    plan = danon.attention_plan(q, k, v, kind=kind, causal=True, key_padding_mask=kpm, block_size=16,
                                **FAMILY_KW[kind])
    a = attention_args(q, k, v, plan, scale=0.3, key_padding_mask=kpm)
    threads_before = torch._C.get_num_threads()   # torch.get_num_threads is patched by the fixture above
    results = {}
    try:
        for threads in (1, 3, 5):
            torch.set_num_threads(threads)
            results[threads] = _check_against_reference(a)[:2]
    finally:
        torch.set_num_threads(threads_before)
    for threads in (3, 5):
        assert torch.equal(results[threads][0], results[1][0]) and torch.equal(results[threads][1], results[1][1])


# --- the outputs' memory is recycled (RecyclingAllocator in the kernel) -------------------------------------------
def _storage_ptr(x):
    return x.untyped_storage().data_ptr()


@pytest.mark.parametrize("kind", ["msra", "dala", "ucsa"])
def test_a_freed_output_is_reused_and_every_value_computed_again(kind):
    """The forward's out and the backward's dq, dk, dv come from memory the kernel keeps after a freed call: the
    next call of the same sizes gets the same buffers back. They are poisoned with NaN before they are freed, so
    a value the second call did not write again shows as NaN or against the float64 reference of its own, fresh
    inputs."""
    calls = []
    for seed in (3, 4):
        q, k, v, _ = _inputs(4, 4, 1024, D=32, seed=seed)   # out, dq, dk, dv [2, 4, 1024, 32] fp32: 1 MiB, kept
        plan = danon.attention_plan(q, k, v, kind=kind, causal=True, block_size=64, **{
            "msra": dict(window=128), "dala": dict(window=128, memory_size=16),
            "ucsa": dict(local_window_size=128, top_k_blocks=2, global_tokens=64)}[kind])
        calls.append(attention_args(q, k, v, plan, scale=0.2))
    out, lse = fused_cpu.fused_forward(calls[0])
    grads = fused_cpu.fused_backward(calls[0], torch.randn(out.shape), out, lse)
    first = [_storage_ptr(x) for x in (out, *grads[:3])]
    for x in (out, *grads[:3]):
        x.fill_(float("nan"))
    kept_before = native_cpu.recycled_bytes()
    del out, lse, grads, x
    assert native_cpu.recycled_bytes() >= kept_before + 4 * 2 ** 20
    _check_against_reference(calls[1])      # the same sizes: out's buffer back, every value new
    out, lse = fused_cpu.fused_forward(calls[1])
    assert _storage_ptr(out) in first
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    fast = fused_cpu.fused_backward(calls[1], grad_out, out, lse)
    assert {_storage_ptr(x) for x in fast[:3]} <= set(first)
    slow = _reference_gradients(calls[1], grad_out)
    for name, x, y in zip(["dq", "dk", "dv"], fast[:3], slow[:3]):
        assert not x.isnan().any() and torch.allclose(x.double(), y, atol=1e-5, rtol=0), name


KEEP_SCRIPT = textwrap.dedent(r"""
    import torch
    import danon
    from danon.kernels import native_cpu
    q = torch.randn(1, 2, 4096, 64)   # out [1, 2, 4096, 64] fp32: 2 MiB
    outs = [danon.attention(q + i, q, q, kind="msra", causal=True) for i in range(3)]
    del outs
    kept = native_cpu.recycled_bytes()
    native_cpu.release_recycled()
    print(kept, native_cpu.recycled_bytes())
""")


@pytest.mark.parametrize("limit_mib,expected_mib", [(5, 4), pytest.param(0, 0, marks=pytest.mark.slow)])
def test_the_memory_kept_stays_under_its_limit_and_can_be_given_back(limit_mib, expected_mib):
    """Three freed 2 MiB outputs (the default limit, 256 MiB, keeps them all: the test above): the two newest under
    a limit of 5 MiB, none under 0; release_recycled gives everything back."""
    env = dict(os.environ, OMP_NUM_THREADS="2", DANON_CPU_KEEP_MIB=str(limit_mib))
    r = subprocess.run([sys.executable, "-c", KEEP_SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    kept, after_release = (int(x) for x in r.stdout.split())
    assert kept == expected_mib * 2 ** 20 and after_release == 0, r.stdout
