"""Normalise a site's k and v: see through repeat_kv (expand + reshape) and concatenation with an empty cache.

Both rewrites only re-point `site.k` / `site.v`; the graph is not edited (the repeat and the cat
die with the attention chain when the driver replaces the site, unless something else uses them).

- repeat_kv, as transformers writes it::

      x[:, :, None, :, :].expand(B, kv, rep, S, D).reshape(B, kv * rep, S, D)

  (also `x.unsqueeze(2)`, `.view`, `.flatten(1, 2)`), and `torch.repeat_interleave(x, rep, dim=1)`,
  are head h -> x head h // rep: grouped-query attention, which the op does natively. Seen through
  only when k and v both come out of a repeat to the same number of kv heads, and H % Hkv == 0.
- `torch.cat([cache, x], dim=-2)` where every other operand has no elements (transformers' empty
  cache is `torch.tensor([])`, 1-D, which cat skips) is x, when the traced shape, dtype and device
  of the result are x's. Dynamo specialises sizes 0 and 1, so an empty cache stays empty for the
  graph's lifetime (a non-empty one recompiles).
"""
from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch
import torch.fx as fx

from .site import Site, known_equal

CAT_FNS = {torch.cat, torch.concat, torch.concatenate}
RESHAPE_METHODS = {"reshape", "view"}
REPEAT_INTERLEAVE_FNS = {torch.repeat_interleave}


def _value(node) -> Optional[torch.Tensor]:
    v = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


_eq = known_equal


def _shape_eq(a, b) -> bool:
    return len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b))


def _is_zero(n) -> bool:
    return _eq(n, 0)


def _hint(x) -> int:
    if isinstance(x, torch.SymInt):
        return x.node.hint if x.node.hint is not None else -1
    return int(x)


def _same_tensor_type(a: torch.Tensor, b: torch.Tensor) -> bool:
    return _shape_eq(a.shape, b.shape) and a.dtype == b.dtype and a.device == b.device


def see_through_cat(node: fx.Node) -> fx.Node:
    """x for node = torch.cat([empty..., x, empty...], dim); node itself otherwise.

    Example:
        >>> import torch
        >>> seen = []
        >>> def backend(gm, inputs):
        ...     cat = next(n for n in gm.graph.nodes if n.target is torch.cat)
        ...     seen.append(see_through_cat(cat).name)
        ...     return gm.forward
        >>> f = lambda c, k: torch.cat([c, k], dim=-2) * 2
        >>> _ = torch.compile(f, backend=backend)(torch.zeros(1, 2, 0, 4), torch.randn(1, 2, 8, 4))
        >>> seen
        ['l_k_']
    """
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in CAT_FNS:
        tensors = node.kwargs.get("tensors", node.args[0] if node.args else None)
        out = _value(node)
        if not isinstance(tensors, (list, tuple)) or out is None:
            return node
        full = []
        for t in tensors:
            tv = _value(t)
            if tv is None:
                return node
            if not _is_zero(tv.numel()):
                full.append(t)
        if len(full) != 1 or not _same_tensor_type(_value(full[0]), out):
            return node
        node = full[0]
    return node


