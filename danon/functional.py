"""Functional API: each attention family as one call (q [B, H, N, D]; k, v [B, Hkv, N, D]).

Each function checks its arguments, builds the family's plan and runs the `danon::attention` op on it
(danon.core.run). Returns [B, H, N, Dv] in q's dtype. A family's parameters, their defaults and their
checks are its spec's (danon.core.families); each function's signature shows them.
"""
from __future__ import annotations

import inspect
from typing import Optional

from torch import Tensor

from danon import parallel
from danon.core import Plan, plan_coverage, run
from danon.core.families import FAMILIES, family

__all__ = ["check_family_options", "exact_attention", "ucsa_attention", "msra_attention", "dala_attention", "attention", "attention_plan",
           "plan_coverage", "KINDS"]

KINDS = tuple(FAMILIES)


def _with_parameters(kind: str):
    """Give a family's function the signature it accepts: its own keywords, then its spec's parameters."""
    def decorate(fn):
        own = [p for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD]
        spec = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
                for f in FAMILIES[kind].parameters()]
        fn.__signature__ = inspect.signature(fn).replace(parameters=own + spec)
        return fn
    return decorate


def check_family_options(kind: str, options: dict) -> None:
    """Raise the functional op's own error for a bad family keyword, without real inputs.

    Example:
        >>> check_family_options("msra", {"window": -1})
        Traceback (most recent call last):
        ...
        ValueError: window must be an integer >= 0, got -1
    """
    family(kind)(**options)


def attention_plan(q: Tensor, k: Tensor, v: Optional[Tensor] = None, *, kind: str = "exact", **family_keywords) -> Plan:
    """The plan a family would execute, for inspection (which keys each query block sees).

    Takes the same keywords as the family's function (attn_mask and softcap are accepted and ignored: they
    do not change which keys are seen; scale is too, except for UCSA with gamma, whose estimate of each
    block's attention mass uses it). `v` defaults to `k` (the plan's summary values are then means of k).

    Example:
        >>> import torch, danon
        >>> q = torch.randn(1, 2, 512, 16)
        >>> plan = danon.attention_plan(q, q, kind="msra", causal=True, block_size=16, window=32)
        >>> plan.kind, plan.window, plan.summary_idx.shape[:3]
        ('msra', 2, torch.Size([1, 2, 32]))
    """
    spec = family(kind)
    for name in ("scale", "attn_mask", "softcap"):   # they change the logits, not which keys are seen
        if name not in spec.inputs:
            family_keywords.pop(name, None)
    return run.plan(kind, q, k, k if v is None else v, **family_keywords)


@_with_parameters("exact")
def exact_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                    key_padding_mask: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
                    scale: Optional[float] = None, softcap: Optional[float] = None, **parameters) -> Tensor:
    """Exact softmax attention; equals F.scaled_dot_product_attention (GQA native, no repeated heads).

    attn_mask: bool (True = attend) or additive float, broadcastable to [B, H, Nq, Nk].
    softcap: logits become softcap * tanh(logits / softcap) before masking (Gemma-style).
    sliding_window: w such that query i sees key j only if |i - j| < w (and j <= i with causal), as
    Mistral's sliding window; runs banded in O(N w), not as an N x N mask. Not with attn_mask.
    Query row i sits at position Nk - Nq + i: causal masking is aligned bottom-right (queries after a
    cache), which equals SDPA's is_causal (top-left) when Nq == Nk. A query that sees no key returns 0.

    Example:
        >>> import torch, danon
        >>> q = torch.randn(2, 4, 100, 32); k = torch.randn(2, 2, 100, 32); v = torch.randn(2, 2, 100, 32)
        >>> danon.exact_attention(q, k, v, causal=True).shape
        torch.Size([2, 4, 100, 32])
    """
    return run.attention("exact", q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                         scale=scale, softcap=softcap, **parameters)


@_with_parameters("ucsa")
def ucsa_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                   key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None,
                   past_queries: Optional[Tensor] = None, **parameters) -> Tensor:
    """UCSA: near, global and top-k selected blocks exactly; every other visible block through its mean.

    past_queries: [B, H, P, D], the query rows before a causal call with Nq < Nk (queries after a cache):
    the selection of a query block reads the mean query of the block before it.

    Example:
        >>> import torch, danon
        >>> q = torch.randn(1, 4, 1024, 32); k = torch.randn(1, 2, 1024, 32)
        >>> full = danon.ucsa_attention(q, k, k, causal=True, local_window_size=128, top_k_blocks=2)
        >>> step = danon.ucsa_attention(q[:, :, -1:], k, k, causal=True, local_window_size=128, top_k_blocks=2,
        ...                             past_queries=q[:, :, :-1])
        >>> full.shape, bool(torch.allclose(step, full[:, :, -1:], atol=1e-5))
        (torch.Size([1, 4, 1024, 32]), True)
    """
    return run.attention("ucsa", q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                         past_queries=past_queries, **parameters)


@_with_parameters("msra")
def msra_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                   key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None, **parameters) -> Tensor:
    """MSRA: near blocks exactly, farther keys through summaries that coarsen by c per level.

    Example:
        >>> import torch, danon
        >>> q = torch.randn(1, 2, 2048, 32)
        >>> danon.msra_attention(q, q, q, causal=True, window=128, num_levels="auto").shape
        torch.Size([1, 2, 2048, 32])
    """
    return run.attention("msra", q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                         **parameters)


@_with_parameters("dala")
def dala_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                   key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None,
                   importance: Optional[Tensor] = None, slopes: Optional[Tensor] = None, **parameters) -> Tensor:
    """DALA: near blocks and the most important routed tokens exactly, the rest as one summary; ALiBi decay.

    importance: [B, Hkv, N] (default ||k_j||); slopes: [H] (default ALiBi's 2^(-8 (h+1) / H)).

    Example:
        >>> import torch, danon
        >>> q = torch.randn(1, 2, 1024, 32)
        >>> danon.dala_attention(q, q, q, causal=True, window=128, memory_size=32).shape
        torch.Size([1, 2, 1024, 32])
    """
    return run.attention("dala", q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                         importance=importance, slopes=slopes, **parameters)


_FUNCTIONS = {kind: globals()[f"{kind}_attention"] for kind in FAMILIES}


def attention(q: Tensor, k: Tensor, v: Tensor, kind: str = "exact", **family_keywords) -> Tensor:
    """Dispatch to one family by name: kind = "exact" | "ucsa" | "msra" | "dala".

    Example:
        >>> import torch, danon
        >>> q = torch.randn(1, 2, 256, 16)
        >>> danon.attention(q, q, q, kind="dala", block_size=16, window=32, memory_size=8).shape
        torch.Size([1, 2, 256, 16])
    """
    family(kind)
    cp = parallel.active()
    if cp is not None:   # inside `with danon.context_parallel(...)`: q, k, v hold this rank's tokens
        return cp.attention(q, k, v, kind, **family_keywords)
    return _FUNCTIONS[kind](q, k, v, **family_keywords)
