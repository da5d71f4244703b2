"""The shard pass: find attention blocks and MLPs in a captured FX graph and decide a tensor-parallel split.

Graph in, decisions out (no rewrite: the split is applied to the *module* by
`torch.distributed.tensor.parallel.parallelize_module`, see danon/shard.py). Module names come from
the nodes' `nn_module_stack` (Dynamo records, for every node, the modules it was called inside).

- Attention block: an attention site (SDPA calls and hand-written chains, found by the attention
  pass's entry point `find_sites`, and calls of `danon::attention`) whose q, k and v are each one `nn.Linear`
  seen through reshapes, transposes, casts and per-element ops (rotary embeddings), and whose output
  reaches one `nn.Linear` through the same kind of ops. q/k/v projections become column-parallel
  (each rank computes heads/world_size query heads and kv heads/world_size kv heads, whole GQA
  groups), the output projection row-parallel (one all-reduce). Kept replicated when a head count
  does not divide by the world size, when the projection sizes do not match the heads, when the
  block's module holds other parameters (per-head slopes, gates, routers would need a split of
  their own), or when a projection is shared.
- MLP: a `nn.Linear` ("down") whose input comes, through per-element ops only (activations,
  gating products, dropout), from one or more `nn.Linear`s ("up", "gate") that all read the same
  tensor. Up/gate column-parallel, down row-parallel; kept replicated when the intermediate size
  does not divide.
- Everything else (embeddings, norms, the LM head) stays replicated.
"""
from __future__ import annotations

import dataclasses
import operator
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from danon.core import torch_internals

from .attention import find_sites
from .site import Site

LINEAR_FNS = set(torch_internals.LINEAR_TARGETS)
DANON_OPS = ("danon.attention",)   # str(node.target) of the danon op's overloads

# ops a head can travel through unchanged: reshapes that keep [.., H*D] <-> [.., H, D], layout, casts
SHAPE_NAMES = {"view", "reshape", "transpose", "permute", "contiguous", "to", "type", "float", "half",
               "bfloat16", "unflatten", "flatten", "clone", "detach", "unsqueeze"}
# per-element ops (rotary embeddings on q/k, activations and gating in MLPs); their other operands
# must carry no head axis of their own (checked at run time by `danon.shard`'s verification)
ELEMENTWISE_NAMES = {"mul", "add", "sub", "truediv", "neg", "gelu", "silu", "relu", "sigmoid", "tanh", "erf",
                     "exp", "pow", "dropout", "softplus", "mish", "relu6", "leaky_relu", "elu", "selu",
                     "hardswish", "hardsigmoid", "square", "sqrt", "rsqrt", "abs"}
MLP_NAMES = ELEMENTWISE_NAMES | {"to", "type", "float", "half", "bfloat16", "contiguous", "clone"}
# head-preserving ops on the last axis only (rotate_half's slices and cat)
LAST_AXIS_NAMES = {"getitem", "cat", "concat", "chunk", "split"}

# attribute names attention modules keep their head counts in (danon.nn, transformers, common code)
QUERY_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "num_head", "heads")
KV_HEAD_ATTRS = ("num_kv_heads", "num_key_value_heads", "n_kv_heads", "n_kv_head", "num_kv_head", "kv_heads")


@dataclasses.dataclass
class Block:
    """One decision: an attention block or an MLP, split across ranks or kept replicated.

    kind: "attention" | "mlp". module: the qualified name of the module holding the block.
    colwise / rowwise: qualified names of the nn.Linear layers split by output / input features.
    heads, kv_heads, head_dim: for attention (global counts). intermediate: the MLP's width.
    sharded: True when the block is split; reason: why it is not (None when sharded).
    head_attrs: (module name, attribute, global value) of head counts to set to their local value.
    """

    kind: str
    module: str
    colwise: Tuple[str, ...] = ()
    rowwise: Tuple[str, ...] = ()
    heads: Optional[int] = None
    kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    intermediate: Optional[int] = None
    sharded: bool = False
    reason: Optional[str] = None
    head_attrs: Tuple[Tuple[str, str, int], ...] = ()

    @property
    def linears(self) -> Tuple[str, ...]:
        return self.colwise + self.rowwise


def module_path(stack_name: str) -> str:
    """Dynamo's nn_module_stack name ("L['self'].layers.0.attn", "L['args'][0].h[1]") -> "layers.0.attn".

    Example:
        >>> module_path("L['self'].layers.0.attention.q_proj"), module_path("L['args'][0].h[1]['mlp']")
        ('layers.0.attention.q_proj', 'h.1.mlp')
    """
    path = re.sub(r"^L\[[^\]]*\](\[[^\]]*\])*\.?", "", stack_name)      # the root: L['self'], L['args'][0]
    path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path)
    return path.lstrip(".")


