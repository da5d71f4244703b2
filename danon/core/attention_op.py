"""The `danon::attention` op (DESIGN.md section 2), registered with torch.library.

It carries every attention site through the pipeline: a fake impl for tracing, the registered
executors as its kernel (danon/core/executors.py picks one per call), autograd through
`danon::attention_backward`, and FLOP formulas so that cost models (the flop counter, AOTAutograd's
partitioner) see its real cost. Both schemas come from danon/core/attention_args.py, the one place the
argument list is written.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .attention_args import (BACKWARD_SCHEMA, FORWARD_SCHEMA, GRADIENTS, AttentionArgs, BackwardArgs, attention_args,
                             backward_call, split_backward)
from .dtypes import accumulation_dtype
from .executors import executor_for, prefer, preferred
from .plan import keys_per_query
from .sequence_split import check_not_bypassed

__all__ = ["attention_op", "attention_backward_op", "run_plan"]


def _attention(*args) -> tuple[Tensor, Tensor]:
    """Attention over a plan: returns (out [B, H, Nq, Dv] in q's dtype, lse [B, H, Nq] fp32/fp64).

    The arguments are danon/core/attention_args.py's ARGUMENTS. window >= 0 adds the near blocks
    (|t - t_q| <= window; causal t_q - window <= t <= t_q) to the exact blocks of every query block;
    -1 means none. With no lists and window -1 the plan is dense. band >= 1 limits exact keys to a
    sliding window of tokens: query i sees key j only if i - j < band (and j - i < band without causal
    masking); -1 means none.

    Example:
        >>> import torch, danon
        >>> q = torch.randn(1, 2, 32, 8)
        >>> out, lse = torch.ops.danon.attention(q, q, q, None, None, None, None, None, None, None,
        ...                                      None, None, None, 8 ** -0.5, True, 16, -1, -1, None)
        >>> out.shape
        torch.Size([1, 2, 32, 8])
    """
    a = AttentionArgs(*args)
    check_not_bypassed()
    out, lse = executor_for(a).forward(a)
    return out.contiguous(), lse.contiguous()   # the layout the fake impl promises


attention_op = torch.library.custom_op("danon::attention", _attention, mutates_args=(), schema=FORWARD_SCHEMA)


@attention_op.register_fake
def _attention_fake(*args):
    a = AttentionArgs(*args)
    out = a.q.new_empty(*a.q.shape[:3], a.v.shape[3])
    return out, a.q.new_empty(a.q.shape[:3], dtype=accumulation_dtype(a.q.dtype))


def _attention_backward(*args) -> tuple:
    """Gradients of `danon::attention`: (dq, dk, dv, d_summary_k, d_summary_v, d_attn_mask, d_slopes).

    Gradients that are not asked for come back as empty tensors.
    """
    g, a = split_backward(args)
    grads = executor_for(a).backward(a, g)
    # contiguous, as the fake impl promises; and a custom op's outputs may not alias its inputs
    needed = (True, True, True, g.need_summary_grad, g.need_summary_grad, g.need_mask_grad, g.need_slopes_grad)
    grads = [a.q.new_empty(0) if not wanted else x.clone() if x.numel() == 0 else x.contiguous()
             for x, wanted in zip(grads, needed)]        # every empty result a tensor of its own
    inputs = [getattr(a, name) for name in GRADIENTS]
    return tuple(x.clone() if any(x is y for y in inputs) else x for x in grads)


attention_backward_op = torch.library.custom_op("danon::attention_backward", _attention_backward, mutates_args=(),
                                                schema=BACKWARD_SCHEMA)


@attention_backward_op.register_fake
def _attention_backward_fake(*args):
    g, a = split_backward(args)
    empty = a.q.new_empty(0)
    wanted = {"summary_k": g.need_summary_grad, "summary_v": g.need_summary_grad, "attn_mask": g.need_mask_grad,
              "slopes": g.need_slopes_grad}
    grads = []
    for name in GRADIENTS:
        x = getattr(a, name)
        grads.append(x.new_empty(x.shape) if x is not None and wanted.get(name, True) else empty)
    return tuple(grads)


def _setup_context(ctx, inputs, output):
    a = AttentionArgs(*inputs)
    out, lse = output
    tensors = [(i, x) for i, x in enumerate(a) if isinstance(x, Tensor)]
    ctx.save_for_backward(*(x for _, x in tensors), out, lse)
    ctx.tensor_positions = [i for i, _ in tensors]
    ctx.scalars = tuple(None if isinstance(x, Tensor) else x for x in a)
    ctx.executor = preferred()   # an eager call under `prefer` runs its backward on the same executor


def _saved_args(ctx):
    *saved, out, lse = ctx.saved_tensors
    values = list(ctx.scalars)
    for i, x in zip(ctx.tensor_positions, saved):
        values[i] = x
    return AttentionArgs(*values), out, lse


def _backward(ctx, grad_out, grad_lse):
    a, out, lse = _saved_args(ctx)
    needs = dict(zip(AttentionArgs._fields, ctx.needs_input_grad))
    need_summary = a.summary_k is not None and (needs["summary_k"] or needs["summary_v"])
    need_mask = a.attn_mask is not None and a.attn_mask.is_floating_point() and needs["attn_mask"]
    need_slopes = a.slopes is not None and needs["slopes"]
    if grad_lse is None:
        grad_lse = torch.zeros_like(lse)
    g = BackwardArgs(grad_out, grad_lse, out, lse, need_summary, need_mask, need_slopes)
    with prefer(ctx.executor) if ctx.executor is not None else contextlib.nullcontext():
        grads = dict(zip(GRADIENTS, attention_backward_op(*backward_call(g, a))))
    wanted = {"summary_k": need_summary, "summary_v": need_summary, "attn_mask": need_mask, "slopes": need_slopes}
    return tuple(grads[name] if name in grads and wanted.get(name, True) else None for name in AttentionArgs._fields)


attention_op.register_autograd(_backward, setup_context=_setup_context)


def _named(op, positional: tuple, kwargs: dict) -> dict:
    """The formula's arguments by name, from the op's schema (no hand-counted positions)."""
    names = [a.name for a in op._schema.arguments]
    return {**dict(zip(names, positional)), **kwargs}


def _flops(a: dict, passes: int) -> int:
    def width(shape):
        return None if shape is None else shape[-1]
    keys = keys_per_query(a["k"][2], causal=a["causal"], block_size=a["block_size"], window=a["window"],
                          band=a["band"], blocks=width(a.get("block_idx")), tokens=width(a.get("token_idx")),
                          summaries=width(a.get("summary_idx")))
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
    a = attention_args(q, k, v, plan, scale=scale, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                       softcap=softcap)
    out, _ = torch.ops.danon.attention(*a)
    return out
