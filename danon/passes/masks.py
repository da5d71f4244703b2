"""Classify an attention site's mask by where it comes from: causal, key padding, sliding window, general.

A mask is classified only when its construction is index arithmetic and that arithmetic is shown to
equal a known class:

1. Structure. The mask's subgraph (every node it is computed from) holds only index arithmetic:
   arange, comparisons, logical and arithmetic ops, masked_fill / where, tril / triu, ones / zeros /
   full, views, expands, slicing and indexing, dtype casts; sizes (ints or symbolic sizes) and
   registered buffers (a `tril` buffer) count as constants; ops that read only another tensor's
   shape and dtype (`zeros_like`, `new_ones`, `size`) may take any tensor. At most one other graph
   input may feed it, a 2-D [B, Nk] tensor (the padding mask, e.g. transformers' `attention_mask`).
   A parameter (a learned bias), a second input, any other op, or an in-place op on the mask that
   is not itself part of the mask's construction: "general".
2. Evaluation. The subgraph is run on real tensors for several contents of the [B, Nk] input
   (no padding, left and right padding, random 0/1, a fully padded row, and values other than
   0/1) and, with symbolic shapes, for several sizes (the traced ones, larger ones, and one past
   every integer constant of the construction, so a window wider than the traced length still
   shows). Every result must equal the class's definition exactly, with query row i at position
   p = Nk - Nq + i (aligned bottom-right, as the masks transformers builds for queries after a cache):
   causal j <= p; sliding window p - w < j <= p; key padding P[b, j] != 0 (or == 0); their conjunctions. An additive float mask
   counts only when every value is 0 or -inf (or <= -65504, as eager paths' finfo.min: the same
   weights in every row that sees a key; a row that sees none returns 0, where eager averages).

Then site.mask becomes None and site.causal / site.key_padding / site.window say the same thing:
the dense mask's construction is dead and the driver's dead-code elimination removes it, so no
N x N mask is built. The key padding mask is computed from the input by one inserted node
(`torch.ne(P, 0)` or `torch.eq(P, 0)`), placed after the graph's inputs so every site can share it.

Provenance, not example values: an all-ones `attention_mask` still gives causal+key_padding, since
the classification holds for every content of the input. The one value read at compile time is a
registered buffer's (a `tril` buffer): buffers in a mask's construction are taken as constants.
Anything in doubt stays "general", which runs the exact family with the dense mask.
"""
from __future__ import annotations

import math
import operator
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx

from .site import Site

# Ops whose values are pure functions of their arguments' values (index arithmetic).
_FUNCTIONS = {
    torch.arange, torch.ones, torch.zeros, torch.full, torch.eye, torch.tril, torch.triu, torch.where,
    torch.logical_and, torch.logical_or, torch.logical_not, torch.logical_xor,
    torch.bitwise_and, torch.bitwise_or, torch.bitwise_not, torch.bitwise_xor,
    torch.eq, torch.ne, torch.le, torch.lt, torch.ge, torch.gt, torch.abs, torch.add, torch.sub, torch.mul,
    torch.neg, torch.remainder, torch.floor_divide, torch.minimum, torch.maximum, torch.clamp,
    torch.masked_fill, torch.unsqueeze, torch.squeeze, torch.reshape, torch.broadcast_to, torch.transpose,
    torch.permute, torch.flatten, torch.cat, torch.stack, torch.narrow, torch.select, torch.diagonal,
    torch.any, torch.all, torch.cumsum, torch.diff,
    operator.getitem, operator.le, operator.lt, operator.ge, operator.gt, operator.eq, operator.ne,
    operator.and_, operator.or_, operator.xor, operator.invert, operator.add, operator.sub, operator.mul,
    operator.neg, operator.pos, operator.floordiv, operator.mod,
}
_METHODS = {
    "to", "bool", "float", "double", "half", "bfloat16", "int", "long", "short", "byte", "type",
    "view", "reshape", "expand", "unsqueeze", "squeeze", "transpose", "permute", "contiguous", "flatten",
    "unflatten", "narrow", "select", "clone", "repeat", "broadcast_to", "diagonal", "__getitem__",
    "masked_fill", "masked_fill_", "fill_", "tril", "triu", "tril_", "triu_",
    "le", "lt", "ge", "gt", "eq", "ne", "logical_and", "logical_or", "logical_not", "logical_xor",
    "bitwise_and", "bitwise_or", "bitwise_not", "bitwise_xor", "__and__", "__or__", "__xor__", "__invert__",
    "abs", "add", "sub", "mul", "neg", "remainder", "clamp", "where", "minimum", "maximum",
    "new_ones", "new_zeros", "new_full", "zero_", "any", "all", "size", "dim", "expand_as", "view_as", "type_as",
    "cumsum", "diff",
}
# Ops that read only the shape / dtype / device of the argument at these positions.
_META_ONLY_FUNCTIONS = {torch.ones_like: (0,), torch.zeros_like: (0,), torch.full_like: (0,)}
_META_ONLY_METHODS = {"new_ones": (0,), "new_zeros": (0,), "new_full": (0,), "size": (0,), "dim": (0,),
                      "expand_as": (1,), "view_as": (1,), "type_as": (1,)}