class ModuleNames:
    """Qualified names (as in `model.named_modules()`) of the modules in nodes' nn_module_stack.

    Dynamo keys each stack entry by the module's id (with "@n" for its n-th call) when it inlines
    the module; the recorded source name is used when the id is unknown.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.by_id = {str(id(m)): name for name, m in model.named_modules(remove_duplicate=False)}

    def innermost(self, node: fx.Node) -> Optional[str]:
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return None
        key, (name, _) = list(stack.items())[-1]
        found = self.by_id.get(str(key).split("@")[0])
        return found if found is not None else module_path(name)

    def linear(self, node: fx.Node) -> Optional[str]:
        """The qualified name of the nn.Linear a linear node was called in, or None."""
        if node.op == "call_function" and node.target in LINEAR_FNS:
            path = self.innermost(node)
        elif node.op == "call_module":
            path = str(node.target)
        else:
            return None
        if path is None:
            return None
        try:
            mod = self.model.get_submodule(path)
        except AttributeError:
            return None
        return path if isinstance(mod, torch.nn.Linear) else None


def _name(node: fx.Node) -> Optional[str]:
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        if node.target is operator.getitem:
            return "getitem"
        return getattr(node.target, "__name__", None)
    return None


def _value(node) -> Optional[torch.Tensor]:
    v = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _int(x) -> int:
    if isinstance(x, torch.SymInt):
        return x.node.hint if x.node.hint is not None else -1
    return int(x)


def _last_axis_only(node: fx.Node) -> bool:
    """A slice / cat / split that acts on the last axis only (rotate_half), so heads stay apart."""
    name = _name(node)
    if name == "getitem":
        source, index = _value(node.args[0]), node.args[1]
        if source is None:                       # an item of split / chunk's tuple
            return isinstance(index, int)
        items = list(index) if isinstance(index, tuple) else [index]
        if Ellipsis in items:                    # x[..., a:b]
            return items.index(Ellipsis) == len(items) - 2 and isinstance(items[-1], slice)
        return (len(items) == source.dim() and isinstance(items[-1], slice)
                and all(isinstance(i, slice) and i == slice(None) for i in items[:-1]))
    if name in ("cat", "concat"):
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
        value = _value(tensors[0]) if tensors else None
    else:                                        # chunk / split (x, n, dim=0)
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
        value = _value(node.args[0])
    return value is not None and isinstance(dim, int) and dim % value.dim() == value.dim() - 1


def _tensor_inputs(node: fx.Node) -> List[fx.Node]:
    return [a for a in node.all_input_nodes if _value(a) is not None]


def producer_linears(node: fx.Node, names: ModuleNames, ops=None) -> Tuple[List[fx.Node], List[fx.Node]]:
    """Walk back from `node` through head-preserving ops; (linear nodes reached, dead ends reached).

    A dead end is a node that is neither a linear nor an op the walk goes through (a matmul, a
    norm, a graph input): the branch that reaches it brings in something the split does not cover.
    Branches of the same operand that carry no tensor (sizes, scalars) are ignored.
    """
    ops = (SHAPE_NAMES | ELEMENTWISE_NAMES | LAST_AXIS_NAMES) if ops is None else ops
    linears, dead, seen, todo = [], [], set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if names.linear(n) is not None:
            linears.append(n)
            continue
        name = _name(n)
        if name in ops and (name not in LAST_AXIS_NAMES or _last_axis_only(n)):
            todo.extend(_tensor_inputs(n))
        else:
            dead.append(n)
    return linears, dead


def consumer_linear(node: fx.Node, names: ModuleNames) -> Tuple[Optional[fx.Node], str]:
    """Walk forward from an attention output to the projection that reads it; (linear node, why not)."""
    n = node
    for _ in range(16):
        users = list(n.users)
        if len(users) != 1:
            return None, f"the attention output of {node.name} has {len(users)} users before a projection"
        user = users[0]
        if names.linear(user) is not None:
            if user.args[0] is not n:
                return None, f"the attention output of {node.name} reaches {user.name} not as its input"
            return user, ""
        name = _name(user)
        if name not in SHAPE_NAMES | ELEMENTWISE_NAMES or (user.args and user.args[0] is not n):
            return None, f"the attention output of {node.name} goes through {user.name} ({name}) before a projection"
        n = user
    return None, f"no projection found after the attention output of {node.name}"


def attention_sites(gm: fx.GraphModule) -> List[Site]:
    """Attention sites in a Dynamo graph: the attention pass's own (`find_sites`: k, v seen through
    repeat_kv, so they carry their own kv heads), those with q, k and v known, plus danon::attention calls."""
    # one recogniser entry point for the rewrite and the split: a pattern the attention pass learns is a
    # block the shard pass sees, with the same q, k, v nodes
    found = [site for site in find_sites(gm) if site.q is not None and site.k is not None and site.v is not None]
    for node in gm.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith(DANON_OPS):
            outs = [u for u in node.users if _name(u) == "getitem" and u.args[1] == 0]
            if len(outs) == 1:
                found.append(Site(outs[0], "danon", q=node.args[0], k=node.args[1], v=node.args[2]))
    return found


def _common_prefix(paths: Sequence[str]) -> str:
    parts = [p.split(".") for p in paths]
    out = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        out.append(level[0])
    return ".".join(out)


def _shared(model: torch.nn.Module, path: str) -> Optional[str]:
    """Another module name that shares a parameter of module `path` (tied weights), or None."""
    mod = model.get_submodule(path)
    ids = {id(p) for p in mod.parameters(recurse=False)}
    for name, sub in model.named_modules(remove_duplicate=False):
        if name != path and any(id(p) in ids for p in sub.parameters(recurse=False)):
            return name
    return None


def _head_attrs(model: torch.nn.Module, module: str, heads: int, kv_heads: int) -> Tuple[Tuple[str, str, int], ...]:
    mod = model.get_submodule(module)
    out = []
    for attrs, value in ((QUERY_HEAD_ATTRS, heads), (KV_HEAD_ATTRS, kv_heads)):
        for attr in attrs:
            current = mod.__dict__.get(attr)
            if isinstance(current, int) and not isinstance(current, bool) and current == value:
                out.append((module, attr, value))
    return tuple(out)


def _attention_block(site: Site, names: ModuleNames, world_size: int) -> Optional[Block]:
    model = names.model
    q, k, v = _value(site.q), _value(site.k), _value(site.v)
    if q is None or k is None or v is None or q.dim() != 4 or k.dim() != 4:
        return None
    heads, kv_heads, d, dv = _int(q.shape[1]), _int(k.shape[1]), _int(q.shape[3]), _int(v.shape[3])
    proj = {}
    for role, node in (("q", site.q), ("k", site.k), ("v", site.v)):
        linears, _ = producer_linears(node, names)
        paths = sorted({names.linear(n) for n in linears})
        if len(paths) != 1:
            module = names.innermost(site.node) or site.node.name
            why = ("is not produced by an nn.Linear seen through reshapes and per-element ops" if not paths
                   else f"depends on several projections ({', '.join(paths)})")
            return Block("attention", module, heads=heads, kv_heads=kv_heads, head_dim=d,
                         reason=f"{role} {why}")
        proj[role] = paths[0]
    out_node, why = consumer_linear(site.node, names)
    module = _common_prefix(list(proj.values()) + ([names.linear(out_node)] if out_node else []))
    block = Block("attention", module, heads=heads, kv_heads=kv_heads, head_dim=d)
    if out_node is None:
        block.reason = why
        return block
    proj["o"] = names.linear(out_node)
    block.colwise, block.rowwise = (proj["q"], proj["k"], proj["v"]), (proj["o"],)
    block.reason = _attention_reason(model, block, proj, heads, kv_heads, d, dv, world_size)
    if block.reason is None:
        block.sharded = True
        block.head_attrs = _head_attrs(model, module, heads, kv_heads)
    return block


def _attention_reason(model, block, proj, heads, kv_heads, d, dv, world_size) -> Optional[str]:
    if len(set(proj.values())) != 4:
        return "q, k, v and output projections are not four separate nn.Linear layers (fused projection)"
    expected = {"q": ("out_features", heads * d), "k": ("out_features", kv_heads * d),
                "v": ("out_features", kv_heads * dv), "o": ("in_features", heads * dv)}
    for role, (attr, size) in expected.items():
        got = getattr(model.get_submodule(proj[role]), attr)
        if got != size:
            return f"{proj[role]}.{attr} = {got} is not heads x head_dim = {size}"
    if heads % world_size:
        return f"{heads} query heads do not divide by world_size {world_size}"
    if kv_heads % world_size:
        return f"{kv_heads} kv heads do not divide by world_size {world_size}"
    for path in proj.values():
        other = _shared(model, path)
        if other is not None:
            return f"{path} shares its weights with {other}"
    linear_params = {id(p) for path in proj.values() for p in model.get_submodule(path).parameters()}
    own = [n for n, p in model.get_submodule(block.module).named_parameters() if id(p) not in linear_params]
    if own:
        return (f"the block holds parameters beside its projections ({', '.join(own[:4])}"
                f"{', ...' if len(own) > 4 else ''}) that would need a per-head split of their own")
    return None


def _mlp_block(down: fx.Node, names: ModuleNames, claimed, world_size: int) -> Optional[Block]:
    model = names.model
    down_path = names.linear(down)
    if down_path in claimed or not down.args:
        return None
    ups, dead = producer_linears(down.args[0], names, MLP_NAMES)
    if not ups or dead or down.args[0] in ups:   # linear -> linear with nothing between is no MLP
        return None
    up_paths = tuple(sorted({names.linear(u) for u in ups}))
    if len({u.args[0] for u in ups}) != 1 or any(p in claimed or p == down_path for p in up_paths):
        return None
    width = model.get_submodule(down_path).in_features
    block = Block("mlp", _common_prefix(up_paths + (down_path,)), colwise=up_paths, rowwise=(down_path,),
                  intermediate=width)
    sizes = {model.get_submodule(p).out_features for p in up_paths}
    if sizes != {width}:
        block.reason = f"up/gate widths {sorted(sizes)} do not match the down projection's {width} inputs"
    elif width % world_size:
        block.reason = f"intermediate size {width} does not divide by world_size {world_size}"
    else:
        for path in block.linears:
            other = _shared(model, path)
            if other is not None:
                block.reason = f"{path} shares its weights with {other}"
                break
    block.sharded = block.reason is None
    return block


def find_blocks(gm: fx.GraphModule, model: torch.nn.Module, world_size: int) -> List[Block]:
    """Attention blocks and MLPs of one captured graph of `model`, each decided for `world_size` ranks.

    Example:
        >>> import torch
        >>> from danon.models import create_dense_model
        >>> model = create_dense_model(hidden_size=32, num_heads=4, num_layers=1, vocab_size=20)
        >>> graphs = []
        >>> def capture(gm, inputs):
        ...     graphs.append(gm)
        ...     return gm.forward
        >>> _ = torch.compile(model, backend=capture)(torch.randint(0, 20, (1, 8)))
        >>> [(b.kind, b.module, b.sharded) for b in find_blocks(graphs[0], model, 2)]
        [('attention', 'layers.0.attention', True), ('mlp', 'layers.0.mlp', True)]
    """
    names = ModuleNames(model)
    blocks: Dict[Tuple[str, ...], Block] = {}
    for site in attention_sites(gm):
        block = _attention_block(site, names, world_size)
        if block is None:
            continue
        key = block.linears or ("site", block.module, block.reason)
        previous = blocks.get(key)
        if previous is None or (previous.sharded and not block.sharded):   # one bad site keeps the block whole
            blocks[key] = block
    claimed = {p for b in blocks.values() for p in b.linears}
    inside = tuple(b.module + "." for b in blocks.values() if b.module)   # an attention block's own layers
    for node in gm.graph.nodes:
        path = names.linear(node)
        if path is not None and not path.startswith(inside):
            block = _mlp_block(node, names, claimed, world_size)
            if block is not None and block.linears not in blocks:
                blocks[block.linears] = block
                claimed.update(block.linears)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    first = {}
    for node in gm.graph.nodes:
        path = names.linear(node)
        if path is not None:
            first.setdefault(path, order[node])
    return sorted(blocks.values(), key=lambda b: min((first.get(p, 1 << 30) for p in b.linears), default=1 << 30))


def merge_blocks(per_graph: Sequence[Sequence[Block]]) -> List[Block]:
    """Blocks of several graphs (graph breaks, several calls): one per set of layers, replicated if any says so."""
    merged: Dict[Tuple[str, ...], Block] = {}
    for blocks in per_graph:
        for b in blocks:
            key = b.linears or ("site", b.module, b.reason)
            if key not in merged or (merged[key].sharded and not b.sharded):
                merged[key] = b
    # a layer claimed by a sharded block and by another block: keep both replicated (conflicting roles)
    owners: Dict[str, List[Block]] = {}
    for b in merged.values():
        for p in b.linears:
            owners.setdefault(p, []).append(b)
    for path, bs in owners.items():
        if len(bs) > 1:
            for b in bs:
                if b.sharded:
                    b.sharded, b.reason = False, f"{path} plays a part in more than one block"
    return list(merged.values())


__all__ = ["Block", "find_blocks", "merge_blocks", "module_path", "ModuleNames", "attention_sites"]
