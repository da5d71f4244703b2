"""The `danon::attention` op (DESIGN.md section 2), registered with torch.library.

It carries every attention site through the pipeline: a fake impl for tracing, the CPU executor
as its kernel, autograd through `danon::attention_backward`, and FLOP formulas so that cost
models (the flop counter, AOTAutograd's partitioner) see its real cost.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from danon.core.plan import is_dense_plan
from danon.kernels import cpu as cpu_kernel
from danon.core.dtypes import accumulation_dtype

__all__ = ["attention_op", "attention_backward_op", "run_plan"]


def _executor(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor]):
    """CUDA tensors run the Triton executor where it applies (no general mask, no fp64); all else kernels/cpu.py."""
    if q.device.type == "cuda":
        from danon.kernels import triton as triton_kernel   # on the first CUDA call: CPU-only use needs no Triton
        if triton_kernel.supports(q, k, v, attn_mask):
            return triton_kernel
    return cpu_kernel


@torch.library.custom_op("danon::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, block_idx: Optional[Tensor], token_idx: Optional[Tensor],
                 summary_idx: Optional[Tensor], summary_k: Optional[Tensor], summary_v: Optional[Tensor],
                 summary_count: Optional[Tensor], summary_pos: Optional[Tensor],
                 key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor], slopes: Optional[Tensor],
                 scale: float, causal: bool, block_size: int, window: int, band: int,
                 softcap: Optional[float]) -> tuple[Tensor, Tensor]:
    """Attention over a plan: returns (out [B, H, Nq, Dv] in q's dtype, lse [B, H, Nq] fp32/fp64).

    window >= 0 adds the near blocks (|t - t_q| <= window; causal t_q - window <= t <= t_q) to the
    exact blocks of every query block; -1 means none. With no lists and window -1 the plan is dense.
    band >= 1 limits exact keys to a sliding window of tokens: query i sees key j only if i - j < band
    (and j - i < band without causal masking); -1 means none.

    Example:
        >>> import torch, danon
        >>> q = torch.randn(1, 2, 32, 8)
        >>> out, lse = torch.ops.danon.attention(q, q, q, None, None, None, None, None, None, None,
        ...                                      None, None, None, 8 ** -0.5, True, 16, -1, -1, None)
        >>> out.shape
        torch.Size([1, 2, 32, 8])
    """
    out, lse = _executor(q, k, v, attn_mask).attention_forward(
        q, k, v, block_idx, token_idx, summary_idx, summary_k, summary_v, summary_count, summary_pos,
        key_padding_mask, attn_mask, slopes, scale, causal, block_size, window, band, softcap)
    return out.contiguous(), lse.contiguous()   # the layout the fake impl promises


@attention_op.register_fake
def _attention_fake(q, k, v, block_idx, token_idx, summary_idx, summary_k, summary_v, summary_count, summary_pos,
                    key_padding_mask, attn_mask, slopes, scale, causal, block_size, window, band, softcap):
    out = q.new_empty(*q.shape[:3], v.shape[3])
    return out, q.new_empty(q.shape[:3], dtype=accumulation_dtype(q.dtype))


@torch.library.custom_op("danon::attention_backward", mutates_args=())
def attention_backward_op(grad_out: Tensor, grad_lse: Tensor, q: Tensor, k: Tensor, v: Tensor,
                          block_idx: Optional[Tensor], token_idx: Optional[Tensor], summary_idx: Optional[Tensor],
                          summary_k: Optional[Tensor], summary_v: Optional[Tensor],
                          summary_count: Optional[Tensor], summary_pos: Optional[Tensor],
                          key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor],
                          slopes: Optional[Tensor], out: Tensor, lse: Tensor, scale: float, causal: bool,
                          block_size: int, window: int, band: int, softcap: Optional[float], need_summary_grad: bool,
                          need_mask_grad: bool, need_slopes_grad: bool
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of `danon::attention`: (dq, dk, dv, d_summary_k, d_summary_v, d_attn_mask, d_slopes).

    Gradients that are not asked for come back as empty tensors.
    """
    grads = _executor(q, k, v, attn_mask).attention_backward(
        grad_out, grad_lse, q, k, v, block_idx, token_idx, summary_idx, summary_k, summary_v, summary_count,
        summary_pos, key_padding_mask, attn_mask, slopes, out, lse, scale, causal, block_size, window, band, softcap,
        need_summary_grad, need_mask_grad, need_slopes_grad)
    # contiguous, as the fake impl promises; and a custom op's outputs may not alias its inputs
    needed = (True, True, True, need_summary_grad, need_summary_grad, need_mask_grad, need_slopes_grad)
    grads = [q.new_empty(0) if not wanted else g.clone() if g.numel() == 0 else g.contiguous()
             for g, wanted in zip(grads, needed)]        # every empty result a tensor of its own
    return tuple(g.clone() if any(g is x for x in (q, k, v, summary_k, summary_v, attn_mask, slopes)) else g
                 for g in grads)


@attention_backward_op.register_fake
def _attention_backward_fake(grad_out, grad_lse, q, k, v, block_idx, token_idx, summary_idx, summary_k, summary_v,
                             summary_count, summary_pos, key_padding_mask, attn_mask, slopes, out, lse, scale,
                             causal, block_size, window, band, softcap, need_summary_grad, need_mask_grad, need_slopes_grad):
    empty = q.new_empty(0)

    def like(x, needed):
        return x.new_empty(x.shape) if (x is not None and needed) else empty

    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            like(summary_k, need_summary_grad), like(summary_v, need_summary_grad),
            like(attn_mask, need_mask_grad), like(slopes, need_slopes_grad))


