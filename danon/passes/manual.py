"""Recognise hand-written attention (matmul -> scale -> mask -> softmax -> matmul) as attention sites.

The chain, as Dynamo hands it over (torch-level IR), in the order models write it:

    s = matmul(q, k^T)             torch.matmul | @ | torch.bmm | .matmul | einsum("..qd,..kd->..qk");
                                   k^T a transpose / permute of the last two dims (or not: a transpose
                                   is inserted); q and / or k may be scaled by constants first
    s = s * c | s / c              any number of constant scales: folded into one `scale`
    s = c * tanh(s / c)            Gemma-style soft-capping -> `softcap`
    s = s + mask                   additive float masks (summed when several)
    s = s.masked_fill(m, -inf)     fills with -inf or a large negative (<= float16's min) ->
    s = torch.where(m, s, -inf)        a bool "attend" mask (the fill mask negated)
    s = s.float() / .to(...)       upcasts (to float32 / float64, or back to q's dtype)
    p = softmax(s, dim=-1[, dtype=float32]) -> .to / .type / .type_as -> dropout(no-op)
    out = matmul(p, v)             -> site.node

A chain with B * H merged into one dim (3-D bmm) becomes a site on 4-D tensors: the 4-D tensors
the views came from when the output is viewed back to them, else q, k, v with a leading dim of 1
inserted (heads = B * H) and the output squeezed back.

A chain that has the shape of attention but cannot be proven to be it is reported as a kept Site
(with `kept` the reason) and left alone; a softmax that is not between two matmuls is not reported.
Nothing in the graph changes unless a site is replaced, except for the small view / mask nodes a
replaceable site needs (they compute what the chain computed, so the graph stays the same
function whatever the driver decides).
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F

from danon.core import torch_internals

from .site import Site, known_equal

# ----------------------------------------------------------------------------------------------
# Op tables (Dynamo's torch-level IR)

MATMUL_FNS = {torch.matmul, operator.matmul, torch.bmm}
MATMUL_METHODS = {"matmul", "bmm", "__matmul__"}
MUL_FNS = {operator.mul, torch.mul, operator.imul}
MUL_METHODS = {"mul", "mul_", "__mul__", "__rmul__", "multiply"}
DIV_FNS = {operator.truediv, torch.div, torch.true_divide, operator.itruediv, torch.divide}
DIV_METHODS = {"div", "div_", "true_divide", "__truediv__", "divide"}
ADD_FNS = {operator.add, torch.add, operator.iadd}
ADD_METHODS = {"add", "add_", "__add__", "__radd__"}
TANH_FNS = {torch.tanh, F.tanh}
TANH_METHODS = {"tanh"}
FILL_FNS = {torch.masked_fill}
FILL_METHODS = {"masked_fill", "masked_fill_"}
WHERE_FNS = {torch.where}
WHERE_METHODS = {"where"}
CAST_METHODS = {"to", "type", "type_as", "float", "double", "half", "bfloat16"}
NOOP_METHODS = {"contiguous", "clone"}
SOFTMAX_FNS = {F.softmax, torch.softmax, torch.special.softmax}
SOFTMAX_METHODS = {"softmax"}
DROPOUT_FNS = {F.dropout, torch.dropout}
INPLACE_FNS = {operator.imul, operator.itruediv, operator.iadd, operator.isub, operator.setitem}

# a fill at or below this (float16's smallest finite value) gets weight exp(fill - rowmax) = 0
LARGE_NEGATIVE = float(torch.finfo(torch.float16).min)


def _is(node, fns, methods) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in fns
    return node.op == "call_method" and node.target in methods


def _ev(node):
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def _tensor(node) -> Optional[torch.Tensor]:
    v = _ev(node)
    return v if isinstance(v, torch.Tensor) else None


def _name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


_eq = known_equal


def _same_shape(a: Sequence, b: Sequence) -> bool:
    return len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b))


def _number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _arg(node: fx.Node, i: int, name: str, default=None):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[i] if len(node.args) > i else default


class Kept(Exception):
    """The chain has the shape of attention but is not provably attention: the message says why."""


# ----------------------------------------------------------------------------------------------
# Pieces of the chain


def _scale_of(node: fx.Node) -> Optional[Tuple[fx.Node, object]]:
    """(tensor input, factor) for x * c, c * x, x / c; None when `node` is no mul / div of one tensor.

    The factor is a Python number, or the other operand (an fx.Node) when it is not a number.
    """
    if _is(node, MUL_FNS, MUL_METHODS):
        if len(node.args) != 2 or node.kwargs:
            return None
        a, b = node.args
        if isinstance(a, fx.Node) and _tensor(a) is not None and not (isinstance(b, fx.Node) and _tensor(b) is not None
                                                                      and _tensor(b).dim() > _tensor(a).dim()):
            return a, b
        if isinstance(b, fx.Node) and _tensor(b) is not None:
            return b, a
        return None
    if _is(node, DIV_FNS, DIV_METHODS):
        if len(node.args) != 2 or any(k != "rounding_mode" or node.kwargs[k] is not None for k in node.kwargs):
            return None
        a, b = node.args
        if not (isinstance(a, fx.Node) and _tensor(a) is not None):
            return None
        return a, (1.0 / b if _number(b) and b != 0 else ("div", b))
    return None


def _factor(f, what: str) -> float:
    """A constant scale factor, or Kept saying why it is not one."""
    if isinstance(f, tuple):           # ("div", divisor) that is not a nonzero number
        f = f[1]
        if _number(f):
            raise Kept(f"{what} divided by zero")
    if _number(f):
        f = float(f)
        if not math.isfinite(f):
            raise Kept(f"{what} scaled by {f}")
        return f
    if isinstance(f, fx.Node) and _tensor(f) is not None:
        raise Kept(f"the scale of {what} is a tensor ({f.name}), not a constant")
    raise Kept(f"the scale of {what} is computed at run time ({getattr(f, 'name', f)})")


def _is_symbolic_float(f) -> bool:
    """A node holding a SymFloat: how Dynamo passes a module's float attribute under dynamic=True."""
    return isinstance(f, fx.Node) and isinstance(_ev(f), torch.SymFloat)


