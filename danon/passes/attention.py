"""The attention pass: find each attention site in a Dynamo FX graph and replace it with danon's.

GraphModule in, GraphModule out, plus one report row per site. Recognisers (danon/passes/sdpa.py, and
the next ones: hand-written chains, module calls) turn graph patterns into `Site`s; mask
classification (danon/passes/masks.py, when present) says what each mask is; this driver decides the
family and replaces the site's output with a call of `danon.core.run.attention_site`. A site is
replaced only when the replacement is the same function (or the user asked for a sparse family
and the site qualifies); every site kept says why.
"""
from __future__ import annotations

import operator
from typing import Callable, List, Optional, Tuple

import torch
import torch.fx as fx

from danon.core.families import FAMILIES, substitution_options
from danon.core.plan import keys_per_query
from danon.core.run import attention_site, plan

from .options import DanonConfig

# Hand-written recognisers rather than Inductor's pattern matcher: its patterns (fuse_attention.py) fire
# on ATen graphs inside Inductor only, while the report, the eager target and the ONNX/TensorRT lowerings
# need the rewrite on Dynamo's torch-level graph, with source lines, masks' provenance and module names.
from .inputs import normalize_kv
from .weight_quantization import module_name
from .manual import find_manual_sites
from .masks import classify_mask
from .modules import expand_module_calls
from .report import SiteReport
from .sdpa import find_sdpa_sites
from .site import Site

SPARSE = tuple(name for name, spec in FAMILIES.items() if spec.sparse)
SPARSE_MASKS = ("none", "causal", "key_padding", "causal+key_padding")


def _hint(x) -> int:
    """A concrete value for reports; symbolic sizes give their hint, never a guard."""
    if isinstance(x, torch.SymInt):
        return x.node.hint if x.node.hint is not None else -1
    return int(x)


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


def find_sites(gm: fx.GraphModule) -> List[Site]:
    """Every attention site the recognisers find, with k/v normalised and masks classified."""
    kept_modules = expand_module_calls(gm)          # module calls become projections + SDPA
    sites = find_sdpa_sites(gm) + find_manual_sites(gm)
    for site in sites:
        if site.kept is None:
            normalize_kv(gm, site)
            classify_mask(gm, site)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    return sorted(sites + kept_modules, key=lambda s: order.get(s.node, -1))


def _causal(site: Site) -> bool:
    """The site's causal masking, aligned bottom-right like the op's. One query row (a decode step: transformers
    passes no causal flag and no mask) sees every key either way, so it counts as causal."""
    q = site.value("q")
    return site.causal or (q is not None and q.dim() == 4 and isinstance(q.shape[2], int) and q.shape[2] == 1)


def site_names(sites: List[Site]) -> List[str]:
    """Each site's name: the qualified name of the module it runs in (as in `model.named_modules()`), "#2", "#3",
    ... for a module's later sites; "site<i>" where Dynamo recorded no module. The `sites` option's keys.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> class Attn(torch.nn.Module):
        ...     def forward(self, q):
        ...         return F.scaled_dot_product_attention(q, q, q) + F.scaled_dot_product_attention(q, q, q)
        >>> class Model(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.attn = Attn()
        ...     def forward(self, q):
        ...         return self.attn(q)
        >>> names = []
        >>> def backend(gm, inputs):
        ...     names.extend(site_names(find_sites(gm)))
        ...     return gm.forward
        >>> _ = torch.compile(Model(), backend=backend)(torch.randn(1, 2, 8, 4))
        >>> names
        ['attn', 'attn#2']
    """
    names, seen = [], {}
    for i, site in enumerate(sites):
        stack = site.node.meta.get("nn_module_stack") or {}
        base = (module_name(list(stack.values())[-1][0]) if stack else "") or f"site{i}"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return names


def approximation(family: Optional[str], options: dict) -> str:
    """What `family` with `options` computes in place of a site's exact attention, in words (the report's).

    Example:
        >>> approximation("dala", {"window": 64, "memory_size": 32, "decay": "none"})
        'near 64 tokens and 32 routed tokens exact; the rest as one mean; no positional bias added'
        >>> approximation("exact", {})
        'exact'
    """
    if family is None:
        return ""
    if family not in SPARSE:
        return "exact"
    spec = FAMILIES[family](**options)
    if family == "ucsa":
        chosen = (f"blocks up to {spec.gamma:g} of the estimated attention mass (at most {spec.top_k_blocks})"
                  if spec.gamma is not None else
                  f"the best {spec.sparsity_factor:g} of the blocks" if spec.sparsity_factor is not None else
                  f"the top {spec.top_k_blocks} blocks")
        rest = "other blocks as their means" if spec.compress else "other blocks left out"
        return (f"near {spec.local_window_size} tokens, the first {spec.global_tokens} and {chosen} exact "
                f"({spec.block_size}-token blocks); {rest}")
    if family == "msra":
        return (f"near {spec.window} tokens exact; farther keys as means of spans of {spec.block_size} x "
                f"{spec.compression_factor}^l tokens ({spec.num_levels} levels)")
    rest = "; the rest as one mean" if spec.compress_rest else "; the rest left out"
    bias = "; adds ALiBi decay, a bias the model may not have" if spec.decay == "alibi" else "; no positional bias added"
    return f"near {spec.window} tokens and {spec.memory_size} routed tokens exact{rest}{bias}"


