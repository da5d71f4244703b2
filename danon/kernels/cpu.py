"""CPU executor of an attention plan (DESIGN.md section 4): picks the path for each call.

- dense exact attention (no ALiBi, no softcap): PyTorch's fused CPU flash kernel, GQA native;
- sparse plans: danon's own kernel (danon/kernels/fused_cpu.py, C++ built on first use), one tile per query
  block and head, forward and backward; without it (no compiler, float64, a band, more than 4096 keys per query
  block): gathered key sets run through the same flash kernel (danon/kernels/gather.py);
- anything the fast paths lack (softcap, gradients of ALiBi slopes without causal masking off danon's kernel, of
  a general mask or of the lse, non-CPU tensors): the reference executor (danon/kernels/reference.py), plain torch,
  chunked.
No path builds an N x N tensor for a sparse plan.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from danon.core.blocks import causal_visible, rows_without_keys
from danon.core.attention_args import GRADIENTS, AttentionArgs, BackwardArgs
from danon.core.dtypes import accumulation_dtype
from danon.core.plan import is_dense_plan

from .fused_cpu import fused_backward, fused_forward, tokens_in_own_block
from .gather import GatheredPlan, gathered_backward, gathered_forward
from .reference import reference_backward, reference_forward

__all__ = ["attention_forward", "attention_backward"]


def _additive_mask(q, k, key_padding_mask, attn_mask) -> Optional[Tensor]:
    """The general mask and key padding as one additive float mask [B, H, Nq, Nk] for the flash kernel."""
    mask = None
    if attn_mask is not None:
        mask = attn_mask.to(q.dtype) if attn_mask.dtype != torch.bool else \
            torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
    if key_padding_mask is not None:
        pad = torch.zeros(q.shape[0], 1, 1, k.shape[2], dtype=q.dtype, device=q.device)
        pad = pad.masked_fill(~key_padding_mask.bool()[:, None, None, :], float("-inf"))
        mask = pad if mask is None else mask + pad
    if mask is not None:
        mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return mask


def _rows_contiguous(x: Tensor) -> Tensor:
    """The fused CPU kernel silently misreads a last dim that is not contiguous (stride != 1)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _flash_dtype(q: Tensor, attn_mask) -> torch.dtype:
    """fp16/bf16 with an additive float mask run in fp32: the mask must not be rounded to half precision."""
    if attn_mask is not None and attn_mask.is_floating_point() and q.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return q.dtype


def _bottom_right(q, k, attn_mask, causal):
    """(attn_mask, causal) for the fused kernel, whose is_causal is aligned top-left: with Nq != Nk the causal
    mask aligned bottom-right becomes part of the mask (a single query row sees every key: no mask at all)."""
    nq, nk = q.shape[2], k.shape[2]
    if not causal or nq == nk:
        return attn_mask, causal
    if nq == 1 and nk >= 1:
        return attn_mask, False
    tri = causal_visible(nq, nk, q.device)
    if attn_mask is None:
        return tri, False
    return (attn_mask & tri if attn_mask.dtype == torch.bool else attn_mask.masked_fill(~tri, float("-inf"))), False


def _flash_forward(q, k, v, key_padding_mask, attn_mask, scale, causal):
    """Dense exact attention through PyTorch's fused CPU flash kernel (GQA native)."""
    dead = rows_without_keys(q, k, key_padding_mask, attn_mask, causal)
    attn_mask, causal = _bottom_right(q, k, attn_mask, causal)
    dt = _flash_dtype(q, attn_mask)
    qc, kc, vc = (_rows_contiguous(x.to(dt)) for x in (q, k, v))
    mask = _additive_mask(qc, kc, key_padding_mask, attn_mask)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qc, kc, vc, 0.0, causal, attn_mask=mask, scale=scale)
    out = out.to(q.dtype)
    if dead is not None:
        out = out.masked_fill(dead[..., None], 0.0)
        lse = lse.masked_fill(dead, float("-inf"))
    return out, lse.to(accumulation_dtype(q.dtype))


def _path(a: AttentionArgs, dense: bool) -> str:
    """Which executor runs this call: "flash" (dense), "gather" (sparse) or "reference" (everything else)."""
    q, k, v = a.q, a.k, a.v
    if q.device.type != "cpu" or a.softcap is not None or v.shape[3] != q.shape[3]:
        return "reference"   # the fused kernel is CPU-only, has no softcap, and needs Dv = D
    if dense:
        return "flash" if a.slopes is None else "reference"
    if a.band >= 0 and (a.token_idx is not None or a.block_idx is not None):
        return "reference"   # the band is applied in the window and own-block parts only
    if q.shape[2] > k.shape[2]:
        return "reference"   # the window views assume no more query blocks than key blocks
    if tokens_in_own_block(a):
        return "reference"   # a hand-made plan listing tokens inside the query's own block
    return "gather"