_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.iand, operator.ior, operator.ixor,
                      operator.itruediv, operator.ifloordiv, operator.imod, operator.ilshift, operator.irshift}

_MAX_ELEMENTS = 1 << 28          # largest mask evaluated (elements, after dropping broadcast dims); larger: general
_MAX_PROBE_LEN = 16384           # largest sequence length probed for symbolic shapes
_LARGE_NEGATIVE = -65504.0      # float16's smallest finite value, as danon/passes/manual.py's fills


_MEMO: "weakref.WeakKeyDictionary[fx.Graph, Dict[Any, Any]]" = weakref.WeakKeyDictionary()


class _General(Exception):
    """The mask stays general; the message says why (for debugging)."""


def classify_mask(gm: fx.GraphModule, site: Site) -> None:
    """Set site.mask_class (and causal / key_padding / window, dropping site.mask) from the mask's provenance.

    Leaves the site untouched ("general") unless the class is proven; see the module docstring.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from danon.passes.sdpa import find_sdpa_sites
        >>> def f(q):
        ...     i = torch.arange(q.shape[2])
        ...     return F.scaled_dot_product_attention(q, q, q, attn_mask=i[None, :] <= i[:, None])
        >>> found = []
        >>> def backend(gm, inputs):
        ...     for site in find_sdpa_sites(gm):
        ...         classify_mask(gm, site)
        ...         found.append((site.mask_class, site.causal, site.mask))
        ...     return gm.forward
        >>> _ = torch.compile(f, backend=backend)(torch.randn(1, 2, 16, 8))
        >>> found
        [('causal', True, None)]
    """
    mask = site.mask
    if not isinstance(mask, fx.Node) or site.causal:
        return
    # Every layer of a model usually reads the same mask node: prove it once per graph and shapes.
    memo = _MEMO.setdefault(gm.graph, {})
    key = (mask, str(tuple(site.value("q").shape)) if site.value("q") is not None else "",
           str(tuple(site.value("k").shape)) if site.value("k") is not None else "")
    if key not in memo:
        try:
            memo[key] = _classify(gm, site, mask)
        except Exception:        # _General, or anything unexpected while proving: stay general, never fail the compile
            memo[key] = None
    found = memo[key]
    if found is None:
        return
    base, window, padding, convert = found
    key_padding = _key_padding_node(gm, padding, convert) if padding is not None else None
    site.mask = None
    site.causal = base in ("causal", "window")
    site.window = window
    site.key_padding = key_padding
    if base == "window":
        site.mask_class = "sliding_window"
    elif base == "causal":
        site.mask_class = "causal+key_padding" if key_padding is not None else "causal"
    else:
        site.mask_class = "key_padding" if key_padding is not None else "none"


# ----------------------------------------------------------------------------------------------------
# 1. Structure: the mask's subgraph