def _rsqrt_head_dim(f, d) -> bool:
    """The factor is 1 / sqrt(D) computed on the symbolic head size D (dynamic shapes), as a multiplier:
    D ** -0.5, 1 / math.sqrt(D); or as a divisor ("div", f): math.sqrt(D), D ** 0.5."""
    divisor = isinstance(f, tuple)
    f = f[1] if divisor else f

    def is_d(n):
        ev = _ev(n)
        return isinstance(ev, torch.SymInt) and _eq(ev, d)

    def is_sqrt(n):
        return isinstance(n, fx.Node) and n.op == "call_function" and bool(n.args) and is_d(n.args[0]) and (
            (n.target in (torch_internals.SYM_SQRT, math.sqrt) and len(n.args) == 1) or
            (n.target is operator.pow and len(n.args) == 2 and n.args[1] == 0.5))

    if not isinstance(f, fx.Node) or f.op != "call_function" or isinstance(d, int):
        return False
    if divisor:
        return is_sqrt(f)
    if f.target is operator.pow and len(f.args) == 2 and is_d(f.args[0]) and f.args[1] == -0.5:
        return True
    return f.target is operator.truediv and len(f.args) == 2 and f.args[0] == 1 and is_sqrt(f.args[1])


def _swaps_last_two(node: fx.Node) -> bool:
    """node is x.transpose(-2, -1) (any spelling) or x.permute(..., -1, -2) of its first argument."""
    x = _tensor(node.args[0]) if node.args else None
    if x is None:
        return False
    nd = x.dim()
    if (node.op == "call_method" and node.target == "transpose") or \
            (node.op == "call_function" and node.target in (torch.transpose,)):
        if len(node.args) != 3 or node.kwargs or not all(isinstance(d, int) for d in node.args[1:]):
            return False
        return {node.args[1] % nd, node.args[2] % nd} == {nd - 2, nd - 1}
    if (node.op == "call_method" and node.target == "permute") or \
            (node.op == "call_function" and node.target is torch.permute):
        dims = node.args[1:]
        if "dims" in node.kwargs:
            dims = node.kwargs["dims"]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        if len(dims) != nd or not all(isinstance(d, int) for d in dims):
            return False
        return [d % nd for d in dims] == list(range(nd - 2)) + [nd - 1, nd - 2]
    return False


