"""Expand fused module calls into projections + one F.scaled_dot_product_attention, so the SDPA recogniser sees them.

What Dynamo hands the backend (torch 2.13):

- nn.MultiheadAttention: one call of `torch.nn.functional.multi_head_attention_forward` on [N, B, E]
  inputs (batch_first modules transpose around the call; their key_padding_mask arrives already
  turned into an additive float mask). When the attention weights are not needed (need_weights=False,
  or nothing reads them and no dropout is drawn on them), the call becomes what the function itself
  computes on its SDPA path: the in-projection (one packed F.linear for self-attention, as
  F._in_projection_packed does), the heads split to [B, H, N, D], one SDPA call with the merged
  float mask [B or 1, H or 1, Nq, Nk] and the same dropout / is_causal, and the output projection.
  The output keeps the module's shape and layout (a contiguous [N, B, E]); the values are those of
  the same ops, reordered only where they do not round differently (a 3-D F.linear is the same addmm).
- nn.TransformerEncoderLayer in eval under no_grad: one call of `torch._transformer_encoder_layer_fwd`
  (the fused fast path). It becomes what the layer computes on its standard path: the attention
  above (through [N, B, E], as the module does), residual adds, F.layer_norm (before or after, per
  norm_first), and the feed-forward block (F.linear, F.relu or F.gelu, F.linear). The fast path
  reads its mask as "masked where nonzero" (not additively): the expansion passes SDPA the same
  bool mask `mask == 0`, so a float src_mask of any values means what it meant. One difference
  stays: a query whose keys are all masked (a fully padded sequence) gives NaN on the fast path
  and a finite value (attention output 0, as SDPA and the standard path give) after expansion.

Calls kept as they are, each returned as a Site with source "module" and the reason: attention
weights that are used, add_bias_kv / add_zero_attn / static_k / static_v, unbatched inputs,
arguments only known at run time, nested-tensor inputs, and `torch._native_multi_head_attention`.
"""
from __future__ import annotations

import inspect
import numbers
import operator
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from danon.core import torch_internals

from .site import Site

MHA_TARGETS = {F.multi_head_attention_forward}
ENCODER_LAYER_TARGETS = {torch_internals.TRANSFORMER_ENCODER_LAYER_FWD, torch.ops.aten._transformer_encoder_layer_fwd.default}
NATIVE_MHA_TARGETS = {torch_internals.NATIVE_MULTI_HEAD_ATTENTION, torch.ops.aten._native_multi_head_attention.default}

_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
_ENCODER_LAYER_PARAMS = ("src", "embed_dim", "num_heads", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias",
                         "use_gelu", "norm_first", "eps", "norm_weight_1", "norm_bias_1", "norm_weight_2",
                         "norm_bias_2", "ffn_weight_1", "ffn_bias_1", "ffn_weight_2", "ffn_bias_2", "mask",
                         "mask_type")


class _Keep(Exception):
    """The call stays as it is; the message is the report's reason."""


def expand_module_calls(gm: fx.GraphModule) -> List[Site]:
    """Rewrite module-level attention calls so the SDPA recogniser sees them; returns the sites kept as they are.

    Example:
        >>> import torch
        >>> mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        >>> kept, sdpa = [], []
        >>> def backend(gm, inputs):
        ...     kept.extend(expand_module_calls(gm))
        ...     sdpa.extend(n for n in gm.graph.nodes if n.target is torch.nn.functional.scaled_dot_product_attention)
        ...     gm.recompile()
        ...     return gm.forward
        >>> x = torch.randn(2, 8, 16)
        >>> out = torch.compile(lambda x: mha(x, x, x, need_weights=False)[0], backend=backend)(x)
        >>> len(kept), len(sdpa), torch.allclose(out, mha(x, x, x, need_weights=False)[0], atol=1e-6)
        (0, 1, True)
    """
    kept = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in MHA_TARGETS:
            expand = _expand_mha
            what = "nn.MultiheadAttention (F.multi_head_attention_forward)"
        elif node.target in ENCODER_LAYER_TARGETS:
            expand = _expand_encoder_layer
            what = "fused TransformerEncoderLayer fast path"
        elif node.target in NATIVE_MHA_TARGETS:
            kept.append(Site(node=node, source="module", mask_class="unknown",
                             kept="fused MultiheadAttention fast path (torch._native_multi_head_attention) is not expanded"))
            continue
        else:
            continue
        emitter = _Emitter(gm, node)
        try:
            expand(emitter, node)
        except _Keep as why:
            emitter.rollback()
            kept.append(Site(node=node, source="module", mask_class="unknown", kept=f"{what} ({why})"))
        except Exception as error:    # an expansion that cannot be traced: keep the call, say why
            emitter.rollback()
            kept.append(Site(node=node, source="module", mask_class="unknown",
                             kept=f"{what} (not expanded: {type(error).__name__}: {error})"))
    return kept