class _Slice:
    def __init__(self):
        self.nodes: List[fx.Node] = []               # every node whose value is computed, in graph order
        self.padding: Optional[fx.Node] = None       # the [B, N] graph input, if any
        self.constants: Dict[fx.Node, torch.Tensor] = {}   # buffers and graph constants: real values
        self.sizes: List[fx.Node] = []                # nodes whose value is an int / SymInt / shape
        self.meta: List[fx.Node] = []                 # tensors read only for their shape and dtype
        self.literals: List[int] = []                 # integer constants of the construction


def _flatten_args(obj, out: List[Any]) -> None:
    if isinstance(obj, (tuple, list)):
        for x in obj:
            _flatten_args(x, out)
    elif isinstance(obj, dict):
        for x in obj.values():
            _flatten_args(x, out)
    elif isinstance(obj, slice):
        for x in (obj.start, obj.stop, obj.step):
            _flatten_args(x, out)
    else:
        out.append(obj)


def _map_args(obj, fn: Callable[[fx.Node], Any]):
    if isinstance(obj, fx.Node):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_args(x, fn) for x in obj)
    if isinstance(obj, list):
        return [_map_args(x, fn) for x in obj]
    if isinstance(obj, dict):
        return {k: _map_args(v, fn) for k, v in obj.items()}
    if isinstance(obj, slice):
        return slice(_map_args(obj.start, fn), _map_args(obj.stop, fn), _map_args(obj.step, fn))
    return obj


def _is_size_value(v) -> bool:
    if isinstance(v, (torch.SymInt, int)) and not isinstance(v, bool):
        return True
    return isinstance(v, (tuple, list, torch.Size)) and all(_is_size_value(x) for x in v) and len(v) > 0


def _placeholder_kind(node: fx.Node) -> Tuple[str, Optional[torch.Tensor]]:
    """("buffer", real value) | ("parameter", None) | ("input", None) for a tensor placeholder."""
    grapharg = node.meta.get("grapharg")
    if grapharg is None:
        return "input", None
    source = getattr(grapharg, "source", None)
    name = getattr(source, "name", "") if source is not None else ""
    name = name() if callable(name) else str(name)
    try:
        example = grapharg.example
    except Exception:
        example = None
    if isinstance(example, torch.nn.Parameter) or "._parameters[" in name:
        return "parameter", None
    if "._buffers[" in name and isinstance(example, torch.Tensor):
        return "buffer", example
    return "input", None


def _mutates(user: fx.Node, node: fx.Node) -> bool:
    if not user.args or user.args[0] is not node:
        return False
    if user.op == "call_method":
        return isinstance(user.target, str) and user.target.endswith("_") and not user.target.startswith("__")
    if user.op == "call_function":
        name = getattr(user.target, "__name__", "")
        return user.target in _INPLACE_FUNCTIONS or (name.endswith("_") and not name.startswith("__"))
    return False


