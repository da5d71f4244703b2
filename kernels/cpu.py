"""CPU executor of an attention plan (DESIGN.md section 4): picks the path for each call.

- dense exact attention (no ALiBi, no softcap): PyTorch's fused CPU flash kernel, GQA native;
- sparse plans: gathered key sets run through the same flash kernel (kernels/gather.py);
- anything the fast paths lack (softcap, gradients of ALiBi slopes, of a general mask or of the
  lse, non-CPU tensors): the reference executor (kernels/reference.py), plain torch, chunked.
No path builds an N x N tensor for a sparse plan.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .gather import GatheredPlan, gathered_backward, gathered_forward
from .reference import reference_backward, reference_forward

__all__ = ["attention_forward", "attention_backward"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def _flash_forward(q, k, v, key_padding_mask, attn_mask, scale, causal):
    """Dense exact attention through PyTorch's fused CPU flash kernel (GQA native)."""
    mask = _additive_mask(q, k, key_padding_mask, attn_mask)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    dead = _rows_without_keys(q, k, key_padding_mask, attn_mask, causal)
    if dead is not None:
        out = out.masked_fill(dead[..., None], 0.0)
        lse = lse.masked_fill(dead, float("-inf"))
    return out, lse.to(_compute_dtype(q.dtype))


def _rows_without_keys(q, k, key_padding_mask, attn_mask, causal) -> Optional[Tensor]:
    """Bool [B, H|1, Nq] of query rows that see no key, or None when every row sees one."""
    B, H, nq = q.shape[:3]
    nk = k.shape[2]
    if attn_mask is not None:
        ok = attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf")
        ok = ok.expand(B, H, nq, nk)
        if key_padding_mask is not None:
            ok = ok & key_padding_mask.bool()[:, None, None, :]
        if causal:
            ok = ok & torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril()
        return ~ok.any(-1)
    if key_padding_mask is None:
        return None if (not causal or nk > 0) else torch.ones(B, 1, nq, dtype=torch.bool, device=q.device)
    kpm = key_padding_mask.bool()
    if causal:
        seen = kpm.to(torch.int32).cumsum(-1)
        last = torch.arange(nq, device=q.device).clamp(max=nk - 1)
        return (seen[:, last] == 0)[:, None, :]
    return (~kpm.any(-1))[:, None, None].expand(B, 1, nq)


def _flash_ok(q: Tensor, dense: bool, slopes, softcap) -> bool:
    return dense and slopes is None and softcap is None and q.device.type == "cpu"


def _gather_ok(q: Tensor, dense: bool, softcap, band: int, token_idx, block_idx) -> bool:
    # the band (sliding window) is applied in the window and own-block parts only
    banded_lists = band >= 0 and (token_idx is not None or block_idx is not None)
    return not dense and softcap is None and not banded_lists and q.device.type == "cpu"


def attention_forward(q, k, v, block_idx, token_idx, summary_idx, summary_k, summary_v, summary_count, summary_pos,
                      key_padding_mask, attn_mask, slopes, scale: float, causal: bool, block_size: int,
                      window: int, band: int, softcap: Optional[float]):
    """Execute a plan: returns out [B, H, Nq, Dv] in q's dtype and lse [B, H, Nq] in fp32 (fp64).

    Example:
        >>> import torch
        >>> from kernels.cpu import attention_forward  # installed as danon.kernels.cpu
        >>> q = torch.randn(1, 2, 40, 8)
        >>> out, lse = attention_forward(q, q, q, *[None] * 10, scale=8 ** -0.5, causal=True,
        ...                              block_size=16, window=-1, band=-1, softcap=None)
        >>> out.shape, lse.shape
        (torch.Size([1, 2, 40, 8]), torch.Size([1, 2, 40]))
    """
    dense = block_idx is None and token_idx is None and summary_idx is None and window < 0
    if band >= 0 and window < 0:
        raise ValueError("band (a sliding window of tokens) needs the plan's block window (window >= 0)")
    if attn_mask is not None and not dense:
        raise ValueError("attn_mask (a general mask) is supported by the dense exact plan only; sparse plans take "
                         "causal and key_padding_mask")
    if _flash_ok(q, dense, slopes, softcap):
        return _flash_forward(q, k, v, key_padding_mask, attn_mask, scale, causal)
    if _gather_ok(q, dense, softcap, band, token_idx, block_idx):
        gp = GatheredPlan(q, k, v, block_idx, token_idx, summary_idx, summary_k, summary_v, summary_count,
                          summary_pos, key_padding_mask, slopes, scale, causal, block_size,
                          None if window < 0 else window, None if band < 0 else band)
        out, lse = gathered_forward(gp)
        return out.to(q.dtype), lse
    return reference_forward(q, k, v, block_idx, token_idx, summary_idx, summary_k, summary_v, summary_count,
                             summary_pos, key_padding_mask, attn_mask, slopes, scale, causal, block_size, window,
                             band, softcap)


def attention_backward(grad_out, grad_lse, q, k, v, block_idx, token_idx, summary_idx, summary_k, summary_v,
                       summary_count, summary_pos, key_padding_mask, attn_mask, slopes, out, lse,
                       scale: float, causal: bool, block_size: int, window: int,
                       band: int, softcap: Optional[float], need_summary_grad: bool, need_mask_grad: bool,
                       need_slopes_grad: bool):
    """Gradients of the executor: (dq, dk, dv, d_summary_k, d_summary_v, d_attn_mask, d_slopes).

    Grads that are not needed come back as empty tensors. Each path recomputes what it needs chunk
    by chunk from q, k, v, out and lse (flash-style: nothing else is saved from the forward).
    """
    dense = block_idx is None and token_idx is None and summary_idx is None and window < 0
    use_lse = grad_lse is not None and bool((grad_lse != 0).any())
    empty = q.new_empty(0)
    if _flash_ok(q, dense, slopes, softcap) and not use_lse and not need_mask_grad:
        return _flash_backward(grad_out, q, k, v, key_padding_mask, attn_mask, out, lse, scale, causal) + (empty,) * 4

    if _gather_ok(q, dense, softcap, band, token_idx, block_idx) and not use_lse and not need_slopes_grad:
        gp = GatheredPlan(q, k, v, block_idx, token_idx, summary_idx, summary_k, summary_v, summary_count,
                          summary_pos, key_padding_mask, slopes, scale, causal, block_size,
                          None if window < 0 else window, None if band < 0 else band)
        dq, dk, dv, dsk, dsv = gathered_backward(gp, grad_out, out, lse)
        dsk = dsk.to(summary_k.dtype) if (dsk is not None and need_summary_grad) else empty
        dsv = dsv.to(summary_v.dtype) if (dsv is not None and need_summary_grad) else empty
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsk, dsv, empty, empty
    return reference_backward(grad_out, grad_lse, q, k, v, block_idx, token_idx, summary_idx, summary_k, summary_v,
                              summary_count, summary_pos, key_padding_mask, attn_mask, slopes, out, lse, scale, causal,
                              block_size, window, band, softcap, need_summary_grad, need_mask_grad, need_slopes_grad, use_lse)


def _flash_backward(grad_out, q, k, v, key_padding_mask, attn_mask, out, lse, scale, causal):
    mask = _additive_mask(q, k, key_padding_mask, attn_mask)
    # the flash kernel wrote lse = 0 for rows that see no key; their gradient is zero either way
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).to(torch.float32 if q.dtype != torch.float64 else q.dtype)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out.contiguous(), q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale)
    return dq, dk, dv