# ----------------------------------------------------------------------------------------------------
# Emitting nodes with their traced (fake) values


class _Emitter:
    """Inserts nodes before `anchor`, each with meta["example_value"] computed on the fake inputs."""

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node):
        self.gm, self.anchor = gm, anchor
        self.created: List[fx.Node] = []
        values = [n.meta.get("example_value") for n in anchor.all_input_nodes]
        # The mode of the traced values themselves (the backend's tracing context may hold another one).
        self.fake_mode = next((v.fake_mode for v in values if isinstance(v, torch_internals.fake_tensor_type())), None)
        self.meta = {k: anchor.meta[k] for k in ("stack_trace", "nn_module_stack", "source_fn_stack")
                     if k in anchor.meta}

    @staticmethod
    def value(x):
        if isinstance(x, fx.Node):
            if "example_value" not in x.meta:
                raise _Keep(f"{x.name} has no traced value")
            return x.meta["example_value"]
        return x

    def _fake(self, fn: Callable, args, kwargs):
        args = fx.node.map_aggregate(args, self.value)
        kwargs = fx.node.map_aggregate(kwargs, self.value)
        if self.fake_mode is not None:
            with self.fake_mode:
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    def _add(self, op: str, target, args, kwargs, fn: Callable) -> fx.Node:
        value = self._fake(fn, args, kwargs)
        with self.gm.graph.inserting_before(self.anchor):
            node = self.gm.graph.create_node(op, target, tuple(args), dict(kwargs))
        node.meta.update(self.meta)
        node.meta["example_value"] = value
        self.created.append(node)
        return node

    def call(self, fn: Callable, *args, **kwargs) -> fx.Node:
        return self._add("call_function", fn, args, kwargs, fn)

    def method(self, name: str, *args, **kwargs) -> fx.Node:
        return self._add("call_method", name, args, kwargs, lambda self_, *a, **k: getattr(self_, name)(*a, **k))

    def rollback(self) -> None:
        for node in reversed(self.created):
            if not node.users:
                self.gm.graph.erase_node(node)
        self.created = []


def _constant(name: str, value, kind=None):
    """A Python constant argument; a value computed at run time keeps the call."""
    if isinstance(value, fx.Node) or isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        raise _Keep(f"{name} is computed at run time")
    if kind is not None and value is not None and not isinstance(value, kind):
        raise _Keep(f"{name} is a {type(value).__name__}")
    return value


def _hint(x) -> int:
    """A size's traced value, without adding a guard for a symbolic one."""
    if isinstance(x, torch.SymInt):
        if x.node.hint is None:
            raise _Keep("a size without a traced value")
        return int(x.node.hint)
    return int(x)


def _tensor(em: _Emitter, name: str, node) -> Optional[torch.Tensor]:
    if node is None:
        return None
    if not isinstance(node, fx.Node):
        raise _Keep(f"{name} is not a graph value")
    value = em.value(node)
    if not isinstance(value, torch.Tensor):
        raise _Keep(f"{name} is not a tensor")
    if value.is_nested:
        raise _Keep(f"{name} is a nested tensor")
    return value


# ----------------------------------------------------------------------------------------------------
# The attention core shared by both expansions


