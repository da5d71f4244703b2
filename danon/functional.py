"""Functional API: each attention family as one call (q [B, H, N, D]; k, v [B, Hkv, N, D]).

Each function checks its arguments, builds the family's plan (danon.core) and runs the
`danon::attention` op on it. Returns [B, H, N, Dv] in q's dtype.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from danon.core import checks
from danon.core import Plan, dala_plan, exact_plan, msra_plan, plan_coverage, ucsa_plan
from danon.core.attention_op import run_plan
from danon.core.plan_op import build_plan

__all__ = ["check_family_options", "exact_attention", "ucsa_attention", "msra_attention", "dala_attention", "attention", "attention_plan",
           "plan_coverage", "KINDS"]

KINDS = ("exact", "ucsa", "msra", "dala")


def _exact_plan_checked(q, k, v, *, causal=False, key_padding_mask=None, block_size=64, sliding_window=None):
    checks.check_qkv(q, k, v, self_attention=False)
    checks.check_block_size(block_size)
    kpm = checks.check_key_padding_mask(key_padding_mask, q, k)
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                       or sliding_window < 1):
        raise ValueError(f"sliding_window must be an integer >= 1 or None, got {sliding_window!r}")
    return exact_plan(q, k, causal=checks.check_bool("causal", causal), key_padding_mask=kpm, block_size=block_size,
                      sliding_window=sliding_window)


def _ucsa_keywords(q, k, v, *, causal=False, key_padding_mask=None, block_size=64, local_window_size=512,
                   global_tokens=64, top_k_blocks=16, sparsity_factor=None, compress=True) -> dict:
    checks.check_qkv(q, k, v, self_attention=True)
    checks.check_block_size(block_size)
    for name, value in (("local_window_size", local_window_size), ("global_tokens", global_tokens),
                        ("top_k_blocks", top_k_blocks)):
        checks.check_nonneg_int(name, value)
    kpm = checks.check_key_padding_mask(key_padding_mask, q, k)
    return dict(causal=checks.check_bool("causal", causal), key_padding_mask=kpm, block_size=block_size,
                local_window_size=local_window_size, global_tokens=global_tokens, top_k_blocks=top_k_blocks,
                sparsity_factor=checks.check_sparsity_factor(sparsity_factor),
                compress=checks.check_bool("compress", compress))


def _msra_keywords(q, k, v, *, causal=False, key_padding_mask=None, block_size=64, window=256, num_levels=3,
                   compression_factor=4) -> dict:
    checks.check_qkv(q, k, v, self_attention=True)
    checks.check_block_size(block_size)
    checks.check_nonneg_int("window", window)
    kpm = checks.check_key_padding_mask(key_padding_mask, q, k)
    return dict(causal=checks.check_bool("causal", causal), key_padding_mask=kpm, block_size=block_size, window=window,
                num_levels=checks.check_num_levels(num_levels),
                compression_factor=checks.check_compression_factor(compression_factor))


def _dala_keywords(q, k, v, *, causal=False, key_padding_mask=None, block_size=64, window=256, memory_size=64,
                   importance=None, decay="alibi", slopes=None, compress_rest=True) -> dict:
    checks.check_qkv(q, k, v, self_attention=True)
    checks.check_block_size(block_size)
    checks.check_nonneg_int("window", window)
    checks.check_nonneg_int("memory_size", memory_size)
    checks.check_choice("decay", decay, ("alibi", "none"))
    kpm = checks.check_key_padding_mask(key_padding_mask, q, k)
    importance = checks.check_per_token("importance", importance, (k.shape[0], k.shape[1], k.shape[2]))
    slopes = checks.check_per_token("slopes", slopes, (q.shape[1],))
    checks.check_same_device(q, importance=importance, slopes=slopes)
    if slopes is not None and decay != "alibi":
        raise ValueError(f"slopes are the ALiBi decay's: pass them with decay='alibi', not decay={decay!r}")
    return dict(causal=checks.check_bool("causal", causal), key_padding_mask=kpm, block_size=block_size, window=window,
                memory_size=memory_size, importance=importance, decay=decay, slopes=slopes,
                compress_rest=checks.check_bool("compress_rest", compress_rest))


def _ucsa_plan_checked(q, k, v, **keywords):
    return ucsa_plan(q, k, v, **_ucsa_keywords(q, k, v, **keywords))


def _msra_plan_checked(q, k, v, **keywords):
    return msra_plan(q, k, v, **_msra_keywords(q, k, v, **keywords))


def _dala_plan_checked(q, k, v, **keywords):
    return dala_plan(q, k, v, **_dala_keywords(q, k, v, **keywords))


def _empty_output(q: Tensor, k: Tensor, v: Tensor) -> Optional[Tensor]:
    """Zeros for calls with nothing to compute (no query, no key or no batch), kept in the autograd graph."""
    if q.numel() and k.shape[2]:
        return None
    return q.new_zeros(*q.shape[:3], v.shape[3]) + 0 * (q.sum() + k.sum() + v.sum())


_PLANNERS = {"exact": _exact_plan_checked, "ucsa": _ucsa_plan_checked, "msra": _msra_plan_checked,
             "dala": _dala_plan_checked}


def check_family_options(kind: str, options: dict) -> None:
    """Raise the functional op's own error for a bad family keyword, without real inputs.

    Example:
        >>> check_family_options("msra", {"window": -1})
        Traceback (most recent call last):
        ...
        ValueError: window must be an integer >= 0, got -1
    """
    probe = torch.ones(1, 1, 16, 8)
    attention_plan(probe, probe, kind=kind, **options)


def attention_plan(q: Tensor, k: Tensor, v: Optional[Tensor] = None, *, kind: str = "exact", **family_keywords) -> Plan:
    """The plan a family would execute, for inspection (which keys each query block sees).

    Takes the same keywords as the family's function (scale, attn_mask and softcap are accepted and
    ignored: they do not change which keys are seen). `v` defaults
    to `k` (the plan's summary values are then means of k).

    Example:
        >>> import torch, danon
        >>> q = torch.randn(1, 2, 512, 16)
        >>> plan = danon.attention_plan(q, q, kind="msra", causal=True, block_size=16, window=32)
        >>> plan.kind, plan.window, plan.summary_idx.shape[:3]
        ('msra', 2, torch.Size([1, 2, 32]))
    """
    checks.check_choice("kind", kind, KINDS)
    for name in ("scale", "attn_mask", "softcap"):   # they change the logits, not which keys are seen
        family_keywords.pop(name, None)
    return _PLANNERS[kind](q, k, k if v is None else v, **family_keywords)


def exact_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                    key_padding_mask: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
                    scale: Optional[float] = None, softcap: Optional[float] = None,
                    sliding_window: Optional[int] = None, block_size: int = 64) -> Tensor:
    """Exact softmax attention; equals F.scaled_dot_product_attention (GQA native, no repeated heads).

    attn_mask: bool (True = attend) or additive float, broadcastable to [B, H, Nq, Nk].
    softcap: logits become softcap * tanh(logits / softcap) before masking (Gemma-style).
    sliding_window: w such that query i sees key j only if |i - j| < w (and j <= i with causal), as
    Mistral's sliding window; runs banded in O(N w), not as an N x N mask. Not with attn_mask.
    Causal masking is top-left aligned like SDPA's is_causal. A query that sees no key returns 0.

    Example:
        >>> import torch, danon
        >>> q = torch.randn(2, 4, 100, 32); k = torch.randn(2, 2, 100, 32); v = torch.randn(2, 2, 100, 32)
        >>> danon.exact_attention(q, k, v, causal=True).shape
        torch.Size([2, 4, 100, 32])
    """
    checks.check_qkv(q, k, v, self_attention=False)
    empty = _empty_output(q, k, v)
    if empty is not None:
        return empty
    plan = _exact_plan_checked(q, k, v, causal=causal, key_padding_mask=key_padding_mask, block_size=block_size,
                               sliding_window=sliding_window)
    attn_mask = checks.check_attn_mask(attn_mask, q, k)
    if attn_mask is not None and sliding_window is not None:
        raise ValueError("exact_attention takes attn_mask or sliding_window, not both: fold the window into the mask")
    return run_plan(q, k, v, plan, scale=checks.check_scale(scale, q.shape[-1]), key_padding_mask=key_padding_mask,
                    attn_mask=attn_mask, softcap=checks.check_softcap(softcap))


def ucsa_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                   key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None, block_size: int = 64,
                   local_window_size: int = 512, global_tokens: int = 64, top_k_blocks: int = 16,
                   sparsity_factor: Optional[float] = None, compress: bool = True) -> Tensor:
    """UCSA: near, global and top-k selected blocks exactly; every other visible block through its mean.

    Example:
        >>> import torch, danon
        >>> q = torch.randn(1, 4, 1024, 32); k = torch.randn(1, 2, 1024, 32)
        >>> danon.ucsa_attention(q, k, k, causal=True, local_window_size=128, top_k_blocks=2).shape
        torch.Size([1, 4, 1024, 32])
    """
    checks.check_qkv(q, k, v, self_attention=True)
    empty = _empty_output(q, k, v)
    if empty is not None:
        return empty
    keywords = _ucsa_keywords(q, k, v, causal=causal, key_padding_mask=key_padding_mask, block_size=block_size,
                              local_window_size=local_window_size, global_tokens=global_tokens,
                              top_k_blocks=top_k_blocks, sparsity_factor=sparsity_factor, compress=compress)
    plan = build_plan("ucsa", q, k, v, keywords)
    return run_plan(q, k, v, plan, scale=checks.check_scale(scale, q.shape[-1]), key_padding_mask=key_padding_mask)


def msra_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                   key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None, block_size: int = 64,
                   window: int = 256, num_levels: Union[int, str] = 3, compression_factor: int = 4) -> Tensor:
    """MSRA: near blocks exactly, farther keys through summaries that coarsen by c per level.

    Example:
        >>> import torch, danon
        >>> q = torch.randn(1, 2, 2048, 32)
        >>> danon.msra_attention(q, q, q, causal=True, window=128, num_levels="auto").shape
        torch.Size([1, 2, 2048, 32])
    """
    checks.check_qkv(q, k, v, self_attention=True)
    empty = _empty_output(q, k, v)
    if empty is not None:
        return empty
    keywords = _msra_keywords(q, k, v, causal=causal, key_padding_mask=key_padding_mask, block_size=block_size,
                              window=window, num_levels=num_levels, compression_factor=compression_factor)
    plan = build_plan("msra", q, k, v, keywords)
    return run_plan(q, k, v, plan, scale=checks.check_scale(scale, q.shape[-1]), key_padding_mask=key_padding_mask)


def dala_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                   key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None, block_size: int = 64,
                   window: int = 256, memory_size: int = 64, importance: Optional[Tensor] = None,
                   decay: str = "alibi", slopes: Optional[Tensor] = None, compress_rest: bool = True) -> Tensor:
    """DALA: near blocks and the most important routed tokens exactly, the rest as one summary; ALiBi decay.

    importance: [B, Hkv, N] (default ||k_j||); slopes: [H] (default ALiBi's 2^(-8 (h+1) / H)).

    Example:
        >>> import torch, danon
        >>> q = torch.randn(1, 2, 1024, 32)
        >>> danon.dala_attention(q, q, q, causal=True, window=128, memory_size=32).shape
        torch.Size([1, 2, 1024, 32])
    """
    checks.check_qkv(q, k, v, self_attention=True)
    empty = _empty_output(q, k, v)
    if empty is not None:
        return empty
    keywords = _dala_keywords(q, k, v, causal=causal, key_padding_mask=key_padding_mask, block_size=block_size,
                              window=window, memory_size=memory_size, importance=importance, decay=decay,
                              slopes=slopes, compress_rest=compress_rest)
    plan = build_plan("dala", q, k, v, keywords)
    return run_plan(q, k, v, plan, scale=checks.check_scale(scale, q.shape[-1]), key_padding_mask=key_padding_mask)


_FUNCTIONS = {"exact": exact_attention, "ucsa": ucsa_attention, "msra": msra_attention, "dala": dala_attention}


def attention(q: Tensor, k: Tensor, v: Tensor, kind: str = "exact", **family_keywords) -> Tensor:
    """Dispatch to one family by name: kind = "exact" | "ucsa" | "msra" | "dala".

    Example:
        >>> import torch, danon
        >>> q = torch.randn(1, 2, 256, 16)
        >>> danon.attention(q, q, q, kind="dala", block_size=16, window=32, memory_size=8).shape
        torch.Size([1, 2, 256, 16])
    """
    checks.check_choice("kind", kind, KINDS)
    return _FUNCTIONS[kind](q, k, v, **family_keywords)
