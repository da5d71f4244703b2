"""The ATen executor: `danon::attention` written out in ATen ops, for the lowerings that cannot call the op
(ONNX, TensorRT), which use it as a decomposition table.

Sparse plans become the reference executor's gather-based computation (danon/kernels/reference.py): the
near window and listed blocks, routed tokens and summaries gathered into one key set per query
block, one batched matmul, a masked softmax, one matmul. Memory is O(N x keys per query), never
N x N. It runs as one chunk over all query blocks (the reference's chunk loop would make the
number of chunks depend on the sequence length, which an exported graph must not fix), and the
near window is listed as explicit blocks of a fixed width 2W + 1 (W + 1 causal) instead of
min(W, Tk), so no size comparison guards a symbolic sequence length.

Dense plans (the exact family without a window) either stay the op, for a lowering that
translates it itself (ONNX: one `Attention` node), or become `F.scaled_dot_product_attention`
(TensorRT has a converter for it), or the reference's dense path where SDPA lacks a feature
(softcap, ALiBi slopes, Dv != D).
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from danon.core import attention_op as _attention_op  # noqa: F401  (registers torch.ops.danon.attention)
from danon.core.attention_args import PLAN_TENSORS, AttentionArgs
from danon.core.blocks import causal_visible, near_block_table, query_layout, rows_without_keys
from danon.core.dtypes import accumulation_dtype
from danon.core.plan import is_dense_plan
from danon.core.plan_op import plan_decompositions

from .reference import Problem

__all__ = ["attention_aten", "sparse_decompositions", "all_decompositions"]


def _gathered(a: AttentionArgs):
    """The reference executor over every query block at once: (out [B, H, Nq, Dv], lse [B, H, Nq])."""
    # contiguous inputs: otherwise the trace records views valid only for the example's strides and sizes
    q, k, v = a.q.contiguous(), a.k.contiguous(), a.v.contiguous()
    B, H, nq, _ = q.shape
    Hkv, nk = k.shape[1], k.shape[2]
    _, first, tq = query_layout(nq, nk, a.block_size)
    tk = -(-nk // a.block_size)
    block_idx = a.block_idx
    if a.window >= 0:
        # the width depends on the plan's window only (not on min(W, Tk)): no guard on the sequence length
        near = near_block_table(tq, tk, a.window, a.causal, B, Hkv, q.device, clamp=False, first=first)
        block_idx = near if block_idx is None else torch.cat([near, block_idx.to(torch.int32)], -1)
    prob = Problem(a._replace(q=q, k=k, v=v, block_idx=block_idx, attn_mask=None, window=-1))
    out, lse = prob.forward_chunk(0, prob.tq)
    return prob.call_rows(prob.from_chunk_rows(out, 0, prob.tq)).to(q.dtype), prob.call_rows(prob.from_chunk_rows(lse, 0, prob.tq))


def _dense_sdpa(q, k, v, key_padding_mask, attn_mask, scale, causal):
    """The dense plan through F.scaled_dot_product_attention (GQA native), rows without keys set to 0."""
    dt = accumulation_dtype(q.dtype)
    dead = rows_without_keys(q, k, key_padding_mask, attn_mask, causal)   # before causal folds into the mask
    seeing = None if dead is None else ~dead[..., None]   # [B, H|1, Nq, 1]
    mask = None
    if attn_mask is not None:
        mask = attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(q.dtype)
    if key_padding_mask is not None:
        kpm = key_padding_mask.bool()[:, None, None, :]
        mask = kpm if mask is None else (mask & kpm if mask.dtype == torch.bool
                                         else mask.masked_fill(~kpm, float("-inf")))
    nq, nk = q.shape[2], k.shape[2]
    # SDPA takes is_causal or a mask, not both; its is_causal is aligned top-left, the op's bottom-right
    if causal and (mask is not None or not statically_known_true(nq == nk)):
        tril = causal_visible(nq, nk, q.device)
        mask = tril if mask is None else (mask & tril if mask.dtype == torch.bool else mask.masked_fill(~tril, float("-inf")))
        causal = False
    if seeing is not None and mask is not None:   # a row that sees nothing would be NaN: let it see all, zero it
        mask = mask | ~seeing if mask.dtype == torch.bool else mask.masked_fill(~seeing, 0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    # the lse from its definition (O(N^2), like the attention itself; dead code when unused)
    logits = torch.matmul(q.to(dt), k.to(dt).repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2)) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.to(dt)
    elif causal:
        logits = logits.masked_fill(~causal_visible(nq, nk, q.device), float("-inf"))
    lse = torch.logsumexp(logits, -1)
    if seeing is not None:
        out = out.masked_fill(~seeing, 0.0)
        lse = lse.masked_fill(~seeing[..., 0], float("-inf"))
    return out, lse


def attention_aten(*args, **kwargs):
    """`danon::attention` in ATen ops: same arguments (danon/core/attention_args.py), same (out, lse).

    Example:
        >>> import torch, danon
        >>> from danon.core.attention_args import attention_args
        >>> q = torch.randn(1, 2, 96, 8)
        >>> plan = danon.attention_plan(q, q, kind="msra", causal=True, block_size=16, window=16, num_levels=1)
        >>> args = attention_args(q, q, q, plan, scale=8 ** -0.5)
        >>> out, lse = attention_aten(*args)
        >>> bool(torch.allclose(out, torch.ops.danon.attention(*args)[0], atol=1e-5))
        True
    """
    a = AttentionArgs(*args, **kwargs)
    q = a.q
    if is_dense_plan(a.block_idx, a.token_idx, a.summary_idx, a.window):
        if a.slopes is None and a.softcap is None and a.v.shape[3] == q.shape[3]:
            return _dense_sdpa(q, a.k, a.v, a.key_padding_mask, a.attn_mask, a.scale, a.causal)
        prob = Problem(a._replace(**dict.fromkeys(PLAN_TENSORS), window=-1))
        out, lse = prob.forward_chunk(0, prob.tq)
        return prob.call_rows(prob.from_chunk_rows(out, 0, prob.tq)).to(q.dtype), prob.call_rows(prob.from_chunk_rows(lse, 0, prob.tq))
    if a.attn_mask is not None:
        raise ValueError("attn_mask (a general mask) is supported by the dense exact plan only")
    return _gathered(a)


def _sparse_only(*args, **kwargs):
    """Decompose sparse plans only: a dense plan stays the op (NotImplemented tells make_fx to keep it)."""
    a = AttentionArgs(*args, **kwargs)
    if is_dense_plan(a.block_idx, a.token_idx, a.summary_idx, a.window):
        return NotImplemented
    return attention_aten(*a)


def sparse_decompositions() -> Dict[object, Callable]:
    """Decomposition table for `ExportedProgram.run_decompositions`: sparse plans to ATen, dense plans kept,
    plan building (`danon::plan`) back to the builder's ATen ops."""
    return {torch.ops.danon.attention.default: _sparse_only, **plan_decompositions()}


def all_decompositions() -> Dict[object, Callable]:
    """Decomposition table that leaves no danon op: every plan to ATen (TensorRT)."""
    return {torch.ops.danon.attention.default: attention_aten, **plan_decompositions()}