def _attention(em: _Emitter, query: fx.Node, key: fx.Node, value: fx.Node, num_heads: int, embed_dim: int,
               in_proj_weight, in_proj_bias, separate_weights, out_proj_weight, out_proj_bias,
               sdpa_mask: Optional[fx.Node], dropout_p: float, is_causal: bool) -> fx.Node:
    """[Nq, B, E] inputs -> the attention block's [Nq, B, E] output, as F.multi_head_attention_forward's SDPA path."""
    E, H = embed_dim, num_heads
    D = E // H
    if separate_weights is None:
        q, k, v = _in_projection_packed(em, query, key, value, in_proj_weight, in_proj_bias, E)
    else:
        w_q, w_k, w_v = separate_weights
        if in_proj_bias is None:
            b_q = b_k = b_v = None
        else:
            chunks = em.method("chunk", in_proj_bias, 3)
            b_q, b_k, b_v = (em.call(operator.getitem, chunks, i) for i in range(3))
        q, k, v = (em.call(F.linear, x, w, b) for x, w, b in ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v)))
    # [N, B, E] -> [B, H, N, D]: the same view as .view(N, B * H, D).transpose(0, 1).view(B, H, N, D)
    heads = [em.method("permute", em.method("unflatten", x, -1, (H, D)), 1, 2, 0, 3) for x in (q, k, v)]
    kwargs: Dict[str, Any] = {"attn_mask": sdpa_mask, "dropout_p": dropout_p, "is_causal": is_causal}
    out = em.call(F.scaled_dot_product_attention, *heads, **kwargs)
    out.meta["danon_source"] = "module"           # the report says where the site came from
    # [B, H, Nq, D] -> [Nq, B, E] (contiguous), then the output projection (a 3-D linear is the same addmm)
    out = em.method("flatten", em.method("permute", out, 2, 0, 1, 3), 2)
    return em.call(F.linear, out, out_proj_weight, out_proj_bias)


def _in_projection_packed(em: _Emitter, q, k, v, w, b, E: int):
    """F._in_projection_packed, op for op (self-attention: one linear; k is v: two; else three)."""
    if k is v:
        if q is k:
            proj = em.call(F.linear, q, w, b)
            proj = em.method("unflatten", proj, -1, (3, E))
            proj = em.method("contiguous", em.method("squeeze", em.method("transpose", em.method("unsqueeze", proj, 0),
                                                                             0, -2), -2))
            return tuple(em.call(operator.getitem, proj, i) for i in range(3))
        w_split = em.method("split", w, [E, E * 2])
        w_q, w_kv = em.call(operator.getitem, w_split, 0), em.call(operator.getitem, w_split, 1)
        if b is None:
            b_q = b_kv = None
        else:
            b_split = em.method("split", b, [E, E * 2])
            b_q, b_kv = em.call(operator.getitem, b_split, 0), em.call(operator.getitem, b_split, 1)
        q_proj = em.call(F.linear, q, w_q, b_q)
        kv = em.call(F.linear, k, w_kv, b_kv)
        kv = em.method("unflatten", kv, -1, (2, E))
        kv = em.method("contiguous", em.method("squeeze", em.method("transpose", em.method("unsqueeze", kv, 0),
                                                                       0, -2), -2))
        return q_proj, em.call(operator.getitem, kv, 0), em.call(operator.getitem, kv, 1)
    w_chunks = em.method("chunk", w, 3)
    ws = [em.call(operator.getitem, w_chunks, i) for i in range(3)]
    if b is None:
        bs = [None, None, None]
    else:
        b_chunks = em.method("chunk", b, 3)
        bs = [em.call(operator.getitem, b_chunks, i) for i in range(3)]
    return tuple(em.call(F.linear, x, wi, bi) for x, wi, bi in zip((q, k, v), ws, bs))


def _canonical_float_mask(em: _Emitter, mask: Optional[fx.Node], name: str, dtype) -> Optional[fx.Node]:
    """F._canonical_mask: a bool mask (True = masked) becomes 0 / -inf of `dtype`; a float mask stays."""
    if mask is None:
        return None
    value = _tensor(em, name, mask)
    if value.dtype == torch.bool:
        zeros = em.call(torch.zeros_like, mask, dtype=dtype)
        return em.method("masked_fill", zeros, mask, float("-inf"))
    if not value.is_floating_point():
        raise _Keep(f"{name} of dtype {value.dtype}")
    return mask


