"""Argument checks shared by the functional API: each error names the argument and what is allowed."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q: Tensor, k: Tensor, v: Tensor, *, self_attention: bool) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, heads, N, head_dim], got shape {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must have dtype float16, bfloat16, float32 or float64, got {x.dtype}")
    check_same_device(q, k=k, v=v)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree in [B, Hkv, Nk], got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got q {q.shape[0]} and k {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head_dim, got q {q.shape[3]} and k {k.shape[3]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"the number of query heads H of q ({q.shape[1]}) must be a multiple of the number of "
                         f"kv heads Hkv of k and v ({k.shape[1]})")
    if self_attention and q.shape[2] != k.shape[2]:
        raise ValueError(f"sparse attention families need self-attention: q's sequence length ({q.shape[2]}) must "
                         f"equal k's ({k.shape[2]}); use kind='exact' for cross-attention")


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_same_device(reference: Tensor, **tensors) -> None:
    for name, x in tensors.items():
        if x is not None and x.device != reference.device:
            raise ValueError(f"{name} is on {x.device} but q is on {reference.device}; put them on one device")


def check_key_padding_mask(mask: Optional[Tensor], q: Tensor, k: Tensor) -> Optional[Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"key_padding_mask must be a bool tensor [B, Nk], got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"key_padding_mask must have dtype torch.bool (True = attend), got {mask.dtype}")
    check_same_device(q, key_padding_mask=mask)
    if tuple(mask.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(f"key_padding_mask must have shape [B, Nk] = {[k.shape[0], k.shape[2]]}, "
                         f"got {list(mask.shape)}")
    return mask


def check_attn_mask(mask: Optional[Tensor], q: Tensor, k: Tensor) -> Optional[Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"attn_mask must be a tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"attn_mask must be bool (True = attend) or floating point (additive), got {mask.dtype}")
    check_same_device(q, attn_mask=mask)
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    try:
        torch.broadcast_shapes(tuple(mask.shape), target)
        if mask.dim() > 4:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"attn_mask of shape {list(mask.shape)} is not broadcastable to [B, H, Nq, Nk] = "
                         f"{list(target)}") from None
    return mask


def check_scale(scale, head_dim: int) -> float:
    if isinstance(scale, torch.SymFloat):   # a symbolic float under dynamic=True: checked when it is bound
        return scale
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(float(scale)):
        raise ValueError(f"scale must be a finite number or None (1/sqrt(head_dim)), got {scale!r}")
    return float(scale)


def check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 or \
            block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
    return block_size


def check_nonneg_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")


def check_num_levels(num_levels):
    if num_levels == "auto":
        return num_levels
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 1:
        raise ValueError(f"num_levels must be an integer >= 1 or 'auto', got {num_levels!r}")
    return num_levels


def check_compression_factor(factor) -> int:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
        raise ValueError(f"compression_factor must be an integer >= 2, got {factor!r}")
    return factor


def check_sparsity_factor(factor) -> Optional[float]:
    if factor is None:
        return None
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not 0 < float(factor) <= 1:
        raise ValueError(f"sparsity_factor must be a fraction in (0, 1] of the key blocks, or None; got {factor!r}")
    return float(factor)


def check_per_token(name: str, x: Optional[Tensor], shape) -> Optional[Tensor]:
    if x is None:
        return None
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor of shape {list(shape)}, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    return x



def check_softcap(softcap) -> Optional[float]:
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not float(softcap) > 0:
        raise ValueError(f"softcap must be a number > 0 or None, got {softcap!r}")
    return float(softcap)