def _einsum_parts(node: fx.Node):
    """(prefix, left, right, out) index strings of a two-operand einsum, letters only after the prefix."""
    if not (node.op == "call_function" and node.target is torch.einsum) or node.kwargs:
        return None
    if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
        spec, ops = node.args[0], tuple(node.args[1])
    else:
        spec, ops = node.args[0], tuple(node.args[1:])
    if not isinstance(spec, str) or len(ops) != 2 or "->" not in spec:
        return None
    lhs, out = spec.replace(" ", "").split("->")
    if lhs.count(",") != 1:
        return None
    a, b = lhs.split(",")
    if len(a) < 3 or len(b) < 3 or len(out) < 3 or not (a[:-2] == b[:-2] == out[:-2]):
        return None
    tails = a[-2:] + b[-2:] + out[-2:]
    if not all(c.isalpha() for c in tails) or any(c in a[:-2] for c in tails):
        return None
    return a[:-2], a[-2:], b[-2:], out[-2:], ops


def _qk_operands(node: fx.Node):
    """For a q k^T product: (q side, k side, k side is already [.., Nk, D]); None if node is no product."""
    if _is(node, MATMUL_FNS, MATMUL_METHODS) and len(node.args) == 2 and not node.kwargs:
        return node.args[0], node.args[1], False
    parts = _einsum_parts(node)
    if parts is None:
        return None
    _, (i, d), right, (o1, o2), (a, b) = parts
    if i == d or o1 != i or right[1] == right[0]:
        return None
    if right == o2 + d:          # "..id,..jd->..ij": k as it is
        return a, b, True
    if right == d + o2:          # "..id,..dj->..ij": k^T
        return a, b, False
    return None


def _pv_operands(node: fx.Node):
    """For p @ v: (p, v); None if node is no such product."""
    if _is(node, MATMUL_FNS, MATMUL_METHODS) and len(node.args) == 2 and not node.kwargs:
        return node.args[0], node.args[1]
    parts = _einsum_parts(node)
    if parts is None:
        return None
    _, (i, j), (j2, e), (o1, o2), (a, b) = parts
    if i == j or j2 != j or e in (i, j) or (o1, o2) != (i, e):
        return None
    return a, b


def _is_product(node) -> bool:
    return isinstance(node, fx.Node) and (_qk_operands(node) is not None or _pv_operands(node) is not None)


def _softmax_dim_dtype(node: fx.Node):
    """(dim, dtype) of a softmax call; (None, None) when the node is not one."""
    if not _is(node, SOFTMAX_FNS, SOFTMAX_METHODS):
        return None
    if node.op == "call_function" and node.target is F.softmax:
        dim, dtype = _arg(node, 1, "dim"), _arg(node, 3, "dtype")
    else:
        dim, dtype = _arg(node, 1, "dim"), _arg(node, 2, "dtype")
    return dim, dtype


def _dropout_noop(node: fx.Node) -> Optional[bool]:
    """True for a dropout that does nothing, False for one that does; None if node is no dropout."""
    if not _is(node, DROPOUT_FNS, set()):
        return None
    if node.target is F.dropout:
        p, training = _arg(node, 1, "p", 0.5), _arg(node, 2, "training", True)
    else:
        p, training = _arg(node, 1, "p"), _arg(node, 2, "train")
    if training is False:
        return True
    if _number(p) and p == 0:
        return True
    if isinstance(p, fx.Node) or isinstance(training, fx.Node):
        raise Kept("dropout on the attention weights with p / training computed at run time")
    return False


def _fill_ok(value) -> bool:
    return _number(value) and (float(value) == float("-inf") or float(value) <= LARGE_NEGATIVE)


def _constant(node):
    """The number a one-element tensor made in the graph holds (torch.full([], c) / torch.tensor(c)), else node."""
    if not (isinstance(node, fx.Node) and node.op == "call_function"):
        return node
    t = _tensor(node)
    if t is None or t.numel() != 1 or t.dim() != 0:
        return node
    if node.target is torch.full and len(node.args) == 2 and tuple(node.args[0]) == () and _number(node.args[1]):
        return node.args[1]
    if node.target in (torch.tensor, torch.scalar_tensor) and len(node.args) == 1 and _number(node.args[0]):
        return node.args[0]
    return node


