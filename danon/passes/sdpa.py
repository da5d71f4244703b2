"""Recognise calls of F.scaled_dot_product_attention in a Dynamo FX graph as attention sites."""
from __future__ import annotations

import numbers
from typing import List

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from danon.core import torch_internals

from .site import Site

SDPA_TARGETS = set(torch_internals.SDPA_TARGETS)
SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _value(node):
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def _hint(x) -> int:
    if isinstance(x, torch.SymInt):
        return x.node.hint if x.node.hint is not None else -1
    return int(x)


def find_sdpa_sites(gm: fx.GraphModule) -> List[Site]:
    """One Site per SDPA call; `kept` says why a call cannot be replaced.

    The mask is left as a general mask here; `passes.masks` classifies it afterwards.
    """
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            continue
        args = dict(SDPA_DEFAULTS)
        args.update(zip(SDPA_PARAMS, node.args))
        args.update(node.kwargs)
        # an SDPA call that danon/passes/modules.py expanded from a module call reports as "module"
        site = Site(node=node, source=node.meta.get("danon_source", "sdpa"), q=args["query"], k=args["key"],
                    v=args["value"])
        site.kept = _read_options(site, args)
        sites.append(site)
    return sites


def _same_length(site: Site) -> bool:
    """Whether q and k have one sequence length for every size this graph runs at (not only the traced one)."""
    q, k = site.value("q"), site.value("k")
    if q is None or k is None or q.dim() != 4 or k.dim() != 4:
        return True     # decided elsewhere: such a site is kept for its shapes
    return statically_known_true(q.shape[2] == k.shape[2])


def _read_options(site: Site, args: dict):
    """Fill causal / mask / scale from the call; return why the site must be kept, or None."""
    if isinstance(args["is_causal"], fx.Node) or not isinstance(args["is_causal"], bool):
        return "is_causal is computed at run time"
    site.causal = args["is_causal"]
    site.mask_class = "causal" if site.causal else "none"
    if site.causal and not _same_length(site):
        # SDPA aligns is_causal top-left, the op bottom-right: the same mask only when Nq = Nk
        return "is_causal with Nq != Nk (SDPA aligns it top-left, danon's op bottom-right)"
    if args["attn_mask"] is not None:
        mask = _value(args["attn_mask"])
        site.mask = args["attn_mask"]
        site.mask_class = "general"
        if mask is None:
            return "attn_mask has no traced value"
        if mask.dtype != torch.bool and not mask.is_floating_point():
            return f"a mask of dtype {mask.dtype} (integer masks are not attention masks)"
        if site.causal:
            return "attn_mask together with is_causal (SDPA itself rejects it)"
    dropout = args["dropout_p"]
    if isinstance(dropout, fx.Node) or not isinstance(dropout, numbers.Real):
        return "dropout_p is computed at run time"
    if dropout > 0:
        return f"dropout inside attention (p={dropout}) is not part of the op yet"
    scale = args["scale"]
    if scale is not None:
        if isinstance(scale, fx.Node) and isinstance(_value(scale), torch.SymFloat):
            site.scale = scale          # a float attribute Dynamo made symbolic (dynamic=True): passed on as is
        elif isinstance(scale, fx.Node) or not isinstance(scale, numbers.Real):
            return "scale is a tensor"
        else:
            site.scale = float(scale)
    q, k = _value(site.q), _value(site.k)
    if q is not None and k is not None and q.dim() == 4 and k.dim() == 4:
        H, Hkv = _hint(q.shape[1]), _hint(k.shape[1])
        if H != Hkv and (not args["enable_gqa"] or H % Hkv):
            return f"{H} query heads and {Hkv} kv heads without enable_gqa"
    return None