def decide(site: Site, config: DanonConfig, attention: Optional[str] = None) -> Tuple[Optional[str], Optional[str]]:
    """(family or None when kept, reason) for one site; `attention` overrides config.attention (a site's choice)."""
    attention = config.attention if attention is None else attention
    if site.kept:
        return None, site.kept
    if attention == "keep":
        return None, "attention='keep'"
    q, k, v = site.value("q"), site.value("k"), site.value("v")
    if any(x is None for x in (q, k, v)) or any(x.dim() != 4 for x in (q, k, v)):
        return None, "q, k, v are not all 4-D [B, H, N, D] tensors"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return None, f"dtype {q.dtype} is not supported"
    if attention in SPARSE:
        if site.mask_class not in SPARSE_MASKS or site.mask is not None or site.softcap is not None:
            return "exact", f"{attention} applies to no / causal / key-padding masks without softcap; runs exact"
        if _hint(q.shape[2]) != _hint(k.shape[2]) and not (_causal(site) and _hint(q.shape[2]) < _hint(k.shape[2])):
            return "exact", (f"{attention} needs self-attention (Nq = Nk) or causal queries after a cache "
                             f"(Nq < Nk); runs exact")
        if _hint(k.shape[2]) < config.min_seq_len:
            return attention, f"key length {_hint(k.shape[2])} < min_seq_len: runs exact"
        return attention, None
    return "exact", None


def _cost(site: Site, family: Optional[str], options: dict, config: DanonConfig):
    """(keys per query, FLOPs before, FLOPs after) from the traced shapes."""
    q, k = site.value("q"), site.value("k")
    if q is None or k is None or q.dim() != 4:
        return None, None, None
    B, H, nq, D = (_hint(s) for s in q.shape)
    nk = _hint(k.shape[2])
    dense_keys = keys_per_query(nk, causal=site.causal, block_size=1, window=-1, band=-1, blocks=None, tokens=None,
                                summaries=None)   # the dense plan's
    before = 4.0 * B * H * nq * dense_keys * D
    if family in SPARSE and nk >= config.min_seq_len:
        meta_q = torch.empty(B, H, nq, D, device="meta")
        meta_k = torch.empty(B, _hint(k.shape[1]), nk, D, device="meta")
        try:
            keys = float(plan(family, meta_q, meta_k, causal=site.causal, **options).keys_per_query())
        except Exception:   # a plan that cannot be built on meta tensors: no estimate rather than a wrong one
            return None, before, None
        return keys, before, 4.0 * B * H * nq * min(keys, nk) * D
    return dense_keys, before, before


def _report_row(site: Site, name: str, family, reason, options: dict, error, config) -> SiteReport:
    q, k = site.value("q"), site.value("k")
    keys, before, after = _cost(site, family, options, config)
    runs_sparse = family in SPARSE and reason is None
    return SiteReport(
        location=_location(site.node), source=site.source, mask=site.mask_class, family=family,
        replaced=family is not None, reason=reason,
        q_shape=tuple(_hint(s) for s in q.shape) if q is not None else (),
        k_shape=tuple(_hint(s) for s in k.shape) if k is not None else (),
        dtype=str(q.dtype).replace("torch.", "") if q is not None else "", keys_per_query=keys,
        flops_before=before, flops_after=after if family is not None else before, name=name,
        options=options if runs_sparse else {}, approximates=approximation(family, options) if runs_sparse else
        ("exact" if family is not None else ""), error=error)


def _replace(gm: fx.GraphModule, site: Site, family: str, options: dict, config: DanonConfig,
             site_function: Callable = attention_site, site_name: Optional[str] = None) -> None:
    kwargs = {"family": family, "causal": _causal(site), "attn_mask": site.mask, "scale": site.scale,
              "min_seq_len": config.min_seq_len}
    if site.key_padding is not None:
        kwargs["key_padding_mask"] = site.key_padding
    if site.window is not None:
        kwargs["sliding_window"] = site.window
    if site.softcap is not None:
        kwargs["softcap"] = site.softcap
    kwargs.update(options)
    if site_name is not None:
        kwargs["site_name"] = site_name
    with gm.graph.inserting_before(site.node):
        new = gm.graph.call_function(site_function, (site.q, site.k, site.v), kwargs)
    new.meta = dict(site.node.meta)
    site.node.replace_all_uses_with(new)


_IN_PLACE_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                       operator.iand, operator.ior, operator.ixor}


def _is_impure(node: fx.Node) -> bool:
    """FX takes call_method nodes for pure; an in-place one (mask.fill_(...), x += y) must survive dead-code elimination."""
    in_place = (node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_")
                and not node.target.startswith("__")) or \
        (node.op == "call_function" and node.target in _IN_PLACE_FUNCTIONS)
    return node.is_impure() or in_place


def rewrite_attention(gm: fx.GraphModule, config: DanonConfig, site_function: Optional[Callable] = None):
    """Replace every attention site that qualifies; returns (gm, [SiteReport, ...]).

    Each site runs `danon.core.run.attention_site`; `site_function`, when given, runs instead, with the same
    keywords plus `site_name` (danon.calibrate measures each site's candidates this way).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from danon.passes.options import DanonConfig
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
    sites = find_sites(gm)
    for site, name in zip(sites, site_names(sites)):
        choice = (config.sites or {}).get(name)
        family, reason = decide(site, config, None if choice is None else choice.family)
        options = substitution_options(family, config.family_options if choice is None else choice.options)
        rows.append(_report_row(site, name, family, reason, options, None if choice is None else choice.error, config))
        if family is not None:   # danon.calibrate's measuring call is told which site it runs
            _replace(gm, site, family, options, config, site_function or attention_site,
                     None if site_function is None else name)
    gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
    gm.graph.lint()
    gm.recompile()
    return gm, rows


__all__ = ["rewrite_attention", "find_sites", "decide", "site_names", "approximation"]