def _upstream_product(node: fx.Node, depth: int = 6) -> bool:
    """A matmul / bmm / einsum among node's inputs within `depth` steps."""
    seen, frontier = set(), [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for a in n.all_input_nodes:
                if a in seen:
                    continue
                seen.add(a)
                if _is_product(a):
                    return True
                nxt.append(a)
        frontier = nxt
    return False


# ----------------------------------------------------------------------------------------------
# Walking the chain


class _Chain:
    def __init__(self, softmax: fx.Node):
        self.softmax = softmax
        self.final: Optional[fx.Node] = None      # p @ v
        self.qk: Optional[fx.Node] = None         # q @ k^T
        self.pre: List[Tuple] = []                # ops between qk and softmax, in forward order
        self.post_nodes: List[fx.Node] = []       # softmax .. the node fed to the final product
        self.dropout_reason: Optional[str] = None


def _dtype_only_use(user: fx.Node, node: fx.Node, chain: Optional["_Chain"]) -> bool:
    """user reads only node's dtype (p.type_as(s) / p.to(s)), and dies with the chain."""
    return chain is not None and user in chain.post_nodes and user.op == "call_method" and \
        user.target in ("type_as", "to") and len(user.args) == 2 and user.args[1] is node and user.args[0] is not node


def _single_user(node: fx.Node, nxt: fx.Node, what: str, chain: Optional["_Chain"] = None) -> None:
    others = [u for u in node.users if u is not nxt and not _dtype_only_use(u, node, chain)]
    if others:
        inplace = [u for u in others if (u.op == "call_method" and u.target.endswith("_")) or
                   (u.op == "call_function" and u.target in INPLACE_FNS)]
        if inplace:
            raise Kept(f"the attention {what} ({node.name}) are modified in place by {_name(inplace[0])}")
        raise Kept(f"the attention {what} ({node.name}) are also used outside the attention chain "
                   f"(by {', '.join(u.name for u in others[:3])})")


def _walk_forward(chain: _Chain) -> bool:
    """softmax -> casts / no-op dropout -> p @ v. False when the softmax does not feed a product."""
    cur = chain.softmax
    chain.post_nodes.append(cur)
    for _ in range(16):
        users = list(cur.users)
        finals = [u for u in users if (_pv_operands(u) or (None, None))[0] is cur]
        if finals:
            chain.final = finals[0]
            _single_user(cur, chain.final, "weights")
            return True
        if len(users) != 1:
            if any(_reaches_product(u) for u in users):
                chain.final = next(u for u in users if _reaches_product(u))
                raise Kept(f"the attention weights ({cur.name}) are also used outside the attention chain")
            return False
        u = users[0]
        if _is(u, set(), CAST_METHODS | NOOP_METHODS) and u.args[0] is cur:
            pass
        else:
            try:
                noop = _dropout_noop(u)
            except Kept:
                noop = None
                if _reaches_product(u):
                    chain.final = _reaches_product(u)
                    raise
            if noop is None:
                found = _reaches_product(u)
                if found is not None:
                    chain.final = found
                    raise Kept(f"the attention weights pass through {_name(u)} ({u.name}) before the product with v")
                return False
            if noop is False and u.args[0] is cur:
                p = _arg(u, 1, "p")
                chain.dropout_reason = f"dropout on the attention weights (p={p}) in training mode is not in the op"
            elif u.args[0] is not cur:
                return False
        cur = u
        chain.post_nodes.append(cur)
    return False


def _reaches_product(node: fx.Node, depth: int = 4) -> Optional[fx.Node]:
    """The p @ v product a single-user path from node leads to within `depth` steps, or None."""
    cur = node
    for _ in range(depth):
        for u in cur.users:
            pv = _pv_operands(u)
            if pv is not None and pv[0] is cur:
                return u
        if len(cur.users) != 1:
            return None
        cur = next(iter(cur.users))
    return None


def _pre_op(node: fx.Node):
    """(chain input, op tuple) for one node between q k^T and the softmax; None if not understood."""
    sc = _scale_of(node)
    if sc is not None:
        return sc[0], ("scale", sc[1], node)
    if _is(node, TANH_FNS, TANH_METHODS) and len(node.args) == 1 and not node.kwargs:
        return node.args[0], ("tanh", node)
    if _is(node, ADD_FNS, ADD_METHODS):
        if len(node.args) != 2 or node.kwargs:
            return None
        a, b = node.args
        if not (isinstance(a, fx.Node) and _tensor(a) is not None):
            a, b = b, a
        if not (isinstance(a, fx.Node) and _tensor(a) is not None):
            return None
        return a, ("add", b, node)
    if _is(node, FILL_FNS, FILL_METHODS):
        x, m, val = _arg(node, 0, "input"), _arg(node, 1, "mask"), _arg(node, 2, "value")
        return x, ("fill", m, val, node)
    if _is(node, WHERE_FNS, WHERE_METHODS) and len(node.args) == 3 and not node.kwargs:
        if node.op == "call_method":               # x.where(cond, other): x where cond else other
            x, cond, other = node.args
            return x, ("where", cond, other, node)
        cond, a, b = node.args
        if isinstance(a, fx.Node) and _tensor(a) is not None and not (isinstance(b, fx.Node) and _tensor(b) is not None
                                                                      and _is_chainlike(b) and not _is_chainlike(a)):
            return a, ("where", cond, b, node)      # keep the scores where cond
        if isinstance(b, fx.Node) and _tensor(b) is not None:
            return b, ("where_not", cond, a, node)  # keep the scores where not cond
        return None
    if _is(node, set(), CAST_METHODS | NOOP_METHODS) and node.args:
        return node.args[0], ("cast", node)
    return None


def _is_chainlike(node: fx.Node) -> bool:
    return _qk_operands(node) is not None or _pre_op(node) is not None


def _walk_back(chain: _Chain, x: fx.Node, nxt: fx.Node, ops: List[Tuple], depth: int = 0) -> None:
    """Fill chain.qk / chain.pre walking back from x (which feeds nxt); raises Kept."""
    if depth > 32:
        raise Kept("the chain between q k^T and the softmax is too long")
    _single_user(x, nxt, "scores", chain)
    if _qk_operands(x) is not None:
        chain.qk = x
        chain.pre = list(reversed(ops))
        return
    step = _pre_op(x)
    if step is None:
        raise Kept(f"the scores pass through {_name(x)} ({x.name}), which the recogniser does not understand")
    prev, op = step
    if op[0] in ("add", "scale") and isinstance(op[1], fx.Node) and _tensor(op[1]) is not None:
        # two tensors: the chain is the one that leads back to q k^T (for add, either order is attention)
        try:
            return _walk_back(chain, prev, x, ops + [op], depth + 1)
        except Kept as first:
            try:
                return _walk_back(chain, op[1], x, ops + [(op[0], prev, x)], depth + 1)
            except Kept:
                raise first from None
    _walk_back(chain, prev, x, ops + [op], depth + 1)


def _softmax_input(node: fx.Node):
    return _arg(node, 0, "input")


# ----------------------------------------------------------------------------------------------
# The recogniser


def find_manual_sites(gm: fx.GraphModule) -> List[Site]:
    """One Site per hand-written attention chain; `kept` says why a chain cannot be replaced.

    Example:
        >>> import torch
        >>> class Attn(torch.nn.Module):
        ...     def forward(self, q, k, v):
        ...         return torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v
        >>> found = []
        >>> def backend(gm, inputs):
        ...     found.extend(find_manual_sites(gm))
        ...     return gm.forward
        >>> q = torch.randn(1, 2, 16, 8)
        >>> _ = torch.compile(Attn(), backend=backend)(q, q, q)
        >>> found[0].source, found[0].scale, found[0].kept
        ('manual', 0.25, None)
    """
    sites = []
    for node in list(gm.graph.nodes):
        if _softmax_dim_dtype(node) is None:
            continue
        site = _site(gm, node)
        if site is not None:
            sites.append(site)
    return sites


def _site(gm: fx.GraphModule, softmax: fx.Node) -> Optional[Site]:
    chain = _Chain(softmax)
    try:
        if not _walk_forward(chain):
            return None
    except Kept as why:          # reported only when the softmax is of a product too (attention-shaped)
        if chain.final is None or not _upstream_product(softmax):
            return None
        return Site(node=chain.final, source="manual", kept=str(why))
    site = Site(node=chain.final, source="manual")
    try:
        x = _softmax_input(softmax)
        if not isinstance(x, fx.Node):
            return None
        try:
            _walk_back(chain, x, softmax, [])
        except Kept:
            if not _upstream_product(softmax):
                return None          # a softmax after a product, but not of scores we can trace: not reported
            raise
        _build(gm, chain, site)
    except Kept as why:
        site.kept = str(why)
    return site


def _dtype_ok(dtype: torch.dtype, qdtype: torch.dtype) -> bool:
    """Casts in the chain may keep q's dtype or go up to float32 / float64, never down."""
    if dtype == qdtype:
        return True
    return dtype in (torch.float32, torch.float64) and dtype.itemsize >= qdtype.itemsize and qdtype.is_floating_point


def _build(gm: fx.GraphModule, chain: _Chain, site: Site) -> None:
    """Read q, k, v, scale, softcap and masks off the chain, check them, then fill `site`."""
    final = chain.final
    p_node, v = _pv_operands(final)
    q, kside, k_ready = _qk_operands(chain.qk)

    # scales on q and on k (before or after the transpose)
    scale = 1.0
    while isinstance(q, fx.Node):            # q * c: fold c (q times a tensor is just q)
        sc = _scale_of(q)
        if sc is None or not _number(sc[1]):
            break
        q, scale = sc[0], scale * _factor(sc[1], "q")
    transposed = k_ready
    while isinstance(kside, fx.Node):
        sc = _scale_of(kside)
        if sc is not None and _number(sc[1]):
            kside, scale = sc[0], scale * _factor(sc[1], "k")
            continue
        if not transposed and _swaps_last_two(kside):
            kside, transposed = kside.args[0], True
            continue
        break
    for name, n in (("q", q), ("k", kside), ("v", v)):
        if not isinstance(n, fx.Node) or _tensor(n) is None:
            raise Kept(f"{name} is not a traced tensor")
    qv, kv, vv, ov = _tensor(q), _tensor(kside), _tensor(v), _tensor(final)
    site.q, site.v = q, v
    site.k = kside if transposed else None

    nd = qv.dim()
    if nd not in (3, 4) or kv.dim() != nd or vv.dim() != nd or ov is None or ov.dim() != nd:
        raise Kept(f"q k^T on {qv.dim()}-D tensors (attention takes 4-D [B, H, N, D] or 3-D [B*H, N, D])")
    kshape = tuple(kv.shape) if transposed else tuple(kv.shape[:-2]) + (kv.shape[-1], kv.shape[-2])
    if not (_eq(kshape[0], qv.shape[0]) and _eq(vv.shape[0], qv.shape[0])):
        raise Kept("k or v is broadcast over the batch dim")
    if nd == 4 and not (_eq(kshape[1], vv.shape[1]) and (_eq(kshape[1], qv.shape[1]) or _eq(kshape[1], 1))):
        raise Kept(f"{qv.shape[1]} query heads with {kshape[1]} key and {vv.shape[1]} value heads")
    if not (_eq(kshape[-1], qv.shape[-1]) and _eq(kshape[-2], vv.shape[-2])):
        raise Kept("q, k, v sizes do not match")

    # dtypes: one dtype in, the same out; casts in between only upwards
    qdtype = qv.dtype
    if not qdtype.is_floating_point or kv.dtype != qdtype or vv.dtype != qdtype:
        raise Kept(f"q, k, v dtypes differ ({qv.dtype}, {kv.dtype}, {vv.dtype})")
    if ov.dtype != qdtype:
        raise Kept(f"the output dtype {ov.dtype} differs from q's {qdtype}")
    scores_shape = tuple(_tensor(chain.qk).shape)
    for n in [chain.qk] + [op[-1] for op in chain.pre] + chain.post_nodes:
        t = _tensor(n)
        if t is None or not _same_shape(t.shape, scores_shape):
            raise Kept(f"{n.name} changes the shape of the scores (a broadcast mask or a view)")
        if not _dtype_ok(t.dtype, qdtype):
            raise Kept(f"the scores are cast to {t.dtype} ({n.name}), below q's {qdtype}")

    # softmax over the last dim
    dim, dtype = _softmax_dim_dtype(chain.softmax)
    if not isinstance(dim, int) or dim % nd != nd - 1:
        raise Kept(f"softmax over dim {dim}, not the key dim (-1)")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and _dtype_ok(dtype, qdtype)):
        raise Kept(f"softmax in {dtype}")
    if chain.dropout_reason:
        raise Kept(chain.dropout_reason)

    # the ops between q k^T and the softmax
    softcap, adds, attend, symbolic_default, symbolic_scale = None, [], [], 0, None
    stage, ops, i = 0, chain.pre, 0
    while i < len(ops):
        op = ops[i]
        kind = op[0]
        if kind == "scale" and i + 2 < len(ops) and ops[i + 1][0] == "tanh" and ops[i + 2][0] == "scale":
            a, c = _factor(op[1], "the scores"), _factor(ops[i + 2][1], "the scores")
            if stage > 0:
                raise Kept("a soft-cap after masking or a second soft-cap")
            if c <= 0:
                raise Kept(f"a soft-cap with a negative cap ({c})")
            softcap, scale, stage, i = c, scale * a * c, 1, i + 3    # c tanh(a s) = c tanh((a c) s / c)
            continue
        if kind == "scale":
            if stage > 0:
                raise Kept("the scores are scaled after the soft-cap or the mask")
            if _rsqrt_head_dim(op[1], qv.shape[-1]):
                symbolic_default += 1
            elif _is_symbolic_float(op[1]):
                if symbolic_scale is not None:
                    raise Kept("the scores are scaled by two symbolic floats")
                symbolic_scale = op[1]
            else:
                scale *= _factor(op[1], "the scores")
        elif kind == "tanh":
            raise Kept("tanh on the scores that is not a soft-cap (s / c, tanh, * c)")
        elif kind == "add":
            m = op[1]
            mv = _tensor(m)
            if mv is None:
                raise Kept(f"the scores are shifted by {m!r}, not masked")
            if mv.dtype == torch.bool or not mv.is_floating_point():
                raise Kept(f"a mask of dtype {mv.dtype} added to the scores (additive masks are floating point)")
            if mv.dim() > nd:
                raise Kept("a mask with more dims than the scores")
            adds.append(m)
            stage = 2
        elif kind in ("fill", "where", "where_not"):
            m, val = op[1], op[2]
            mv = _tensor(m)
            if mv is None or mv.dtype != torch.bool:
                raise Kept(f"{_name(op[-1])} with a mask of dtype {getattr(mv, 'dtype', None)}")
            val = _constant(val)
            if isinstance(val, fx.Node):
                raise Kept(f"{_name(op[-1])} with a fill value that is a tensor ({val.name})")
            if not _fill_ok(val):
                raise Kept(f"{_name(op[-1])} with {val}, not -inf or a large negative")
            if mv.dim() > nd:
                raise Kept("a mask with more dims than the scores")
            attend.append((m, kind != "where"))     # (mask, True when the mask marks what is *hidden*)
            stage = 2
        elif kind == "cast":
            pass                                     # dtypes checked above
        i += 1
    if symbolic_scale is not None:                   # a float attribute made symbolic (dynamic=True): pass it on
        if symbolic_default or scale != 1.0 or softcap is not None:
            raise Kept("the scores are scaled by a symbolic float and by other factors")
    if symbolic_default:                             # 1 / sqrt(D) on a symbolic head size: scale=None says it
        if symbolic_default > 1 or scale != 1.0 or softcap is not None:
            raise Kept("the scale is computed at run time from the (symbolic) head size")
        scale = None

    # inputs are read where the chain reads them: nothing may change them in place in between
    for name, n in (("q", q), ("k", kside), ("v", v)) + tuple(("mask", m) for m in adds) + \
            tuple(("mask", m) for m, _ in attend):
        for u in n.users:
            if (u.op == "call_method" and isinstance(u.target, str) and u.target.endswith("_") and u.args and
                    u.args[0] is n) or (u.op == "call_function" and u.target in INPLACE_FNS and u.args[0] is n):
                raise Kept(f"{name} ({n.name}) is modified in place by {_name(u)}")

    # everything is proven: now edit the graph (views and mask nodes the site needs)
    graph = gm.graph
    with graph.inserting_before(final):
        if not transposed:      # k handed over as k^T: transpose it back (contiguous: kernels want stride-1 rows)
            kside = _call(graph, "transpose", (kside, -2, -1), method=True, like=final)
            kside = _call(graph, "contiguous", (kside,), method=True, like=final)
        if nd == 3:
            q, kside, v, out = _to_4d(graph, chain, q, kside, v, final)
            adds = [_unsqueeze_3d(graph, m, final) for m in adds]
            attend = [(_unsqueeze_3d(graph, m, final), hide) for m, hide in attend]
        else:
            out = final
        keep = None
        for m, hide in attend:
            m = _call(graph, torch.logical_not, (m,), like=final) if hide else m
            keep = m if keep is None else _call(graph, torch.logical_and, (keep, m), like=final)
        add = None
        for m in adds:
            add = m if add is None else _call(graph, operator.add, (add, m), like=final)
        if add is not None and keep is not None:
            mask = _call(graph, torch.where, (keep, add, float("-inf")), like=final)
        else:
            mask = add if add is not None else keep
    site.node, site.q, site.k, site.v = out, q, kside, v
    site.mask, site.mask_class = mask, ("none" if mask is None else "general")
    site.scale = symbolic_scale if symbolic_scale is not None else None if scale is None else float(scale)
    site.softcap = softcap