def attention_forward(a: AttentionArgs):
    """Execute a plan: returns out [B, H, Nq, Dv] in q's dtype and lse [B, H, Nq] in fp32 (fp64).

    Example:
        >>> import torch
        >>> from danon.core.attention_args import attention_args
        >>> from danon.kernels.cpu import attention_forward
        >>> q = torch.randn(1, 2, 40, 8)
        >>> out, lse = attention_forward(attention_args(q, q, q, scale=8 ** -0.5, causal=True, block_size=16))
        >>> out.shape, lse.shape
        (torch.Size([1, 2, 40, 8]), torch.Size([1, 2, 40]))
    """
    q, k, v = a.q, a.k, a.v
    if q.numel() == 0 or k.shape[2] == 0:   # nothing to attend to (the fused kernels cannot take empty sizes)
        return (q.new_zeros(*q.shape[:3], v.shape[3]),
                q.new_full(q.shape[:3], float("-inf"), dtype=accumulation_dtype(q.dtype)))
    dense = is_dense_plan(a.block_idx, a.token_idx, a.summary_idx, a.window)
    if a.band == 0 or a.band < -1:
        raise ValueError(f"band must be >= 1 (a sliding window of tokens) or -1 (none), got {a.band}")
    if a.band >= 0 and a.window < 0:
        raise ValueError("band (a sliding window of tokens) needs the plan's block window (window >= 0)")
    if a.attn_mask is not None and not dense:
        raise ValueError("attn_mask (a general mask) is supported by the dense exact plan only; sparse plans take "
                         "causal and key_padding_mask")
    path = _path(a, dense)
    if path == "flash":
        return _flash_forward(q, k, v, a.key_padding_mask, a.attn_mask, a.scale, a.causal)
    if path == "gather":
        fused = fused_forward(a)   # danon's own kernel: one tile per query block (None: not built, or not taken)
        out, lse = fused if fused is not None else gathered_forward(GatheredPlan(a))
        return out.to(q.dtype), lse
    return reference_forward(a)


def attention_backward(a: AttentionArgs, g: BackwardArgs):
    """Gradients of the executor: (dq, dk, dv, d_summary_k, d_summary_v, d_attn_mask, d_slopes).

    Grads that are not needed come back as empty tensors. Each path recomputes what it needs chunk
    by chunk from q, k, v, out and lse (flash-style: nothing else is saved from the forward).
    """
    q, k, v = a.q, a.k, a.v
    if q.numel() == 0 or k.shape[2] == 0:
        return tuple(torch.zeros_like(x) if x is not None and wanted else q.new_empty(0)
                     for x, wanted in _wanted(a, g))
    dense = is_dense_plan(a.block_idx, a.token_idx, a.summary_idx, a.window)
    use_lse = g.grad_lse is not None and bool((g.grad_lse != 0).any())
    empty = q.new_empty(0)
    path = _path(a, dense)
    if path == "flash" and not use_lse and not g.need_mask_grad:
        return _flash_backward(g.grad_out, q, k, v, a.key_padding_mask, a.attn_mask, g.out, g.lse, a.scale,
                               a.causal) + (empty,) * 4

    grads = None
    if path == "gather" and not use_lse:   # danon's own kernel first (None: not built, or not taken)
        grads = fused_backward(a, g.grad_out, g.out, g.lse)
        # the slopes' gradient is linear in the key's position only under causal masking (gathered_backward)
        if grads is None and (not g.need_slopes_grad or a.causal):
            grads = gathered_backward(GatheredPlan(a), g.grad_out, g.out, g.lse, g.need_slopes_grad)
    if grads is not None:
        dq, dk, dv, dsk, dsv, dslopes = grads
        dsk = dsk.to(a.summary_k.dtype) if (dsk is not None and g.need_summary_grad) else empty
        dsv = dsv.to(a.summary_v.dtype) if (dsv is not None and g.need_summary_grad) else empty
        dslopes = dslopes.to(a.slopes.dtype) if g.need_slopes_grad else empty
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsk, dsv, empty, dslopes
    return reference_backward(a, g, use_lse)


def _wanted(a: AttentionArgs, g: BackwardArgs):
    """(input, whether its gradient is asked for) in GRADIENTS order."""
    need = {"summary_k": g.need_summary_grad, "summary_v": g.need_summary_grad, "attn_mask": g.need_mask_grad,
            "slopes": g.need_slopes_grad}
    return [(getattr(a, name), need.get(name, True)) for name in GRADIENTS]


def _flash_backward(grad_out, q, k, v, key_padding_mask, attn_mask, out, lse, scale, causal):
    attn_mask, causal = _bottom_right(q, k, attn_mask, causal)
    dt = _flash_dtype(q, attn_mask)
    qc, kc, vc = (_rows_contiguous(x.to(dt)) for x in (q, k, v))
    mask = _additive_mask(qc, kc, key_padding_mask, attn_mask)
    # rows that see no key have lse -inf; with 0 instead every p of theirs is exp(-inf) = 0 all the same
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).to(accumulation_dtype(dt))
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out.to(dt).contiguous(), qc, kc, vc, out.to(dt).contiguous(), lse, 0.0, causal, attn_mask=mask,
        scale=scale)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