def _setup_context(ctx, inputs, output):
    (q, k, v, block_idx, token_idx, summary_idx, summary_k, summary_v, summary_count, summary_pos,
     key_padding_mask, attn_mask, slopes, scale, causal, block_size, window, band, softcap) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, block_idx, token_idx, summary_idx, summary_k, summary_v, summary_count,
                          summary_pos, key_padding_mask, attn_mask, slopes, out, lse)
    ctx.options = (scale, causal, block_size, window, band, softcap)


def _backward(ctx, grad_out, grad_lse):
    (q, k, v, block_idx, token_idx, summary_idx, summary_k, summary_v, summary_count, summary_pos,
     key_padding_mask, attn_mask, slopes, out, lse) = ctx.saved_tensors
    needs = ctx.needs_input_grad
    need_summary = summary_k is not None and (needs[6] or needs[7])
    need_mask = attn_mask is not None and attn_mask.is_floating_point() and needs[11]
    need_slopes = slopes is not None and needs[12]
    if grad_lse is None:
        grad_lse = torch.zeros_like(lse)
    dq, dk, dv, dsk, dsv, dmask, dslopes = attention_backward_op(
        grad_out, grad_lse, q, k, v, block_idx, token_idx, summary_idx, summary_k, summary_v, summary_count,
        summary_pos, key_padding_mask, attn_mask, slopes, out, lse, *ctx.options, need_summary, need_mask,
        need_slopes)
    return (dq, dk, dv, None, None, None, dsk if need_summary else None, dsv if need_summary else None,
            None, None, None, dmask if need_mask else None, dslopes if need_slopes else None,
            None, None, None, None, None, None)


attention_op.register_autograd(_backward, setup_context=_setup_context)


def _keys_per_query(k_shape, block_idx_shape, token_idx_shape, summary_idx_shape, causal, block_size,
                    window, band=-1) -> float:
    nk = k_shape[2]
    if band >= 1 and block_idx_shape is None and token_idx_shape is None and summary_idx_shape is None:
        return min(nk, band if causal else 2 * band - 1)
    if is_dense_plan(block_idx_shape, token_idx_shape, summary_idx_shape, window):
        return nk / 2 if causal else nk
    n = 0 if window < 0 else min(nk, ((window + 1) if causal else (2 * window + 1)) * block_size)
    if block_idx_shape is not None:
        n += block_idx_shape[-1] * block_size
    for shape in (token_idx_shape, summary_idx_shape):
        if shape is not None:
            n += shape[-1]
    return n


def _named(op, positional: tuple, kwargs: dict) -> dict:
    """The formula's arguments by name, from the op's schema (no hand-counted positions)."""
    names = [a.name for a in op._schema.arguments]
    return {**dict(zip(names, positional)), **kwargs}


def _flops(a: dict, passes: int) -> int:
    keys = _keys_per_query(a["k"], a.get("block_idx"), a.get("token_idx"), a.get("summary_idx"), a["causal"],
                           a["block_size"], a["window"], a["band"])
    B, H, nq, D = a["q"]
    return int(passes * 2 * B * H * nq * keys * (D + a["v"][3]))


@register_flop_formula(torch.ops.danon.attention)
def _attention_flops(*args, out_shape=None, **kwargs) -> int:
    """Two matmuls per (query, key) pair: 2 * B * H * Nq * keys * (D + Dv)."""
    return _flops(_named(torch.ops.danon.attention.default, args, kwargs), passes=1)


@register_flop_formula(torch.ops.danon.attention_backward)
def _attention_backward_flops(*args, out_shape=None, **kwargs) -> int:
    """The backward recomputes the forward's two matmuls and runs four more: 3x the forward."""
    return _flops(_named(torch.ops.danon.attention_backward.default, args, kwargs), passes=3)


def run_plan(q: Tensor, k: Tensor, v: Tensor, plan, *, scale: float, key_padding_mask: Optional[Tensor] = None,
             attn_mask: Optional[Tensor] = None, softcap: Optional[float] = None) -> Tensor:
    """Run `danon::attention` on a plan built by one of the families; returns the output only.

    Example:
        >>> import torch, danon
        >>> from danon.core.attention_op import run_plan
        >>> q = torch.randn(1, 2, 64, 8)
        >>> plan = danon.attention_plan(q, q, q, kind="msra", block_size=16, window=16, num_levels=1)
        >>> run_plan(q, q, q, plan, scale=8 ** -0.5).shape
        torch.Size([1, 2, 64, 8])
    """
    out, _ = torch.ops.danon.attention(
        q, k, v, plan.block_idx, plan.token_idx, plan.summary_idx, plan.summary_k, plan.summary_v,
        plan.summary_count, plan.summary_pos, key_padding_mask, attn_mask, plan.slopes, float(scale),
        bool(plan.causal), int(plan.block_size), -1 if plan.window is None else int(plan.window),
        -1 if plan.band is None else int(plan.band), None if softcap is None else float(softcap))
    return out