def _call(graph: fx.Graph, target, args, *, method: bool = False, like: fx.Node) -> fx.Node:
    """Insert one node at the graph's insertion point, with its traced example value."""
    node = graph.call_method(target, args) if method else graph.call_function(target, args)
    vals = [_ev(a) if isinstance(a, fx.Node) else a for a in args]
    mode = next((v.fake_mode for v in vals if hasattr(v, "fake_mode")), None)
    ctx = mode if mode is not None else _nullcontext()
    with ctx:
        node.meta["example_value"] = getattr(vals[0], target)(*vals[1:]) if method else target(*vals)
    if "stack_trace" in like.meta:
        node.meta["stack_trace"] = like.meta["stack_trace"]
    return node


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _unsqueeze_3d(graph: fx.Graph, m: fx.Node, like: fx.Node) -> fx.Node:
    """A mask of 3-D scores [B*H, Nq, Nk] as a mask of [1, B*H, Nq, Nk]."""
    return _call(graph, "unsqueeze", (m, 0), method=True, like=like) if _tensor(m).dim() == 3 else m


def _view_source(n: fx.Node, dims: int = 4) -> Optional[fx.Node]:
    """x when n = x.view(...) / x.reshape(...) with x `dims`-D."""
    if (n.op == "call_method" and n.target in ("view", "reshape")) or \
            (n.op == "call_function" and n.target is torch.reshape):
        x = n.args[0]
        if isinstance(x, fx.Node) and _tensor(x) is not None and _tensor(x).dim() == dims:
            return x
    return None


