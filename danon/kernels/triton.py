"""Triton executor of an attention plan (DESIGN.md section 4): fused forward and backward.

The kernels are in danon/kernels/triton_kernels.py. CUDA tensors run them compiled; CPU tensors run them
in Triton's interpreter (what TRITON_INTERPRET=1 does, whether or not it is set), which is how the
CPU test suite checks the very code the GPU runs.

- `attention_forward(a)` / `attention_backward(a, g)`: the executor (danon/core/executors.py), registered by
  danon/kernels/__init__.py for CUDA tensors it supports.
- `triton_attention(q, k, v, plan, ...)` -> (out, lse): the `danon::attention` op with this executor
  preferred, on CUDA or (interpreted) CPU tensors; differentiable as the op is.
- `triton_attention_backward(grad_out, q, k, v, plan, out, lse, ...)`: the gradients as a dict.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Optional

import torch
from torch import Tensor

from danon.core.attention_args import GRADIENTS, AttentionArgs, BackwardArgs, attention_args
from danon.core.blocks import query_layout
from danon.core.executors import prefer
from danon.core.plan import is_dense_plan

__all__ = ["triton_attention", "triton_attention_backward", "attention_forward", "attention_backward", "supports"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_KERNELS: dict = {}


def _kernels(interpret: bool):
    """The kernel module, compiled or interpreted.

    Triton decides between the two when @triton.jit runs (at import), reading TRITON_INTERPRET then;
    loading the file once per mode under triton.knobs lets CPU and CUDA tensors share one process.
    """
    if interpret not in _KERNELS:
        import triton
        name = f"danon.kernels._triton_kernels_{'interpreted' if interpret else 'compiled'}"
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_kernels.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        with triton.knobs.runtime.scope():
            triton.knobs.runtime.interpret = interpret
            spec.loader.exec_module(module)
        if interpret:
            _call_helpers_directly(module)
        sys.modules[name] = module
        _KERNELS[interpret] = module
    return _KERNELS[interpret]


def _call_helpers_directly(module) -> None:
    """Replace the interpreted helpers (not the kernels) by the plain functions the interpreter made of them.

    The interpreter patches all of triton.language again on every call of a nested @triton.jit
    function (about 0.3 ms each, thousands per launch); the kernel's launch has patched it already.
    """
    from triton.runtime.interpreter import InterpretedFunction
    for name, obj in list(vars(module).items()):
        if isinstance(obj, InterpretedFunction) and name not in module.KERNELS:
            setattr(module, name, obj.rewrite())


def _compiled(x: Tensor) -> bool:
    """Compiled kernels for CUDA tensors, the interpreter for CPU tensors."""
    return x.device.type == "cuda"


def supports(a: AttentionArgs) -> bool:
    """Whether the Triton executor runs this call (else the op uses the CPU executor's reference path).

    Example:
        >>> import torch
        >>> from danon.core.attention_args import attention_args
        >>> from danon.kernels.triton import supports
        >>> x = torch.randn(1, 2, 8, 16)
        >>> supports(attention_args(x, x, x, scale=0.25)), supports(attention_args(*[x.double()] * 3, scale=0.25))
        (True, False)
    """
    q, k, v = a.q, a.k, a.v
    # queries after a cache (Nq < Nk) sit at positions Nk - Nq + i, which the kernels take as an offset; more
    # queries than keys where positions matter run on the CPU executor's reference path (any device)
    return (q.device.type in ("cpu", "cuda") and a.attn_mask is None and q.dtype in _DTYPES
            and q.dtype == k.dtype == v.dtype and (q.shape[2] <= k.shape[2] or not _positional(a)))


def _positional(a: AttentionArgs) -> bool:
    """Whether the rows' positions matter (causal, a band, ALiBi, or a sparse plan's blocks)."""
    return a.causal or a.band >= 0 or a.slopes is not None or not is_dense_plan(
        a.block_idx, a.token_idx, a.summary_idx, a.window)


# --- launch configuration -------------------------------------------------------------------------
def _pow2(n: int) -> int:
    return max(16, 1 << max(0, n - 1).bit_length())


def _config(dense: bool, block_size: int, D: int, Dv: int, cuda: bool, backward: bool) -> dict:
    """Tile sizes. Sparse plans: BLOCK_M and BLOCK_N divide the block size b (a program's rows lie
    in one query block, a key tile in one key block). The dense plan has no blocks: any b will do,
    so the kernel's b is BLOCK_M there."""
    big = max(_pow2(D), _pow2(Dv)) >= 128
    if dense:
        if cuda:
            m, n = (64, 64) if backward else (128, 64 if not big else 32)
        else:
            m, n = 64, 32      # the interpreter: few, large tiles (each op costs the same whatever its size)
        b = m
    else:
        cap = 64 if cuda else block_size
        m = n = min(block_size, cap)
        b = block_size
    warps = 8 if (cuda and m * max(_pow2(D), _pow2(Dv)) >= 128 * 128) else 4
    return dict(BLOCK_M=m, BLOCK_N=n, b=b, num_warps=warps, num_stages=2 if big or backward else 3)


