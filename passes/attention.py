"""The attention pass: find each attention site in a Dynamo FX graph and replace it with danon's.

GraphModule in, GraphModule out, plus one report row per site. A site is replaced only when the
replacement is provably the same function (or the user asked for a sparse family and the site
qualifies); every site kept says why.

Recognised today: calls of `F.scaled_dot_product_attention` (masks: none, causal, and any other
bool or float mask as a general mask for the exact family). Hand-written matmul-softmax-matmul
chains, `nn.MultiheadAttention` and mask provenance (key padding, sliding window) are the next
steps of this pass.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from danon.compile_config import DanonConfig
from danon.functional import attention_plan
from danon.report import SiteReport
from danon.sites import attention_site

SDPA_TARGETS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
SPARSE = ("ucsa", "msra", "dala")


def _hint(x) -> int:
    """A concrete value for reports; symbolic sizes give their hint, never a guard."""
    if isinstance(x, torch.SymInt):
        return x.node.hint if x.node.hint is not None else -1
    return int(x)


def _value(node) -> Optional[torch.Tensor]:
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def _location(node: fx.Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")]
    if not lines:
        return node.name
    last = lines[-1]          # File "path", line N, in fn
    try:
        path = last.split('"')[1]
        line = last.split("line ")[1].split(",")[0]
        return f"{path.rsplit('/', 1)[-1]}:{line}"
    except IndexError:
        return last


def _sdpa_arguments(node: fx.Node) -> dict:
    args = dict(SDPA_DEFAULTS)
    args.update(zip(SDPA_PARAMS, node.args))
    args.update(node.kwargs)
    return args


def _decide(args: dict, config: DanonConfig):
    """(family or None, mask class, reason) for one SDPA site."""
    q, k, v, mask = (_value(args[n]) for n in ("query", "key", "value", "attn_mask"))
    if isinstance(args["is_causal"], fx.Node) or not isinstance(args["is_causal"], bool):
        return None, "unknown", "is_causal is computed at run time"
    mask_class = "causal" if args["is_causal"] else "none"
    if args["attn_mask"] is not None:
        if mask is None:
            return None, "unknown", "attn_mask has no traced value"
        if mask.dtype != torch.bool and not mask.is_floating_point():
            return None, "general", f"a mask of dtype {mask.dtype} (integer masks are not attention masks)"
        if args["is_causal"]:
            return None, "general", "attn_mask together with is_causal (SDPA itself rejects it)"
        mask_class = "general"
    if config.attention == "keep":
        return None, mask_class, "attention='keep'"
    dropout = args["dropout_p"]
    if isinstance(dropout, fx.Node) or not isinstance(dropout, numbers.Real):
        return None, mask_class, "dropout_p is computed at run time"
    if dropout > 0:
        return None, mask_class, f"dropout inside attention (p={dropout}) is not part of the op yet"
    if args["scale"] is not None and (isinstance(args["scale"], fx.Node) or not isinstance(args["scale"], numbers.Real)):
        return None, mask_class, "scale is a tensor"
    if any(x is None for x in (q, k, v)) or any(x.dim() != 4 for x in (q, k, v)):
        return None, mask_class, "q, k, v are not all 4-D [B, H, N, D] tensors"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return None, mask_class, f"dtype {q.dtype} is not supported"
    H, Hkv = _hint(q.shape[1]), _hint(k.shape[1])
    if H != Hkv and (not args["enable_gqa"] or H % Hkv):
        return None, mask_class, f"{H} query heads and {Hkv} kv heads without enable_gqa"
    if config.attention in SPARSE:
        if mask_class not in ("none", "causal"):
            return "exact", mask_class, f"{config.attention} needs no mask or a causal one; runs exact"
        if _hint(q.shape[2]) != _hint(k.shape[2]):
            return "exact", mask_class, f"{config.attention} needs self-attention (Nq = Nk); runs exact"
        if _hint(k.shape[2]) < config.min_seq_len:
            return config.attention, mask_class, f"key length {_hint(k.shape[2])} < min_seq_len: runs exact"
        return config.attention, mask_class, None
    return "exact", mask_class, None


def _cost(args: dict, family: Optional[str], mask_class: str, config: DanonConfig):
    """(keys per query, FLOPs before, FLOPs after) from the traced shapes."""
    q, k = _value(args["query"]), _value(args["key"])
    if q is None or k is None or q.dim() != 4:
        return None, None, None
    B, H, nq, D = (_hint(s) for s in q.shape)
    nk = _hint(k.shape[2])
    causal = mask_class == "causal"
    dense_keys = nk / 2 if causal else nk
    before = 4.0 * B * H * nq * dense_keys * D
    if family in SPARSE and nk >= config.min_seq_len:
        meta_q = torch.empty(B, H, nq, D, device="meta")
        meta_k = torch.empty(B, _hint(k.shape[1]), nk, D, device="meta")
        try:
            keys = float(attention_plan(meta_q, meta_k, kind=family, causal=causal,
                                        **config.family_options).keys_per_query())
        except Exception:   # a plan that cannot be built on meta tensors: no estimate rather than a wrong one
            return None, before, None
        return keys, before, 4.0 * B * H * nq * min(keys, nk) * D
    return dense_keys, before, before


def rewrite_attention(gm: fx.GraphModule, config: DanonConfig):
    """Replace every attention site that qualifies; returns (gm, [SiteReport, ...]).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from danon.compile_config import DanonConfig
from danon.functional import attention_plan
        >>> class Attn(torch.nn.Module):
        ...     def forward(self, q, k, v):
        ...         return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        >>> sites = []
        >>> def backend(gm, inputs):
        ...     gm, rows = rewrite_attention(gm, DanonConfig())
        ...     sites.extend(rows)
        ...     return gm.forward
        >>> q = torch.randn(1, 2, 64, 8)
        >>> _ = torch.compile(Attn(), backend=backend)(q, q, q)
        >>> sites[0].replaced, sites[0].mask, sites[0].family
        (True, 'causal', 'exact')
    """
    rows = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            continue
        args = _sdpa_arguments(node)
        family, mask_class, reason = _decide(args, config)
        q, k = _value(args["query"]), _value(args["key"])
        keys, before, after = _cost(args, family, mask_class, config)
        rows.append(SiteReport(
            location=_location(node), source="sdpa", mask=mask_class, family=family, replaced=family is not None,
            reason=reason, q_shape=tuple(_hint(s) for s in q.shape) if q is not None else (),
            k_shape=tuple(_hint(s) for s in k.shape) if k is not None else (),
            dtype=str(q.dtype).replace("torch.", "") if q is not None else "", keys_per_query=keys,
            flops_before=before, flops_after=after if family is not None else before))
        if family is None:
            continue
        kwargs = {"family": family, "causal": mask_class == "causal", "attn_mask": args["attn_mask"],
                  "scale": None if args["scale"] is None else float(args["scale"]),
                  "min_seq_len": config.min_seq_len}
        if family in SPARSE:
            kwargs.update(config.family_options)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(attention_site, (args["query"], args["key"], args["value"]), kwargs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm, rows


__all__ = ["rewrite_attention", "SDPA_TARGETS"]