def _to_4d(graph: fx.Graph, chain: _Chain, q, k, v, final: fx.Node):
    """4-D q, k, v and the 4-D output node of a chain on [B*H, N, D] tensors."""
    users = list(final.users)
    back = users[0] if len(users) == 1 else None
    if back is not None and _view_source(back, 3) is final and _tensor(back).dim() == 4:
        B, H = _tensor(back).shape[:2]
        sources = [_view_source(n) for n in (q, k, v)]
        lead_ok = all(s is not None and _same_shape(_tensor(s).shape[:2], (B, H)) and
                      _same_shape(_tensor(s).shape[2:], _tensor(n).shape[1:]) for s, n in zip(sources, (q, k, v)))
        masks_ok = all(_tensor(op[1]).dim() < 3 or _eq(_tensor(op[1]).shape[0], 1)
                       for op in chain.pre if op[0] in ("add", "fill", "where", "where_not"))
        if lead_ok and masks_ok and _same_shape(_tensor(back).shape[2:], _tensor(final).shape[1:]):
            return sources[0], sources[1], sources[2], back
    q4, k4, v4 = (_call(graph, "unsqueeze", (n, 0), method=True, like=final) for n in (q, k, v))
    with graph.inserting_after(final):
        out4 = _call(graph, "unsqueeze", (final, 0), method=True, like=final)
    with graph.inserting_after(out4):
        out3 = _call(graph, "squeeze", (out4, 0), method=True, like=final)
    final.replace_all_uses_with(out3, delete_user_cb=lambda u: u is not out4)
    return q4, k4, v4, out4


__all__ = ["find_manual_sites"]