def _list(idx: Optional[Tensor], B: int, Hkv: int, tq: int, name: str):
    """A plan list as contiguous int32 [B, Hkv, Tq, K], or None when it is absent or empty."""
    if idx is None or idx.shape[-1] == 0:
        return None
    if idx.dim() != 4 or idx.shape[2] != tq:
        raise ValueError(f"{name} must have shape [B, Hkv, Tq = {tq}, K] (Tq = query blocks), got {list(idx.shape)}")
    return idx.expand(B, Hkv, tq, idx.shape[-1]).to(torch.int32).contiguous()


class _Launch:
    """The arguments every kernel shares, prepared once per call (contiguous plan tables, flags)."""

    def __init__(self, a: AttentionArgs, backward: bool):
        q, k, v = a.q, a.k, a.v
        for name, x in (("q", q), ("k", k), ("v", v)):
            if x.dtype not in _DTYPES:
                raise ValueError(f"{name} has dtype {x.dtype}; the Triton executor takes float16, bfloat16 or "
                                 f"float32 (float64 runs on the CPU executor)")
            if x.device.type not in ("cpu", "cuda"):
                raise ValueError(f"{name} is on {x.device}; the Triton executor runs CUDA tensors (compiled) or "
                                 f"CPU tensors (interpreted)")
        if not (q.dtype == k.dtype == v.dtype):
            raise ValueError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
        if a.band == 0 or a.band < -1:
            raise ValueError(f"band must be >= 1 (a sliding window of tokens) or -1 (none), got {a.band}")
        if a.band >= 0 and a.window < 0:
            raise ValueError("band (a sliding window of tokens) needs the plan's block window (window >= 0)")
        B, H, nq, D = q.shape
        Hkv, nk, Dv = k.shape[1], k.shape[2], v.shape[3]
        self.B, self.H, self.Hkv, self.nq, self.nk, self.D, self.Dv = B, H, Hkv, nq, nk, D, Dv
        self.cuda = _compiled(q)
        b = a.block_size
        # row i is position qoff + i: Nk - Nq for queries after a cache (query_layout), 0 where positions do not matter
        self.qoff = nk - nq if _positional(a) else 0
        tq = query_layout(nq, nq + self.qoff, b)[2]
        self.block_idx = _list(a.block_idx, B, Hkv, tq, "block_idx")
        self.token_idx = _list(a.token_idx, B, Hkv, tq, "token_idx")
        self.summary_idx = _list(a.summary_idx, B, Hkv, tq, "summary_idx")
        self.dense = is_dense_plan(a.block_idx, a.token_idx, a.summary_idx, a.window)
        self.near = self.dense or a.window >= 0
        cfg = _config(self.dense, b, D, Dv, self.cuda, backward)
        self.cfg = cfg
        self.b = cfg["b"]
        self.pad, _, self.tq = query_layout(nq, nq + self.qoff, self.b)
        # the dense plan is a window that reaches every key block from every query block
        self.window = (self.tq + -(-nk // self.b) + 1) if self.dense else max(a.window, 0)
        dev = q.device
        f32 = torch.float32
        dummy = torch.zeros(1, dtype=f32, device=dev)
        self.S = 0
        self.summary_k = self.summary_v = self.summary_count = self.summary_pos = dummy
        if self.summary_idx is not None:
            S = a.summary_k.shape[2]
            self.S = S
            self.summary_shapes = (a.summary_k.shape, a.summary_v.shape)
            self.summary_k = a.summary_k.expand(B, Hkv, S, D).contiguous()
            self.summary_v = a.summary_v.expand(B, Hkv, S, Dv).contiguous()
            self.summary_count = a.summary_count.to(f32).expand(B, Hkv, S).contiguous()
            if a.summary_pos is not None:
                self.summary_pos = a.summary_pos.to(f32).expand(B, Hkv, S).contiguous()
        self.has_spos = self.summary_idx is not None and a.summary_pos is not None
        self.kpm = dummy if a.key_padding_mask is None else \
            a.key_padding_mask.to(torch.bool).expand(B, nk).to(torch.uint8).contiguous()
        self.slopes = dummy if a.slopes is None else a.slopes.detach().to(f32).contiguous()
        self.has_slopes, self.has_kpm = a.slopes is not None, a.key_padding_mask is not None
        self.scale, self.causal, self.band = float(a.scale), bool(a.causal), a.band
        self.softcap = 1.0 if a.softcap is None else float(a.softcap)
        self.has_softcap = a.softcap is not None
        # fp32 follows torch's matmul setting (tf32 only where the user allowed it); 16-bit: Triton's default
        if q.dtype != f32:
            self.ip = None
        else:
            self.ip = "tf32" if (self.cuda and torch.backends.cuda.matmul.allow_tf32) else "ieee"
        self.upcast = not self.cuda and q.dtype == torch.bfloat16   # see _mm in triton_kernels.py
        self.mod = _kernels(interpret=not self.cuda)
        self.idx_tables = [t if t is not None else torch.zeros(1, dtype=torch.int32, device=dev)
                           for t in (self.block_idx, self.token_idx, self.summary_idx)]

    def query_programs(self) -> int:
        """Programs along the rows: BLOCK_M rows each, from the first query block's start (`pad` rows before row 0)."""
        return triton_cdiv(self.pad + self.nq, self.cfg["BLOCK_M"])

    def counts(self):
        return [0 if t is None else t.shape[-1] for t in (self.block_idx, self.token_idx, self.summary_idx)]

    def block_t(self) -> int:
        """Rows gathered at a time from the token and summary lists."""
        longest = max([1] + self.counts()[1:])
        return min(_pow2(longest), 64 if self.cuda else 32)

    def shape_args(self):
        n_blocks, n_tokens, n_summ = self.counts()
        return (self.H, self.Hkv, self.H // self.Hkv, self.nq, self.nk, self.b, self.tq, self.qoff, self.window,
                max(self.band, 1), n_blocks, n_tokens, n_summ, max(self.S, 1), self.scale, self.softcap)

    def flags(self):
        c = self.cfg
        return dict(D=self.D, DV=self.Dv, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_T=self.block_t(),
                    BLOCK_D=_pow2(self.D), BLOCK_DV=_pow2(self.Dv), CAUSAL=self.causal, NEAR=self.near,
                    HAS_KPM=self.has_kpm, HAS_BAND=self.band >= 1, HAS_BLOCKS=self.block_idx is not None,
                    HAS_TOKENS=self.token_idx is not None, HAS_SUMM=self.summary_idx is not None,
                    HAS_SPOS=self.has_spos, HAS_SLOPES=self.has_slopes, HAS_SOFTCAP=self.has_softcap, IP=self.ip,
                    UPCAST=self.upcast,
                    num_warps=c["num_warps"], num_stages=c["num_stages"])


def _device_guard(x: Tensor):
    return torch.cuda.device(x.device) if x.device.type == "cuda" else _Null()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --- the executor's entry points (the signatures of every executor, danon/core/executors.py) ---------------------
def attention_forward(a: AttentionArgs):
    """Execute a plan: out [B, H, Nq, Dv] in q's dtype and lse [B, H, Nq] fp32 (-inf where no key is seen).

    Example:
        >>> import torch
        >>> from danon.core.attention_args import attention_args
        >>> from danon.kernels.triton import attention_forward
        >>> q = torch.randn(1, 2, 40, 16)
        >>> out, lse = attention_forward(attention_args(q, q, q, scale=0.25, causal=True, block_size=16))
        >>> out.shape, lse.shape
        (torch.Size([1, 2, 40, 16]), torch.Size([1, 2, 40]))
    """
    q, k, v = a.q, a.k, a.v
    if a.attn_mask is not None:
        raise ValueError("attn_mask (a general mask) is not supported by the Triton executor; the danon::attention "
                         "op runs it on the reference executor")
    B, H, nq = q.shape[:3]
    Dv = v.shape[3]
    if q.numel() == 0 or k.shape[2] == 0:
        return q.new_zeros(B, H, nq, Dv), q.new_full((B, H, nq), float("-inf"), dtype=torch.float32)
    L = _Launch(a, backward=False)
    out = q.new_full((B, H, nq, Dv), float("nan"))                     # poisoned until the kernel writes it
    lse = q.new_full((B, H, nq), float("nan"), dtype=torch.float32)
    grid = (L.query_programs(), B * H)
    with _device_guard(q):
        L.mod._forward[grid](
            q, k, v, out, lse, L.kpm, *L.idx_tables, L.summary_k, L.summary_v, L.summary_count, L.summary_pos,
            L.slopes, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *L.shape_args(), **L.flags())
    return out, lse


def attention_backward(a: AttentionArgs, g: BackwardArgs):
    """Gradients: (dq, dk, dv, d_summary_k, d_summary_v, d_attn_mask, d_slopes); those not needed are empty.

    Example:
        >>> import torch
        >>> from danon.core.attention_args import BackwardArgs, attention_args
        >>> from danon.kernels.triton import attention_forward, attention_backward
        >>> q = torch.randn(1, 2, 40, 16)
        >>> a = attention_args(q, q, q, scale=0.25, causal=True, block_size=16)
        >>> out, lse = attention_forward(a)
        >>> grads = attention_backward(a, BackwardArgs(torch.ones_like(out), None, out, lse, False, False, False))
        >>> [tuple(g.shape) for g in grads[:3]]
        [(1, 2, 40, 16), (1, 2, 40, 16), (1, 2, 40, 16)]
    """
    q, k, v, summary_k, summary_v, slopes = a.q, a.k, a.v, a.summary_k, a.summary_v, a.slopes
    grad_out, grad_lse, out, lse = g.grad_out, g.grad_lse, g.out, g.lse
    need_summary_grad, need_slopes_grad = g.need_summary_grad, g.need_slopes_grad
    if a.attn_mask is not None or g.need_mask_grad:
        raise ValueError("attn_mask (a general mask) is not supported by the Triton executor; the danon::attention "
                         "op runs it on the reference executor")
    empty = q.new_empty(0)
    if q.numel() == 0 or k.shape[2] == 0:
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                torch.zeros_like(summary_k) if need_summary_grad and summary_k is not None else empty,
                torch.zeros_like(summary_v) if need_summary_grad and summary_v is not None else empty,
                empty, torch.zeros_like(slopes) if need_slopes_grad and slopes is not None else empty)
    L = _Launch(a, backward=True)
    B, H, nq, D = q.shape
    Hkv, nk, Dv = L.Hkv, L.nk, L.Dv
    f32 = torch.float32
    # delta_i = sum_d dO * O, minus d loss / d lse_i (the lse's own gradient folds into the same term)
    delta = (grad_out.to(f32) * out.to(f32)).sum(-1)
    if grad_lse is not None:
        delta = delta - torch.where(torch.isfinite(lse), grad_lse.to(f32), torch.zeros_like(delta))
    delta = delta.contiguous()
    lse = lse.to(f32).contiguous()
    dq = q.new_full((B, H, nq, D), float("nan"))                       # poisoned until the kernel writes it
    dk = torch.zeros(B, Hkv, nk, D, dtype=f32, device=q.device)        # atomics add into these
    dv = torch.zeros(B, Hkv, nk, Dv, dtype=f32, device=q.device)
    need_summ = bool(need_summary_grad) and L.summary_idx is not None
    dsk = torch.zeros(B, Hkv, L.S, D, dtype=f32, device=q.device) if need_summ else torch.zeros(1, device=q.device)
    dsv = torch.zeros(B, Hkv, L.S, Dv, dtype=f32, device=q.device) if need_summ else torch.zeros(1, device=q.device)
    need_sl = bool(need_slopes_grad) and L.has_slopes
    dsl = torch.zeros(H, dtype=f32, device=q.device)
    flags = L.flags()
    with _device_guard(q):
        L.mod._backward_dq[(L.query_programs(), B * H)](
            q, k, v, grad_out, lse, delta, dq, dk, dv, dsk, dsv, dsl, L.kpm, *L.idx_tables, L.summary_k,
            L.summary_v, L.summary_count, L.summary_pos, L.slopes, *q.stride(), *k.stride(), *v.stride(),
            *grad_out.stride(), *L.shape_args(), NEED_SUMM=need_summ, NEED_SLOPES=need_sl, **flags)
        if L.near:
            for name in ("BLOCK_T", "NEAR", "HAS_BLOCKS", "HAS_TOKENS", "HAS_SUMM", "HAS_SPOS"):
                flags.pop(name)
            L.mod._backward_dkdv_near[(triton_cdiv(nk, L.cfg["BLOCK_N"]), B * Hkv)](
                q, k, v, grad_out, lse, delta, dk, dv, L.kpm, L.slopes, *q.stride(), *k.stride(), *v.stride(),
                *grad_out.stride(), H, Hkv, H // Hkv, nq, nk, L.b, L.qoff, L.window, max(a.band, 1), L.scale,
                L.softcap,
                **flags)
    d_summary_k = d_summary_v = empty
    if need_summ:   # back to the summary tables' own shapes (they may have been broadcast)
        d_summary_k = dsk.sum_to_size(L.summary_shapes[0]).to(summary_k.dtype)
        d_summary_v = dsv.sum_to_size(L.summary_shapes[1]).to(summary_v.dtype)
    elif need_summary_grad and summary_k is not None:
        d_summary_k, d_summary_v = torch.zeros_like(summary_k), torch.zeros_like(summary_v)
    d_slopes = dsl.to(slopes.dtype) if need_sl else empty
    return dq, dk.to(k.dtype), dv.to(v.dtype), d_summary_k, d_summary_v, empty, d_slopes


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --- the public entry: a plan in, (out, lse) out, differentiable ------------------------------------------
def _plan_args(q, k, v, plan, scale, causal, key_padding_mask, slopes, softcap) -> AttentionArgs:
    """The op's arguments for `plan`; keyword arguments override the plan's own values."""
    from danon.core import checks
    return attention_args(q, k, v, plan, scale=checks.check_scale(scale, q.shape[-1]), causal=causal,
                          key_padding_mask=key_padding_mask, slopes=slopes, softcap=checks.check_softcap(softcap))


def triton_attention(q: Tensor, k: Tensor, v: Tensor, plan, *, scale: Optional[float] = None,
                     causal: Optional[bool] = None, key_padding_mask: Optional[Tensor] = None,
                     slopes: Optional[Tensor] = None, softcap: Optional[float] = None):
    """Run a plan (danon.attention_plan) with the Triton kernels: returns (out [B, H, Nq, Dv], lse [B, H, Nq]).

    The `danon::attention` op with this executor preferred (danon/core/executors.py), so differentiable as the
    op is: in q, k, v, the plan's summary keys and values (so through the means, in k and v) and the ALiBi
    slopes; the backward runs on the Triton kernels too. CUDA tensors run compiled, CPU tensors in
    Triton's interpreter.
    scale: default 1/sqrt(D). causal: the plan's (None); a different value is an error, the plan was
    built for one masking. slopes: ALiBi slopes [H], default the plan's. softcap: Gemma-style cap.
    lse is fp32, -inf for a query that sees no key (its output is 0).

    Example:
        >>> import torch, danon
        >>> from danon.kernels import triton_attention
        >>> q = torch.randn(1, 2, 64, 16)
        >>> plan = danon.attention_plan(q, q, q, kind="msra", causal=True, block_size=16, window=16, num_levels=1)
        >>> out, lse = triton_attention(q, q, q, plan)
        >>> torch.allclose(out, danon.msra_attention(q, q, q, causal=True, block_size=16, window=16, num_levels=1),
        ...                atol=1e-5)
        True
    """
    from danon.core import checks
    checks.check_qkv(q, k, v, sparse=False)
    checks.check_key_padding_mask(key_padding_mask, q, k)
    a = _plan_args(q, k, v, plan, scale, causal, key_padding_mask, slopes, softcap)
    if not supports(a):
        _Launch(a, backward=False)   # raises, naming the argument the kernels cannot take
    with prefer("triton"):
        return torch.ops.danon.attention(*a)


def triton_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, plan, out: Tensor, lse: Tensor, *,
                              grad_lse: Optional[Tensor] = None, scale: Optional[float] = None,
                              causal: Optional[bool] = None, key_padding_mask: Optional[Tensor] = None,
                              slopes: Optional[Tensor] = None, softcap: Optional[float] = None) -> dict:
    """The backward of `triton_attention` by hand: {"q", "k", "v", "summary_k", "summary_v", "slopes"} -> grad.

    "k" and "v" are the gradients through the exact keys only; "summary_k" / "summary_v" (None without
    summaries) still have to be carried to k and v through the plan's means (autograd does that when
    `triton_attention` is differentiated instead). "slopes" is None without ALiBi.

    Example:
        >>> import torch, danon
        >>> from danon.kernels import triton_attention, triton_attention_backward
        >>> q = torch.randn(1, 2, 64, 16)
        >>> plan = danon.attention_plan(q, q, q, kind="ucsa", block_size=16, local_window_size=16,
        ...                             global_tokens=16, top_k_blocks=1)
        >>> out, lse = triton_attention(q, q, q, plan)
        >>> g = triton_attention_backward(torch.ones_like(out), q, q, q, plan, out, lse)
        >>> g["q"].shape, g["summary_k"].shape == plan.summary_k.shape
        (torch.Size([1, 2, 64, 16]), True)
    """
    a = _plan_args(q, k, v, plan, scale, causal, key_padding_mask, slopes, softcap)
    has_summ = plan.summary_k is not None and plan.summary_idx is not None
    grads = dict(zip(GRADIENTS, attention_backward(
        a, BackwardArgs(grad_out, grad_lse, out, lse, has_summ, False, a.slopes is not None))))
    return {"q": grads["q"], "k": grads["k"], "v": grads["v"],
            "summary_k": grads["summary_k"] if has_summ else None,
            "summary_v": grads["summary_v"] if has_summ else None,
            "slopes": grads["slopes"] if a.slopes is not None else None}
