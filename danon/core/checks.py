"""Argument checks shared by the functional API, the family specs and the configs: each error names the argument
and what is allowed."""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Optional

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q: Tensor, k: Tensor, v: Tensor, *, sparse: bool, causal: bool = False) -> None:
    """Shapes, dtypes and devices of q [B, H, Nq, D], k, v [B, Hkv, Nk, D]. A sparse family's plan is laid out
    by position: it takes self-attention (Nq = Nk), or, under causal masking, queries after a cache (Nq < Nk:
    row i is position Nk - Nq + i)."""
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
    if sparse and q.shape[2] != k.shape[2] and not (causal and q.shape[2] < k.shape[2]):
        raise ValueError(f"sparse attention families need self-attention, or causal queries after a cache: q's "
                         f"sequence length ({q.shape[2]}) must equal k's ({k.shape[2]}), or be shorter with causal=True "
                         f"(got causal={causal}); use kind='exact' for cross-attention")


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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Rule:
    """What one keyword accepts, written once: the test, the value's normal form, and the words of its error.

    Two wordings, because both are already relied on: the functional API's (`check`: "window must be an
    integer >= 0, got -1", TypeError where the type is wrong) and the configs' and modules'
    (`config_message`: "MSRAConfig.window must be an int >= 0, got -1", always a ValueError).

    Example:
        >>> NONNEG_INT.check("window", -1)
        Traceback (most recent call last):
        ...
        ValueError: window must be an integer >= 0, got -1
        >>> NONNEG_INT.config_message("MSRAConfig.window", -1)
        'MSRAConfig.window must be an int >= 0, got -1'
    """

    accepts: Callable[[Any], bool]
    allowed: str
    config_allowed: str
    error: type = ValueError
    separator: str = ","          # the functional messages of a choice or a fraction read "...; got x"
    normal: Optional[Callable[[Any], Any]] = None

    def check(self, name: str, value):
        """`value` in its normal form, or the functional API's error naming `name`."""
        if not self.accepts(value):
            raise self.error(f"{name} must be {self.allowed}{self.separator} got {value!r}")
        return value if self.normal is None else self.normal(value)

    def config_message(self, subject: str, value) -> Optional[str]:
        """None when `value` is allowed, else the configs' message about `subject` (e.g. "MSRAConfig.window")."""
        return None if self.accepts(value) else f"{subject} must be {self.config_allowed}, got {value!r}"


def _one_of(allowed) -> str:
    return f"one of {', '.join(repr(a) for a in allowed)}"


def one_of(allowed: tuple) -> Rule:
    """The rule of a keyword that takes one of a few values (DALA's decay)."""
    quoted = ", ".join('"%s"' % a for a in allowed)     # the configs quote the choices as Python source
    return Rule(lambda value: value in allowed, _one_of(allowed), f"one of {quoted}", separator=";")


BOOL = Rule(lambda value: isinstance(value, bool), "True or False", "True or False", error=TypeError)
BLOCK_SIZE = Rule(lambda value: _is_int(value) and value >= 16 and not value & (value - 1),
                  "a power of two >= 16", "a power of two >= 16 (16, 32, 64, 128, ...)")
NONNEG_INT = Rule(lambda value: _is_int(value) and value >= 0, "an integer >= 0", "an int >= 0")
NUM_LEVELS = Rule(lambda value: (isinstance(value, str) and value == "auto") or (_is_int(value) and value >= 1),
                  "an integer >= 1 or 'auto'", 'an int >= 1 or "auto"')
COMPRESSION_FACTOR = Rule(lambda value: _is_int(value) and value >= 2, "an integer >= 2", "an int >= 2")
# float(): a module's float attribute may arrive as another Real (or, traced with dynamic=True, a SymFloat)
SPARSITY_FACTOR = Rule(lambda value: value is None or (_is_real(value) and 0 < float(value) <= 1),
                       "a fraction in (0, 1] of the key blocks, or None",
                       "None or a fraction of the key blocks in (0, 1]", separator=";",
                       normal=lambda value: None if value is None else float(value))
GAMMA = Rule(lambda value: value is None or (_is_real(value) and 0 < float(value) <= 1),
             "a share in (0, 1] of the estimated attention mass, or None",
             "None or a share of the estimated attention mass in (0, 1]", separator=";",
             normal=lambda value: None if value is None else float(value))
SLIDING_WINDOW = Rule(lambda value: value is None or (_is_int(value) and value >= 1), "an integer >= 1 or None",
                      "an int >= 1 or None")


def check_bool(name: str, value) -> bool:
    return BOOL.check(name, value)


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:      # `allowed` may be a dict: its keys are the choices
        raise ValueError(f"{name} must be {_one_of(allowed)}; got {value!r}")


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
