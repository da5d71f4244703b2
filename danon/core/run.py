"""Run one attention family: check the arguments, build the plan, run the `danon::attention` op on it.

The floor's entry points, for the functional API (danon.functional wraps them with each family's own
signature) and for the graph passes: `attention_site` is what a rewritten attention site calls
(danon/passes/attention.py inserts it), `plan` what the pass estimates a site's cost with.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import checks, plan_op
from .attention_op import run_plan
from .families import family
from .plan import Plan

__all__ = ["attention", "plan", "attention_site", "split_keywords"]


def _empty_output(q: Tensor, k: Tensor, v: Tensor) -> Optional[Tensor]:
    """Zeros for calls with nothing to compute (no query, no key or no batch), kept in the autograd graph."""
    if q.numel() and k.shape[2]:
        return None
    return q.new_zeros(*q.shape[:3], v.shape[3]) + 0 * (q.sum() + k.sum() + v.sum())


def split_keywords(spec, keywords: dict):
    """(the spec built from the family's parameters in `keywords`, the rest: per-call inputs); an unknown keyword
    is a TypeError naming the family's parameters and inputs.

    Example:
        >>> from danon.core.families import family
        >>> params, inputs = split_keywords(family("dala"), {"window": 64, "importance": None})
        >>> params.window, inputs
        (64, {'importance': None})
    """
    keywords = dict(keywords)
    params = {name: keywords.pop(name) for name in spec.names() if name in keywords}
    for name in keywords:
        if name not in spec.inputs:
            raise TypeError(f"{spec.name} attention got an unexpected keyword argument {name!r}; its parameters are "
                            f"{', '.join(spec.names() + spec.inputs)}")
    return spec(**params), keywords


def plan(kind: str, q: Tensor, k: Tensor, v: Optional[Tensor] = None, *, causal: bool = False,
         key_padding_mask: Optional[Tensor] = None, **keywords) -> Plan:
    """The plan family `kind` would execute, built by its builder's ops; `v` defaults to `k`.

    Example:
        >>> q = torch.randn(1, 2, 512, 16)
        >>> plan("msra", q, q, causal=True, block_size=16, window=32).window
        2
    """
    params, inputs = split_keywords(family(kind), keywords)
    built = params.plan(q, k, k if v is None else v, causal=causal, key_padding_mask=key_padding_mask, **inputs)
    _observe(built, q)
    return built


def _observe(built: Plan, q: Tensor) -> None:
    """Tell plan_op.observers of a plan built outside danon::plan on real tensors (never while Dynamo traces)."""
    if not torch.compiler.is_compiling() and q.device.type != "meta":
        for observe in plan_op.observers:
            observe(built)


def attention(kind: str, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
              key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None,
              attn_mask: Optional[Tensor] = None, softcap: Optional[float] = None, **keywords) -> Tensor:
    """Family `kind` on q [B, H, Nq, D], k, v [B, Hkv, Nk, D]; keywords: its parameters and per-call inputs.

    Query row i is position Nk - Nq + i: causal masking is aligned bottom-right, so queries after a cache
    (Nq < Nk) see what the same rows of one full-sequence call see, in every family.

    attn_mask and softcap are the exact family's only: they change logits no sparse plan describes.

    Example:
        >>> q = torch.randn(1, 2, 256, 16)
        >>> attention("dala", q, q, q, causal=True, block_size=16, window=32, memory_size=8).shape
        torch.Size([1, 2, 256, 16])
    """
    spec = family(kind)
    causal = checks.check_bool("causal", causal)
    checks.check_qkv(q, k, v, sparse=spec.sparse, causal=causal)
    empty = _empty_output(q, k, v)
    if empty is not None:
        return empty
    params, inputs = split_keywords(spec, keywords)
    if spec.sparse:
        if attn_mask is not None or softcap is not None:
            raise TypeError(f"attn_mask and softcap are keywords of kind='exact' only, not of kind={kind!r}")
        if "scale" in spec.inputs:          # UCSA's gamma estimate uses the attention's logit scale
            inputs["scale"] = scale
        # through danon::plan: one opaque op for Inductor instead of the builder's index arithmetic
        built = plan_op.build_plan(kind, q, k, v, params.options(q, k, v, causal=causal,
                                                                key_padding_mask=key_padding_mask, **inputs))
        return run_plan(q, k, v, built, scale=checks.check_scale(scale, q.shape[-1]),
                        key_padding_mask=key_padding_mask)
    built = params.plan(q, k, v, causal=causal, key_padding_mask=key_padding_mask, **inputs)
    _observe(built, q)   # the exact plan is built outside danon::plan: tell the same observers of run-time plans
    attn_mask = checks.check_attn_mask(attn_mask, q, k)
    if attn_mask is not None and params.sliding_window is not None:
        raise ValueError("exact_attention takes attn_mask or sliding_window, not both: fold the window into the mask")
    return run_plan(q, k, v, built, scale=checks.check_scale(scale, q.shape[-1]), key_padding_mask=key_padding_mask,
                    attn_mask=attn_mask, softcap=checks.check_softcap(softcap))


def attention_site(q: Tensor, k: Tensor, v: Tensor, *, family: str, causal: bool = False,
                   attn_mask: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
                   sliding_window: Optional[int] = None, scale: Optional[float] = None, softcap: Optional[float] = None,
                   min_seq_len: int = 0, **family_options) -> Tensor:
    """Run one attention site as `family`, or exactly when its key length is below `min_seq_len`.

    What a rewritten site calls (danon/passes/attention.py); it runs when the graph is traced for lowering, so
    the family choice by sequence length is made on the traced shapes (and guarded on when they are
    symbolic). sliding_window: w such that query i sees keys i - w < j <= i (with causal): the banded exact
    plan, O(N w); folded into the mask when a general mask is present too. Family keywords such as MSRA's
    `window` pass through `family_options`.

    Example:
        >>> q = torch.randn(1, 2, 64, 8)
        >>> attention_site(q, q, q, family="msra", causal=True, min_seq_len=4096).shape   # short: exact
        torch.Size([1, 2, 64, 8])
    """
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(torch.bool)
    if family != "exact" and k.shape[2] >= min_seq_len:
        return attention(family, q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                         **family_options)
    if sliding_window is not None and attn_mask is None:
        return attention("exact", q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                         softcap=softcap, sliding_window=sliding_window)
    if sliding_window is not None:
        i = torch.arange(q.shape[2], device=q.device)[:, None]
        j = torch.arange(k.shape[2], device=q.device)[None, :]
        band = (i - j < sliding_window) & (j <= i) if causal else (i - j).abs() < sliding_window
        attn_mask = band if attn_mask is None else (attn_mask & band if attn_mask.dtype == torch.bool
                                                   else attn_mask.masked_fill(~band, float("-inf")))
        causal = False
    return attention("exact", q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                     scale=scale, softcap=softcap)