def _extract(gm: fx.GraphModule, mask: fx.Node) -> _Slice:
    s = _Slice()
    seen: Dict[fx.Node, str] = {}
    stack: List[Tuple[fx.Node, str]] = [(mask, "value")]
    while stack:
        node, role = stack.pop()
        if seen.get(node) == "value" or seen.get(node) == role:
            continue
        seen[node] = "value" if role == "value" else seen.get(node, "meta")
        value = node.meta.get("example_value")
        if _is_size_value(value) and node is not mask:
            s.sizes.append(node)
            continue
        if role == "meta":
            s.meta.append(node)
            continue
        if node.op == "placeholder":
            if not isinstance(value, torch.Tensor):
                raise _General(f"input {node.name} is not a tensor")
            kind, real = _placeholder_kind(node)
            if kind == "parameter":
                raise _General(f"the mask reads the parameter {node.name}")
            if kind == "buffer":
                s.constants[node] = real
            else:
                if s.padding is not None and s.padding is not node:
                    raise _General("the mask reads more than one graph input")
                if value.dim() != 2:
                    raise _General(f"the mask reads the input {node.name} of {value.dim()} dims")
                s.padding = node
            continue
        if node.op == "get_attr":
            real = _fetch_attr(gm, node.target)
            if isinstance(real, torch.nn.Parameter) or not isinstance(real, torch.Tensor):
                raise _General(f"the mask reads the attribute {node.target}")
            s.constants[node] = real
            continue
        if node.op == "call_function":
            if node.target not in _FUNCTIONS and node.target not in _META_ONLY_FUNCTIONS:
                raise _General(f"{getattr(node.target, '__name__', node.target)} is not index arithmetic")
            meta_positions = _META_ONLY_FUNCTIONS.get(node.target, ())
        elif node.op == "call_method":
            if node.target not in _METHODS:
                raise _General(f".{node.target}() is not index arithmetic")
            meta_positions = _META_ONLY_METHODS.get(node.target, ())
        else:
            raise _General(f"{node.op} {node.target} in the mask")
        s.nodes.append(node)
        for i, arg in enumerate(node.args):
            found: List[Any] = []
            _flatten_args(arg, found)
            for x in found:
                if isinstance(x, fx.Node):
                    stack.append((x, "meta" if i in meta_positions else "value"))
                elif isinstance(x, int) and not isinstance(x, bool):
                    s.literals.append(abs(x))
        found = []
        _flatten_args(node.kwargs, found)
        for x in found:
            if isinstance(x, fx.Node):
                stack.append((x, "value"))
            elif isinstance(x, int) and not isinstance(x, bool):
                s.literals.append(abs(x))
    # In-place ops: every mutation of a value the mask reads must be part of the construction, and no
    # graph input or buffer may be mutated by it.
    computed = set(s.nodes)
    for node in list(s.nodes) + list(s.constants) + ([s.padding] if s.padding is not None else []):
        for user in node.users:
            if _mutates(user, node):
                if user not in computed:
                    raise _General(f"{node.name} is mutated by {user.name} outside the mask's construction")
                if node.op in ("placeholder", "get_attr"):
                    raise _General(f"the construction mutates the input {node.name}")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    s.nodes = sorted(set(s.nodes), key=order.__getitem__)
    s.meta = [n for n in dict.fromkeys(s.meta) if seen.get(n) == "meta"]
    return s


def _fetch_attr(gm: fx.GraphModule, target: str):
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ----------------------------------------------------------------------------------------------------
# 2. Evaluation under concrete sizes


class _Sizes:
    """Concrete values for the graph's size symbols: the traced hints, or probes."""

    def __init__(self, values: Dict[Any, int]):
        self.values = values

    def __call__(self, x):
        if isinstance(x, bool):
            return x
        if isinstance(x, int):
            return x
        if isinstance(x, torch.SymInt):
            import sympy
            expr = x.node.expr
            if not expr.free_symbols <= set(self.values):
                raise _General("a size depends on a symbol without a value")
            return int(expr.xreplace({k: sympy.Integer(v) for k, v in self.values.items()}))
        if isinstance(x, (tuple, list, torch.Size)):
            return type(x)(self(v) for v in x) if not isinstance(x, torch.Size) else torch.Size([self(v) for v in x])
        raise _General(f"cannot make {type(x).__name__} concrete")


def _symbols(x, symbols: set, envs: Dict[int, Any]) -> None:
    """Collect the size symbols of a SymInt, a shape or a tensor, and the shape envs that know their hints."""
    if isinstance(x, torch.SymInt):
        symbols.update(x.node.expr.free_symbols)
        envs[id(x.node.shape_env)] = x.node.shape_env
    elif isinstance(x, (tuple, list, torch.Size)):
        for v in x:
            _symbols(v, symbols, envs)
    elif isinstance(x, torch.Tensor):
        _symbols(tuple(x.shape), symbols, envs)