def _replace_output(em: _Emitter, call: fx.Node, output: fx.Node, getitems: Dict[int, List[fx.Node]]) -> None:
    for getitem in getitems.get(0, []):
        getitem.replace_all_uses_with(output)
        em.gm.graph.erase_node(getitem)
    for getitem in getitems.get(1, []):
        em.gm.graph.erase_node(getitem)
    em.gm.graph.erase_node(call)


def _tuple_users(call: fx.Node) -> Dict[int, List[fx.Node]]:
    users: Dict[int, List[fx.Node]] = {}
    for user in call.users:
        if user.op != "call_function" or user.target is not operator.getitem or user.args[0] is not call \
                or not isinstance(user.args[1], int) or user.kwargs:
            raise _Keep("its output tuple is used whole")
        users.setdefault(user.args[1], []).append(user)
    return users


# ----------------------------------------------------------------------------------------------------
# nn.MultiheadAttention


def _expand_mha(em: _Emitter, call: fx.Node) -> None:
    try:
        bound = _MHA_SIGNATURE.bind(*call.args, **call.kwargs)
    except TypeError as error:
        raise _Keep(f"unexpected arguments: {error}")
    bound.apply_defaults()
    a = bound.arguments
    E = _constant("embed_dim_to_check", a["embed_dim_to_check"], int)
    H = _constant("num_heads", a["num_heads"], int)
    add_zero_attn = _constant("add_zero_attn", a["add_zero_attn"], bool)
    dropout_p = _constant("dropout_p", a["dropout_p"], numbers.Real)
    training = _constant("training", a["training"], bool)
    need_weights = _constant("need_weights", a["need_weights"], bool)
    separate = _constant("use_separate_proj_weight", a["use_separate_proj_weight"], bool)
    is_causal = _constant("is_causal", a["is_causal"], bool)
    if a["bias_k"] is not None or a["bias_v"] is not None:
        raise _Keep("add_bias_kv")
    if add_zero_attn:
        raise _Keep("add_zero_attn")
    if a["static_k"] is not None or a["static_v"] is not None:
        raise _Keep("static_k / static_v")
    query, key, value = a["query"], a["key"], a["value"]
    q_val, k_val, v_val = (_tensor(em, n, a[n]) for n in ("query", "key", "value"))
    if q_val is None or q_val.dim() != 3 or k_val.dim() != 3 or v_val.dim() != 3:
        raise _Keep("unbatched inputs")
    if not q_val.is_floating_point():
        raise _Keep(f"inputs of dtype {q_val.dtype}")
    if _hint(q_val.shape[-1]) != E or E % H:
        raise _Keep(f"embed_dim {E} with {H} heads and inputs of width {_hint(q_val.shape[-1])}")
    users = _tuple_users(call)
    if need_weights and users.get(1):
        raise _Keep("need_weights=True: the attention weights are used")
    dropout_p = float(dropout_p) if training else 0.0
    if need_weights and dropout_p > 0:
        raise _Keep("need_weights=True with dropout: the weights path draws its own dropout")
    if is_causal and a["attn_mask"] is None:
        raise _Keep("is_causal without attn_mask (the function raises)")
    if separate:
        weights = tuple(a[n] for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight"))
        if any(w is None for w in weights):
            raise _Keep("use_separate_proj_weight without the three weights")
        in_proj_weight = None
    else:
        weights, in_proj_weight = None, a["in_proj_weight"]
        if in_proj_weight is None:
            raise _Keep("no in_proj_weight")
        if [_hint(d) for d in k_val.shape] != [_hint(d) for d in v_val.shape]:
            raise _Keep("key and value shapes differ")
    dtype = q_val.dtype

    # Masks, merged as the function merges them, with the heads left to SDPA's broadcasting.
    key_padding_mask = _canonical_float_mask(em, a["key_padding_mask"], "key_padding_mask", dtype)
    sdpa_causal = bool(is_causal and key_padding_mask is None and not need_weights)
    attn_mask = None
    if not sdpa_causal:
        attn_mask = _canonical_float_mask(em, a["attn_mask"], "attn_mask", dtype)
    if attn_mask is not None:
        mask_val = em.value(attn_mask)
        if mask_val.dim() == 2:
            attn_mask = em.call(operator.getitem, attn_mask, (None, None))            # [1, 1, Nq, Nk]
        elif mask_val.dim() == 3:
            attn_mask = em.method("unflatten", attn_mask, 0, (-1, H))                 # [B, H, Nq, Nk]
        else:
            raise _Keep(f"a {mask_val.dim()}-D attn_mask")
    if key_padding_mask is not None:
        if em.value(key_padding_mask).dim() != 2:
            raise _Keep("a key_padding_mask that is not [B, Nk]")
        kpm = em.call(operator.getitem, key_padding_mask, (slice(None), None, None, slice(None)))   # [B, 1, 1, Nk]
        attn_mask = kpm if attn_mask is None else em.call(operator.add, attn_mask, kpm)
    out = _attention(em, query, key, value, H, E, in_proj_weight, a["in_proj_bias"], weights,
                     a["out_proj_weight"], a["out_proj_bias"], attn_mask, dropout_p, sdpa_causal)
    _replace_output(em, call, out, users)


# ----------------------------------------------------------------------------------------------------
# nn.TransformerEncoderLayer's fast path


def _expand_encoder_layer(em: _Emitter, call: fx.Node) -> None:
    if call.kwargs and set(call.kwargs) - set(_ENCODER_LAYER_PARAMS):
        raise _Keep("unexpected arguments")
    a = dict(zip(_ENCODER_LAYER_PARAMS, call.args))
    a.update(call.kwargs)
    a.setdefault("mask", None)
    a.setdefault("mask_type", None)
    src = a["src"]
    src_val = _tensor(em, "src", src)
    if src_val is None or src_val.dim() != 3:
        raise _Keep("src is not a [B, N, E] tensor")
    E = _constant("embed_dim", a["embed_dim"], int)
    H = _constant("num_heads", a["num_heads"], int)
    use_gelu = _constant("use_gelu", a["use_gelu"], bool)
    norm_first = _constant("norm_first", a["norm_first"], bool)
    eps = _constant("eps", a["eps"], numbers.Real)
    mask_type = _constant("mask_type", a["mask_type"], int)
    if _hint(src_val.shape[-1]) != E or E % H:
        raise _Keep(f"embed_dim {E} with {H} heads")
    # The fast path masks where the mask is nonzero (True for bool): SDPA gets the bool "attend" mask.
    mask, sdpa_mask = a["mask"], None
    if mask is not None:
        mask_val = _tensor(em, "mask", mask)
        expected_dim = {0: 2, 1: 2, 2: 4}.get(mask_type)
        if expected_dim is None or mask_val.dim() != expected_dim:
            raise _Keep(f"a {mask_val.dim()}-D mask of mask_type {mask_type}")
        attend = em.call(torch.eq, mask, 0)
        if mask_type == 1:
            sdpa_mask = em.call(operator.getitem, attend, (slice(None), None, None, slice(None)))   # [B, 1, 1, N]
        else:
            sdpa_mask = attend
    shape = (E,)

    def norm(x, i):
        return em.call(F.layer_norm, x, shape, a[f"norm_weight_{i}"], a[f"norm_bias_{i}"], float(eps))

    def self_attention(x):
        x_t = em.method("transpose", x, 1, 0)                     # [B, N, E] -> [N, B, E], as the module does
        out = _attention(em, x_t, x_t, x_t, H, E, a["qkv_weight"], a["qkv_bias"], None,
                         a["proj_weight"], a["proj_bias"], sdpa_mask, 0.0, False)
        return em.method("transpose", out, 1, 0)

    def feed_forward(x):
        h = em.call(F.linear, x, a["ffn_weight_1"], a["ffn_bias_1"])
        h = em.call(F.gelu if use_gelu else F.relu, h)
        return em.call(F.linear, h, a["ffn_weight_2"], a["ffn_bias_2"])

    x = src
    if norm_first:
        x = em.call(operator.add, x, self_attention(norm(x, 1)))
        x = em.call(operator.add, x, feed_forward(norm(x, 2)))
    else:
        x = norm(em.call(operator.add, x, self_attention(x)), 1)
        x = norm(em.call(operator.add, x, feed_forward(x)), 2)
    call.replace_all_uses_with(x)
    em.gm.graph.erase_node(call)


__all__ = ["expand_module_calls"]