def _repeat_base(node: fx.Node) -> Optional[Tuple[fx.Node, int]]:
    """(x, rep) when node = repeat_interleave(x, rep, dim=1) of a 4-D x, in either spelling; else None."""
    if not isinstance(node, fx.Node):
        return None
    out = _value(node)
    if out is None or out.dim() != 4:
        return None
    # torch.repeat_interleave(x, rep, dim=1) / x.repeat_interleave(rep, dim=1)
    if (node.op == "call_function" and node.target in REPEAT_INTERLEAVE_FNS) or \
            (node.op == "call_method" and node.target == "repeat_interleave"):
        x = node.args[0] if node.args else node.kwargs.get("input")
        reps = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        xv = _value(x)
        if xv is None or xv.dim() != 4 or not isinstance(reps, int) or isinstance(reps, bool) or reps < 1 or \
                not isinstance(dim, int) or dim % 4 != 1:
            return None
        if not _shape_eq(out.shape, (xv.shape[0], xv.shape[1] * reps, xv.shape[2], xv.shape[3])):
            return None
        return x, reps
    # x[:, :, None].expand(B, kv, rep, S, D).reshape(B, kv * rep, S, D)
    flat = (node.op == "call_method" and node.target in RESHAPE_METHODS) or \
        (node.op == "call_function" and node.target is torch.reshape) or \
        (node.op == "call_method" and node.target == "flatten" and tuple(node.args[1:]) in ((1, 2), (1, -3)) and
         not node.kwargs)
    if not flat:
        return None
    expand = node.args[0]
    ev = _value(expand)
    if not (isinstance(expand, fx.Node) and expand.op == "call_method" and expand.target == "expand") or \
            ev is None or ev.dim() != 5:
        return None
    unsq = expand.args[0]
    uv = _value(unsq)
    if not isinstance(unsq, fx.Node) or uv is None or uv.dim() != 5 or not _inserts_one_dim(unsq):
        return None
    x = unsq.args[0]
    xv = _value(x)
    if xv is None or xv.dim() != 4:
        return None
    B, kv, S, D = xv.shape
    rep = ev.shape[2]
    if not isinstance(rep, int) or rep < 1:
        return None
    if not (_shape_eq(uv.shape, (B, kv, 1, S, D)) and _shape_eq(ev.shape, (B, kv, rep, S, D)) and
            _shape_eq(out.shape, (B, kv * rep, S, D))):
        return None
    return x, rep


def _inserts_one_dim(node: fx.Node) -> bool:
    """node is x[:, :, None] (full slices, Ellipsis and one None) or x.unsqueeze(d) / torch.unsqueeze(x, d)."""
    if node.op == "call_function" and node.target is operator.getitem:
        idx = node.args[1] if len(node.args) == 2 else None
        if not isinstance(idx, tuple):
            return False
        nones = sum(i is None for i in idx)
        rest_ok = all(i is None or i is Ellipsis or (isinstance(i, slice) and i == slice(None, None, None))
                      for i in idx)
        return nones == 1 and rest_ok and sum(i is Ellipsis for i in idx) <= 1
    if (node.op == "call_method" and node.target == "unsqueeze") or \
            (node.op == "call_function" and node.target is torch.unsqueeze):
        return len(node.args) == 2 and isinstance(node.args[1], int) and not node.kwargs
    return False


def normalize_kv(gm: fx.GraphModule, site: Site) -> None:
    """Point site.k / site.v at the un-repeated, un-concatenated tensors when that is provably the same.

    The shape checks (each op's traced output, from node.meta['example_value']) are what proves it:
    a repeat is seen through only when both k and v are repeats to the same kv heads and the query
    heads are a multiple of them; a cat only when everything but one operand is empty.
    """
    if site.k is None or site.v is None:
        return
    k, v = see_through_cat(site.k), see_through_cat(site.v)
    kr, vr = _repeat_base(k), _repeat_base(v)
    if kr is not None and vr is not None:
        kb, vb = see_through_cat(kr[0]), see_through_cat(vr[0])
        qv, kbv, vbv = _value(site.q), _value(kb), _value(vb)
        if qv is not None and qv.dim() == 4 and _eq(kbv.shape[1], vbv.shape[1]) and \
                _hint(kbv.shape[1]) > 0 and _hint(qv.shape[1]) % _hint(kbv.shape[1]) == 0 and \
                _eq(qv.shape[1], kbv.shape[1] * kr[1]) and _eq(qv.shape[1], vbv.shape[1] * vr[1]):
            k, v = kb, vb
    site.k, site.v = k, v


__all__ = ["normalize_kv", "see_through_cat"]