def _evaluate(s: _Slice, mask: fx.Node, sizes: _Sizes, padding: Optional[torch.Tensor]) -> torch.Tensor:
    env: Dict[fx.Node, Any] = {}
    for node in s.sizes:
        env[node] = sizes(node.meta["example_value"])
    for node in s.meta:
        fake = node.meta["example_value"]
        env[node] = torch.empty(sizes(tuple(fake.shape)), dtype=fake.dtype, device=fake.device)
    for node, real in s.constants.items():
        env[node] = real.clone()
    if s.padding is not None:
        env[s.padding] = padding
    for node in s.nodes:
        args = _map_args(node.args, env.__getitem__)
        kwargs = _map_args(dict(node.kwargs), env.__getitem__)
        if node.op == "call_function":
            env[node] = node.target(*args, **kwargs)
        else:
            env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
    return env[mask]


def _attend(value: torch.Tensor) -> torch.Tensor:
    """A mask value as bool "attend", with broadcast (stride-0) dims cut to size 1."""
    if not isinstance(value, torch.Tensor):
        raise _General("the mask is not a tensor")
    index = tuple(slice(0, 1) if st == 0 and sz > 1 else slice(None) for st, sz in zip(value.stride(), value.shape))
    value = value[index]
    if value.dtype == torch.bool:
        return value
    if not value.is_floating_point():
        raise _General(f"a mask of dtype {value.dtype}")
    attend = value == 0
    # a value at or below float16's smallest (finfo.min, -1e9: what eager paths add) gives weight exactly 0 to
    # its key in every row that sees any key, as -inf does; rows that see none return 0 (the op's rule)
    if not bool((attend | (value <= _LARGE_NEGATIVE)).all()):
        raise _General("an additive mask with values other than 0 and -inf (or <= -65504)")
    return attend


# ----------------------------------------------------------------------------------------------------
# 3. The classes and the proof


_CONVERT = {"ne0": lambda p: p != 0, "eq0": lambda p: p == 0}


def _classify(gm: fx.GraphModule, site: Site, mask: fx.Node):
    """(base, window, padding node, convert) or _General."""
    q, k = site.value("q"), site.value("k")
    mask_value = mask.meta.get("example_value")
    if not all(isinstance(x, torch.Tensor) for x in (q, k, mask_value)) or q.dim() != 4 or k.dim() != 4:
        raise _General("q, k or the mask has no 4-D traced value")
    if mask_value.dim() > 4:
        raise _General("a mask of more than 4 dims")
    traced = [_hint(sz) for sz, st in zip(mask_value.shape, mask_value.stride()) if _hint(st) != 0]
    if math.prod(traced) > _MAX_ELEMENTS:
        raise _General("the mask is too large to evaluate")
    s = _extract(gm, mask)
    padding_fake = s.padding.meta["example_value"] if s.padding is not None else None
    probes = _probe_sizes(s, q, k, padding_fake)
    # The class comes from the largest probe (a window wider than the traced length shows there) ...
    largest = probes[-1]
    hypotheses = []
    for convert in ([None, "ne0", "eq0"] if s.padding is not None else [None]):
        try:
            base, window = _base_class(s, mask, largest, q, k, padding_fake, convert)
        except _General:
            continue
        hypotheses.append((base, window, convert))
    # ... and must hold at every probe, for every padding pattern.
    for base, window, convert in hypotheses:
        if all(_holds(s, mask, sizes, q, k, padding_fake, base, window, convert) for sizes in probes):
            return base, window, (s.padding if convert is not None else None), convert
    raise _General("the mask matches no class")


