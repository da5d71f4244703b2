"""`danon::plan`: a sparse family's plan building as one op of its own.

Why an op: traced op by op, a plan builder's index arithmetic (block ids, top-k, compaction, MSRA's
levels, DALA's routed-token lists) is what Inductor spent minutes on once sizes went symbolic (sympy
in its loop tiling; a recompile of a 2-layer model at N = 4096 took over 100 s). As an op, Inductor
calls it as an extern kernel and compiles only what surrounds it; Dynamo and AOTAutograd still see
its output shapes through the fake impl, the builder's sizes in closed form (danon/core/plan_shapes.py).

The summaries (means of k and v) are differentiable: the backward, `danon::plan_backward`, takes the
vector-Jacobian product of the summary keys and values (selections carry no gradient, DESIGN.md section 3).
Each family's summaries are linear in k and v with a structure its plan holds, so the three have closed forms
(`msra_summary_backward`, `dala_summary_backward`, `ucsa_summary_backward`: one pass over the forward's plan,
which the op saves, instead of building the plan again); a family without one would rebuild the plan under
autograd. Exports decompose the op back into the builder's
ATen ops (`plan_decompositions`), so ONNX files hold the plan building as standard ops.

Example:
    >>> import torch, danon
    >>> from danon.core.plan_op import build_plan
    >>> q = torch.randn(1, 2, 256, 16)
    >>> plan = build_plan("msra", q, q, q, dict(causal=True, block_size=16, window=32, num_levels=2,
    ...                                          compression_factor=4, key_padding_mask=None))
    >>> plan.window, plan.summary_idx.shape[:3]
    (2, torch.Size([1, 2, 16]))
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from danon.core import Plan, alibi_slopes
from danon.core.attention_args import PLAN_TENSORS
from danon.core.families import FAMILIES
from danon.core.blocks import window_blocks
from danon.core.dala import dala_summary_backward
from danon.core.msra import msra_summary_backward
from danon.core.ucsa import ucsa_summary_backward
from danon.core.plan_shapes import plan_shapes
from danon.core.torch_internals import autograd_inside_op, backed_size_oblivious

__all__ = ["build_plan", "plan_op", "plan_backward_op", "plan_decompositions"]

# the plan's tensors, in the op's output order (a field the family leaves None is a 1-D empty tensor: every
# real plan tensor has two or more dims)
FIELDS = PLAN_TENSORS + ("key_block_counts",)
_SUMMARY_K, _SUMMARY_V = FIELDS.index("summary_k"), FIELDS.index("summary_v")
# callables given every plan the op builds on real tensors (danon.visualization.capture_plans)
observers: List = []


# the family's per-call tensor, the op's `per_call` argument
PER_CALL = {"dala": "importance", "ucsa": "past_queries"}


def _floats(kind: str, sparsity_factor, gamma, scale) -> Dict[str, Any]:
    """UCSA's float keywords, which travel as the op's own arguments (see plan_op)."""
    return dict(sparsity_factor=sparsity_factor, gamma=gamma, scale=scale) if kind == "ucsa" else {}


def _run_builder(kind: str, q, k, v, key_padding_mask, per_call, sparsity_factor, options: str, gamma=None,
                 scale=None) -> Plan:
    kw = dict(json.loads(options), **_floats(kind, sparsity_factor, gamma, scale))
    if kind in PER_CALL:
        kw[PER_CALL[kind]] = per_call
    return FAMILIES[kind].build(q, k, v, key_padding_mask=key_padding_mask, **kw)


def _pack(plan: Plan, like: Tensor) -> List[Tensor]:
    return [like.new_empty(0) if getattr(plan, f) is None else getattr(plan, f) for f in FIELDS]


@torch.library.custom_op("danon::plan", mutates_args=())
def plan_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], per_call: Optional[Tensor],
            sparsity_factor: Optional[float], kind: str, options: str, gamma: Optional[float],
            scale: Optional[float]) -> List[Tensor]:
    """The plan tensors of family `kind` (FIELDS order); `options` is the builder's other keywords as JSON.

    per_call: the family's per-call tensor (PER_CALL): DALA's importance, UCSA's past queries.

    UCSA's floats (sparsity_factor, gamma, and the logit scale gamma's estimate uses) are arguments of their
    own: under dynamic=True Dynamo makes a module's float attribute (or the scale) a SymFloat, which no JSON
    constant can hold.

    Example:
        >>> import torch
        >>> q = torch.randn(1, 1, 64, 8)
        >>> out = torch.ops.danon.plan(q, q, q, None, None, None, "ucsa", '{"block_size": 16, "causal": true}', None,
        ...                            None)
        >>> len(out), out[0].dtype
        (8, torch.int32)
    """
    plan = _run_builder(kind, q, k, v, key_padding_mask, per_call, sparsity_factor, options, gamma, scale)
    for observe in observers:
        observe(plan)
    # a custom op's outputs may not alias its inputs nor each other (a builder may return a view of either);
    # the plan's tensors are O(N / b) or summary-sized, so a copy of each is cheap
    return [x.clone(memory_format=torch.contiguous_format) for x in _pack(plan, q)]


@plan_op.register_fake
def _plan_fake(q, k, v, key_padding_mask, per_call, sparsity_factor, kind, options, gamma, scale):
    # the plan's sizes in closed form (danon/core/plan_shapes.py): the builder itself, run on fake tensors,
    # costs seconds of sympy per call under symbolic sizes, and a compile asks about a dozen times
    # Size-oblivious: an empty tensor's strides ask whether each size is 1; a plan size that happens to be 1 at
    # this length must not guard the graph to the lengths where it is (a recompile at every such boundary)
    options = dict(json.loads(options), **_floats(kind, sparsity_factor, gamma, scale))
    with backed_size_oblivious():
        shapes = plan_shapes(kind, q, k, v, key_padding_mask, options)
        return [q.new_empty(shapes[f][0], dtype=shapes[f][1]) if f in shapes else q.new_empty(0) for f in FIELDS]


# families whose summaries' backward is written out (any other: autograd through the rebuilt plan)
CLOSED_FORM_BACKWARDS = {"dala": dala_summary_backward, "msra": msra_summary_backward, "ucsa": ucsa_summary_backward}


@torch.library.custom_op("danon::plan_backward", mutates_args=())
def plan_backward_op(grad_summary_k: Tensor, grad_summary_v: Tensor, q: Tensor, k: Tensor, v: Tensor,
                     key_padding_mask: Optional[Tensor], per_call: Optional[Tensor], plan_tensors: List[Tensor],
                     sparsity_factor: Optional[float], kind: str, options: str, gamma: Optional[float],
                     scale: Optional[float]) -> tuple[Tensor, Tensor]:
    """(dk, dv) of the plan's summary keys and values: in closed form from the forward's plan (`plan_tensors`,
    danon::plan's outputs) for the families in CLOSED_FORM_BACKWARDS (all three); any other by rebuilding the
    plan under autograd."""
    if kind in CLOSED_FORM_BACKWARDS and grad_summary_k.numel() and grad_summary_v.numel():
        opts = json.loads(options)
        plan = _plan_from_outputs(kind, opts, q, k, plan_tensors)
        if plan.summary_k is not None:
            dk, dv = CLOSED_FORM_BACKWARDS[kind](plan, opts, key_padding_mask, grad_summary_k, grad_summary_v, k, v)
            return dk.contiguous(), dv.contiguous()
    with torch.enable_grad(), autograd_inside_op():
        k_, v_ = k.detach().requires_grad_(), v.detach().requires_grad_()
        plan = _run_builder(kind, q.detach(), k_, v_, key_padding_mask, per_call, sparsity_factor, options, gamma,
                            scale)
        pairs = [(out, g) for out, g in ((plan.summary_k, grad_summary_k), (plan.summary_v, grad_summary_v))
                 if out is not None and g.numel() and out.requires_grad]
        grads = (None, None)
        if pairs:
            grads = torch.autograd.grad([o for o, _ in pairs], [k_, v_], [g for _, g in pairs], allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g.contiguous() for x, g in zip((k, v), grads))


@plan_backward_op.register_fake
def _plan_backward_fake(grad_summary_k, grad_summary_v, q, k, v, key_padding_mask, per_call, plan_tensors,
                        sparsity_factor, kind, options, gamma, scale):
    return k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, per_call, sparsity_factor, kind, options, gamma, scale = inputs
    # the plan itself too: the closed-form backwards read its counts and lists instead of building it again
    # (DALA's routing and both families' block sums: about 20 ms and 8 ms at N = 16k)
    ctx.save_for_backward(q, k, v, key_padding_mask, per_call, *output)
    ctx.floats, ctx.kind, ctx.options = (sparsity_factor, gamma, scale), kind, options


def _backward(ctx, grads):
    q, k, v, key_padding_mask, per_call, *plan_tensors = ctx.saved_tensors
    gk, gv = grads[_SUMMARY_K], grads[_SUMMARY_V]
    gk = q.new_empty(0) if gk is None else gk
    gv = q.new_empty(0) if gv is None else gv
    sparsity_factor, gamma, scale = ctx.floats
    dk, dv = plan_backward_op(gk, gv, q, k, v, key_padding_mask, per_call, plan_tensors, sparsity_factor, ctx.kind,
                              ctx.options, gamma, scale)
    return (None, dk, dv) + (None,) * 7


plan_op.register_autograd(_backward, setup_context=_setup_context)


@torch.compiler.assume_constant_result
def _json(options: Dict[str, Any]) -> str:
    # a constant for Dynamo (it cannot trace json.dumps); the options are Python constants
    return json.dumps(options, sort_keys=True)


def _plan_from_outputs(kind: str, options: Dict[str, Any], q: Tensor, k: Tensor, outs: List[Tensor]) -> Plan:
    """The Plan that danon::plan's outputs (FIELDS order) and the builder's keywords describe (no DALA slopes)."""
    fields = {f: (None if x.dim() == 1 else x) for f, x in zip(FIELDS, outs)}
    return Plan(kind, options["block_size"], options["causal"], q.shape[2], k.shape[2],
                window=window_blocks(options[FAMILIES[kind].window_option], options["block_size"]), **fields)


def build_plan(kind: str, q: Tensor, k: Tensor, v: Tensor, options: Dict[str, Any]) -> Plan:
    """The Plan of family `kind` through `danon::plan`, from the checked keywords of its builder.

    `options` holds key_padding_mask, the DALA tensors importance and slopes, UCSA's past_queries, and the
    scalar keywords;
    DALA's slopes stay outside the op (a learnable parameter's gradient reaches it unchanged).

    Example:
        >>> import torch
        >>> q = torch.randn(1, 2, 128, 16)
        >>> plan = build_plan("ucsa", q, q, q, dict(causal=True, block_size=16, local_window_size=32, global_tokens=16,
        ...                                          top_k_blocks=2, compress=True, key_padding_mask=None))
        >>> plan.kind, plan.block_idx.shape[:3]
        ('ucsa', torch.Size([1, 2, 8]))
    """
    options = dict(options)
    kpm = options.pop("key_padding_mask", None)
    per_call = options.pop(PER_CALL[kind], None) if kind in PER_CALL else None
    slopes = options.pop("slopes", None)
    sparsity_factor, gamma, scale = (options.pop(name, None) for name in ("sparsity_factor", "gamma", "scale"))
    outs = torch.ops.danon.plan(q, k, v, kpm, per_call, sparsity_factor, kind, _json(options), gamma, scale)
    plan = _plan_from_outputs(kind, options, q, k, outs)
    if kind == "dala" and options["decay"] == "alibi":
        plan.slopes = alibi_slopes(q.shape[1], q.device) if slopes is None else slopes
    return plan


def _plan_decomposition(q, k, v, key_padding_mask, per_call, sparsity_factor, kind, options, gamma, scale):
    return _pack(_run_builder(kind, q, k, v, key_padding_mask, per_call, sparsity_factor, options, gamma, scale), q)


def plan_decompositions() -> dict:
    """{danon::plan: the builder} for ExportedProgram.run_decompositions: exports keep the plan building
    as ordinary ATen ops (ONNX, TensorRT).

    Example:
        >>> import torch
        >>> list(plan_decompositions()) == [torch.ops.danon.plan.default]
        True
    """
    return {torch.ops.danon.plan.default: _plan_decomposition}