def _probe_sizes(s: _Slice, q, k, padding_fake) -> List[_Sizes]:
    symbols: set = set()
    envs: Dict[int, Any] = {}
    for x in [q, k, padding_fake] + [n.meta["example_value"] for n in s.sizes + s.meta]:
        if x is not None:
            _symbols(x, symbols, envs)
    if not symbols:
        return [_Sizes({})]
    hints: Dict[Any, int] = {}
    for sym in symbols:
        for shape_env in envs.values():
            known = getattr(shape_env, "backed_var_to_val", None)
            if known is None:
                known = shape_env.var_to_val
            if sym in known:
                hints[sym] = int(known[sym])
                break
        else:
            raise _General(f"the size {sym} has no traced value")
    probes = [_Sizes(dict(hints)), _Sizes({sym: v + 3 for sym, v in hints.items()})]
    seq = set()
    for x in (q.shape[2], k.shape[2]):
        if isinstance(x, torch.SymInt):
            seq |= x.node.expr.free_symbols
    # Sizes traced equal to a sequence length move with it (Dynamo may give the input ids and the
    # attention mask distinct symbols that are equal at run time).
    seq |= {sym for sym, v in hints.items() if any(v == hints[t] for t in seq if t in hints)}
    reach = max(s.literals, default=0) + 2
    if seq and reach > max(hints[sym] for sym in seq):
        if reach > _MAX_PROBE_LEN or _hint(q.shape[0]) * reach * reach > _MAX_ELEMENTS:
            raise _General(f"a constant {reach - 2} beyond the probed lengths with symbolic shapes")
        probes.append(_Sizes({sym: (reach if sym in seq else v) for sym, v in hints.items()}))
    return probes


def _hint(x) -> int:
    if isinstance(x, torch.SymInt):
        hint = x.node.hint
        if hint is None:
            raise _General("a size without a traced value")
        return int(hint)
    return int(x)


def _shape(sizes: _Sizes, q, k) -> Tuple[int, int, int, int]:
    B, H, nq = (sizes(x) for x in q.shape[:3])
    return B, H, nq, sizes(k.shape[2])


def _padding_pattern(kind: str, B: int, n: int, g: torch.Generator) -> torch.Tensor:
    """A bool [B, n] "attend" pattern."""
    if kind == "full":
        return torch.ones(B, n, dtype=torch.bool)
    if kind == "empty":
        return torch.zeros(B, n, dtype=torch.bool)
    j = torch.arange(n)
    if kind in ("left", "right"):
        pad = torch.randint(0, n, (B,), generator=g)
        pad[0] = 0 if B > 1 else max(1, n // 3)
        keep = j[None, :] >= pad[:, None] if kind == "left" else j[None, :] < (n - pad)[:, None]
        return keep
    pattern = torch.rand(B, n, generator=g) < 0.5       # random, with a fully padded row
    pattern[-1] = False
    if B > 1:
        pattern[0] = True
    return pattern


def _padding_tensor(attend: torch.Tensor, convert: str, fake) -> torch.Tensor:
    value = attend if convert == "ne0" else ~attend
    return value.to(dtype=fake.dtype, device=fake.device)


def _general_values(B: int, n: int, fake, g: torch.Generator) -> torch.Tensor:
    if fake.dtype == torch.bool:
        return (torch.rand(B, n, generator=g) < 0.5).to(fake.device)
    if fake.is_floating_point():
        x = torch.randn(B, n, generator=g) * 3
        x[torch.rand(B, n, generator=g) < 0.3] = 0
        return x.to(dtype=fake.dtype, device=fake.device)
    return torch.randint(-3, 4, (B, n), generator=g).to(dtype=fake.dtype, device=fake.device)


def _reference(base: str, window: Optional[int], nq: int, nk: int, device) -> torch.Tensor:
    # query row i sits at position Nk - Nq + i (the op's causal masking, aligned bottom-right: a cache's masks)
    i = torch.arange(nq, device=device)[:, None] + (nk - nq)
    j = torch.arange(nk, device=device)[None, :]
    if base == "none":
        return torch.ones(nq, nk, dtype=torch.bool, device=device)
    if base == "causal":
        return j <= i
    return (j <= i) & (i - j < window)


def _check_shape(attend: torch.Tensor, shape: Tuple[int, int, int, int]) -> torch.Tensor:
    if torch.broadcast_shapes(attend.shape, shape) != torch.Size(shape):
        raise _General(f"a mask of shape {tuple(attend.shape)} for attention of shape {shape}")
    while attend.dim() < 4:
        attend = attend[None]
    if math.prod(attend.shape) > _MAX_ELEMENTS:
        raise _General("the mask is too large to evaluate")
    return attend


def _padding_input(s: _Slice, sizes: _Sizes, padding_fake, B: int, nk: int) -> Tuple[int, int]:
    shape = tuple(sizes(tuple(padding_fake.shape)))
    if shape != (B, nk):
        raise _General(f"the padding input has shape {shape}, not [B, Nk] = {(B, nk)}")
    return shape


def _base_class(s: _Slice, mask: fx.Node, sizes: _Sizes, q, k, padding_fake, convert):
    """The class of the mask when no key is padded: ("none" | "causal" | "window", w)."""
    B, H, nq, nk = _shape(sizes, q, k)
    padding = None
    if s.padding is not None:
        _padding_input(s, sizes, padding_fake, B, nk)
        full = _padding_pattern("full", B, nk, torch.Generator().manual_seed(0))
        padding = _padding_tensor(full, convert or "ne0", padding_fake)
    attend = _check_shape(_attend(_evaluate(s, mask, sizes, padding)), (B, H, nq, nk))
    base = attend[0, 0].expand(nq, nk)
    if not bool((attend == base).all()):
        raise _General("the mask differs across batch or heads with no padding")
    device = base.device
    if bool(base.all()):
        return "none", None
    if torch.equal(base, _reference("causal", None, nq, nk, device)):
        return "causal", None
    window = int(base.sum(-1).max())
    if 0 < window and torch.equal(base, _reference("window", window, nq, nk, device)):
        return "window", window
    raise _General("not causal, not a sliding window")


def _holds(s: _Slice, mask: fx.Node, sizes: _Sizes, q, k, padding_fake, base, window, convert) -> bool:
    try:
        B, H, nq, nk = _shape(sizes, q, k)
        if s.padding is not None:
            _padding_input(s, sizes, padding_fake, B, nk)
        g = torch.Generator().manual_seed(1234)
        trials: List[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = []    # (input, attend [B, nk])
        if s.padding is None:
            trials.append((None, None))
        else:
            large = B * nq * nk > (1 << 24)             # long sequences: one pattern of each kind
            kinds = ["full", "left", "right", "random", "empty"] + ([] if large else ["left", "right", "random"])
            for kind in kinds:
                attend = _padding_pattern(kind, B, nk, g)
                if convert is None:
                    trials.append((_padding_tensor(attend, "ne0", padding_fake), None))
                else:
                    trials.append((_padding_tensor(attend, convert, padding_fake), attend))
            for _ in range(1 if large else 2):   # values other than 0 / 1: the conversion must be `!= 0` / `== 0` exactly
                value = _general_values(B, nk, padding_fake, g)
                trials.append((value, _CONVERT[convert](value).cpu() if convert is not None else None))
        ref = None
        for padding, key_attend in trials:
            attend = _check_shape(_attend(_evaluate(s, mask, sizes, padding)), (B, H, nq, nk))
            if ref is None:
                ref = _reference(base, window, nq, nk, attend.device)
            expected = ref[None, None]
            if key_attend is not None:
                expected = expected & key_attend.to(attend.device)[:, None, None, :]
            if not bool((attend == expected).all()):
                return False
        return True
    except _General:
        return False


# ----------------------------------------------------------------------------------------------------
# 4. The key padding node


def _key_padding_node(gm: fx.GraphModule, padding: fx.Node, convert: str) -> fx.Node:
    """A bool [B, Nk] node (True = attend) computed from the padding input; shared by every site."""
    key = (padding.name, convert)
    for node in gm.graph.nodes:
        if node.meta.get("danon_key_padding") == key:
            return node
    first = next((n for n in gm.graph.nodes if n.op != "placeholder"), None)
    target = torch.ne if convert == "ne0" else torch.eq
    with gm.graph.inserting_before(first) if first is not None else gm.graph.inserting_after(padding):
        node = gm.graph.call_function(target, (padding, 0))
    node.meta["danon_key_padding"] = key
    fake = padding.meta.get("example_value")
    if fake is not None:
        try:
            node.meta["example_value"] = target(fake, 0)
        except Exception:
            pass
    return node


__all__ = ["classify_mask"]
