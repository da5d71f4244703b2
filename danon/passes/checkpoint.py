"""The checkpoint pass: in a training graph, which activations the forward saves for the backward and
which the backward recomputes, under a memory budget.

The decision is AOTAutograd's: its min-cut partitioner with `activation_memory_budget` (a knapsack over
recomputation, costed by FLOPs; danon/core/attention_op.py registers FLOP formulas for danon::attention and its
backward, so the knapsack sees attention as expensive to recompute, not free). danon adds three things,
all inside one partition function (`CheckpointPartitioner`) used for this compile only:

- attention-aware tags: the nodes that only build attention plans (block and token indices, summary
  means and counts) are tagged `CheckpointPolicy.PREFER_RECOMPUTE`: they are O(N / block) work, so the
  backward rebuilds them instead of the forward keeping them;
- the budget in danon's terms: `memory_budget` is a fraction of the activation bytes the default
  partition saves (or `max_activation_bytes` an absolute cap); the partition is measured and, where the
  knapsack's estimate overshoots, rerun with a smaller `activation_memory_budget` (at 0 AOTAutograd
  saves only the graph inputs, so a target is always met);
- a report row: bytes saved before (the default partition) and after, and the estimated FLOPs the
  backward spends recomputing.

No global setting changes: Inductor gets the partitioner through `torch._inductor.config.patch` around
the compile; the eager target runs AOTAutograd with the same partitioner and eager forward and backward
(like torch's "aot_eager" backend).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy
from torch.utils.flop_counter import flop_registry

from danon.core.attention_args import BACKWARD_LEADING, PLAN_TENSORS, AttentionArgs
from danon.core.plan_op import plan_backward_op
from danon.core.torch_internals import (aot_eager, functorch_config_patch, inductor_with_partitioner, node_storage,
                                        partitioners)

from .options import DanonConfig

from .report import CheckpointReport

_ATTENTION = "danon::attention"
_ATTENTION_BACKWARD = "danon::attention_backward"
# where the plan tensors (block_idx .. summary_pos) sit among each op's arguments, from the one argument list
_FORWARD_PLAN = (AttentionArgs._fields.index(PLAN_TENSORS[0]), AttentionArgs._fields.index(PLAN_TENSORS[-1]) + 1)
_BACKWARD_PLAN = tuple(i + len(BACKWARD_LEADING) for i in _FORWARD_PLAN)
# danon::plan_backward reads the forward's plan as one list argument, `plan_tensors` (danon/core/plan_op.py)
_PLAN_BACKWARD = "danon::plan_backward"
_PLAN_BACKWARD_AT = [a.name for a in plan_backward_op._opoverload._schema.arguments].index("plan_tensors")
_PLAN_BACKWARD_LIST = (_PLAN_BACKWARD_AT, _PLAN_BACKWARD_AT + 1)
_RETRIES = 4        # partitions tried above budget 0 when the knapsack's estimate overshoots the target


def _op_name(node: fx.Node) -> str:
    return getattr(getattr(node.target, "_schema", None), "name", "") if node.op == "call_function" else ""


def _plan_positions(node: fx.Node) -> Tuple[int, int]:
    name = _op_name(node)
    if name == _ATTENTION:
        return _FORWARD_PLAN
    if name == _ATTENTION_BACKWARD:
        return _BACKWARD_PLAN
    if name == _PLAN_BACKWARD:
        return _PLAN_BACKWARD_LIST
    return 0, 0


def _tensors(node: fx.Node) -> bool:
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return len(val) > 0 and all(isinstance(v, torch.Tensor) for v in val)
    return isinstance(val, torch.Tensor)


def tag_plan_nodes(graph: fx.Graph) -> int:
    """Tag the nodes whose values only feed danon attention plans with PREFER_RECOMPUTE; returns how many.

    A node qualifies when every user is a qualifying node or a danon op that reads it at a plan position,
    and it is a computation (not a graph input). Nodes the user already tagged are left alone.

    Example:
        >>> import torch, danon
        >>> from danon.core.torch_internals import aot_function_nop, partitioners
        >>> tagged = []
        >>> def partition(joint, inputs, **kw):
        ...     tagged.append(tag_plan_nodes(joint.graph))
        ...     return partitioners().min_cut_rematerialization_partition(joint, inputs, **kw)
        >>> f = lambda q: danon.msra_attention(q, q, q, causal=True, window=16, block_size=16)
        >>> g = aot_function_nop(f, partition)
        >>> g(torch.randn(1, 2, 128, 8, requires_grad=True)).sum().backward()
        >>> tagged[0] > 0
        True
    """
    plan_only = set()
    for node in reversed(graph.nodes):
        if node.op != "call_function" or not node.users or "recompute" in node.meta or not _tensors(node):
            continue
        ok = True
        for user in node.users:
            if user in plan_only:
                continue
            lo, hi = _plan_positions(user)
            uses = [i for i, a in enumerate(user.args)
                    if a is node or (isinstance(a, (list, tuple)) and any(x is node for x in a))]
            if hi == 0 or not uses or any(not lo <= i < hi for i in uses) or node in user.kwargs.values():
                ok = False
                break
        if ok:
            plan_only.add(node)
    for node in graph.nodes:     # a recomputed node needs each input saved or recomputed: a tuple cannot be saved
        if node in plan_only and any(isinstance(a, fx.Node) and a not in plan_only
                                     and not isinstance(a.meta.get("val"), torch.Tensor)
                                     for a in node.all_input_nodes):
            plan_only.discard(node)
    for node in plan_only:
        node.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
    return len(plan_only)


def saved_bytes(fw_module: fx.GraphModule, num_fwd_outputs: int) -> Tuple[int, int]:
    """(activation bytes, input bytes) the forward module saves for the backward.

    Saved values are the forward's outputs after the first `num_fwd_outputs`. A value whose storage is a
    graph input's (a parameter, a user input, a view of one) counts as input bytes: the backward holds
    it anyway. Views of one storage count once (the largest view).
    """
    size_of = partitioners()._size_of
    placeholders = [n for n in fw_module.graph.nodes if n.op == "placeholder"]
    input_storages = {node_storage(n) for n in placeholders if isinstance(n.meta.get("val"), torch.Tensor)}
    out = fw_module.graph.find_nodes(op="output")[0]
    saved = [n for n in out.args[0][num_fwd_outputs:]
             if isinstance(n, fx.Node) and isinstance(n.meta.get("val"), torch.Tensor)]
    acts: Dict[object, int] = {}
    inputs: Dict[object, int] = {}
    for n in saved:
        key = node_storage(n)
        bucket = inputs if key in input_storages else acts
        bucket[key] = max(bucket.get(key, 0), int(size_of(n)))
    return sum(acts.values()), sum(inputs.values())


def _flops(node: fx.Node) -> float:
    """The partitioner's own FLOP estimate of one node (0 for ops without a FLOP formula)."""
    target = node.target
    if node.op != "call_function" or not (target in flop_registry or
                                          getattr(target, "overloadpacket", None) in flop_registry):
        return 0.0
    with functorch_config_patch(activation_memory_budget_runtime_estimator="flops"):
        return float(partitioners().estimate_runtime(node))


def recompute_cost(fw_module: fx.GraphModule, bw_module: fx.GraphModule) -> Tuple[float, int, int]:
    """(FLOPs, danon::attention count, op count) of the forward computations the backward repeats.

    A recomputed node keeps its name in both modules (the partitioner copies nodes out of the joint graph).
    FLOPs are what torch.utils.flop_counter counts (matmuls, convolutions, attention); pointwise ops and
    reductions count as ops only.
    """
    fw_names = {n.name for n in fw_module.graph.nodes if n.op == "call_function"}
    again = [n for n in bw_module.graph.nodes if n.op == "call_function" and n.name in fw_names]
    return sum(_flops(n) for n in again), sum(_op_name(n) == _ATTENTION for n in again), len(again)


class CheckpointPartitioner:
    """AOTAutograd's min-cut partitioner, run to danon's memory target, with a report row per graph.

    `target_fraction` (memory_budget) or `target_bytes` (max_activation_bytes) sets the activations to
    keep; each call appends one CheckpointReport to `rows`.

    Example:
        >>> import torch, danon
        >>> from danon.core.torch_internals import aot_function_nop, partitioners
        >>> rows = []
        >>> p = CheckpointPartitioner("demo", rows, target_fraction=0.0)
        >>> f = lambda x, w: torch.tanh(torch.tanh(x @ w) @ w)
        >>> g = aot_function_nop(f, p)
        >>> x, w = torch.randn(64, 64, requires_grad=True), torch.randn(64, 64, requires_grad=True)
        >>> g(x, w).sum().backward()
        >>> rows[0].saved_bytes_before > 0, rows[0].saved_bytes_after
        (True, 0)
    """

    def __init__(self, graph: str, rows: List[CheckpointReport], *, target_fraction: Optional[float] = None,
                 target_bytes: Optional[int] = None):
        if (target_fraction is None) == (target_bytes is None):
            raise ValueError("CheckpointPartitioner: give exactly one of target_fraction and target_bytes")
        self.graph, self.rows = graph, rows
        self.target_fraction, self.target_bytes = target_fraction, target_bytes

    def _partition(self, joint, joint_inputs, budget: float, kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k != "compiler"}
        # is_non_builtin_to_include: custom ops (danon::attention) count as compute intensive, so the knapsack
        # weighs recomputing them by their FLOP formula; otherwise its min-cut treats them as free to repeat
        with functorch_config_patch(activation_memory_budget=budget, is_non_builtin_to_include=budget < 1.0):
            return partitioners().min_cut_rematerialization_partition(joint, joint_inputs, compiler="inductor",
                                                                       **kwargs)

    def __call__(self, joint: fx.GraphModule, joint_inputs, **kwargs):
        n_out = kwargs["num_fwd_outputs"]
        default = self._partition(joint, joint_inputs, 1.0, kwargs)      # what checkpoint="none" saves
        before, _ = saved_bytes(default[0], n_out)
        target = self.target_bytes if self.target_bytes is not None else int(self.target_fraction * before)
        tagged = tag_plan_nodes(joint.graph)
        chosen, budget = None, 1.0 if before == 0 else min(1.0, target / before)
        # AOTAutograd's budget is the same fraction (of the default's saved bytes above the graph inputs),
        # but its knapsack works on estimates: measure, and shrink the budget until the target is met
        for _ in range(_RETRIES if budget > 0 else 0):
            parts = self._partition(joint, joint_inputs, budget, kwargs)
            after, _ = saved_bytes(parts[0], n_out)
            if after <= target:
                chosen = parts
                break
            budget = budget * target / after * 0.9 if target > 0 else 0.0
            if budget < 1e-3:
                break
        if chosen is None:
            budget = 0.0
            chosen = self._partition(joint, joint_inputs, 0.0, kwargs)
        after, _ = saved_bytes(chosen[0], n_out)
        flops_before, _, ops_before = recompute_cost(*default)
        flops_after, attention, ops_after = recompute_cost(*chosen)
        self.rows.append(CheckpointReport(
            graph=self.graph, training=True, saved_bytes_before=before, saved_bytes_after=after,
            recompute_flops_before=flops_before, recompute_flops_after=flops_after, target_bytes=target,
            partitioner_budget=budget, recomputed_attention=attention, recomputed_ops_before=ops_before,
            recomputed_ops_after=ops_after, tagged_recompute=tagged,
            note=f"activation_memory_budget={budget:.3g}"))
        return chosen


def needs_backward(example_inputs) -> bool:
    """True when AOTAutograd will build a backward for these inputs (grad mode on, an input requiring grad)."""
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


def graph_name(gm: fx.GraphModule) -> str:
    """Dynamo's compile id of the graph ("0/0"), else the module's class name."""
    cid = gm.meta.get("dynamo_compile_id") if hasattr(gm, "meta") else None
    return str(cid) if cid is not None else type(gm).__name__


def checkpoint_lowering(gm: fx.GraphModule, example_inputs, config: DanonConfig,
                        lower: Callable) -> Tuple[Callable, List[CheckpointReport]]:
    """Lower `gm` with `lower(gm, example_inputs, target)` under the checkpoint decision of `config`.

    Returns (compiled callable, report rows). checkpoint="none" lowers as it is, with no rows. An
    inference graph gets one row saying nothing is saved. Inductor gets the partitioner through a config
    patch for this compile only; "eager" runs AOTAutograd with eager forward and backward graphs.

    Example:
        >>> import torch
        >>> from danon.passes.options import DanonConfig
        >>> gm = torch.fx.symbolic_trace(lambda x, w: (torch.tanh(torch.tanh(x @ w) @ w).sum(),))
        >>> x, w = torch.randn(4, 8), torch.randn(8, 8, requires_grad=True)
        >>> lower = lambda gm, inputs, target: gm.forward
        >>> fn, rows = checkpoint_lowering(gm, [x, w], DanonConfig(checkpoint="auto", target="eager"), lower)
        >>> fn(x, w)[0].backward()
        >>> rows[0].saved_bytes_after <= rows[0].saved_bytes_before // 2
        True
    """
    if config.checkpoint == "none":
        return lower(gm, example_inputs, config.target), []
    name = graph_name(gm)
    if not needs_backward(example_inputs):
        return lower(gm, example_inputs, config.target), [
            CheckpointReport(graph=name, training=False, note="inference graph: nothing is saved for backward")]
    rows: List[CheckpointReport] = []
    partitioner = CheckpointPartitioner(name, rows, target_fraction=config.budget,
                                        target_bytes=config.max_activation_bytes)
    if config.target == "eager":
        return aot_eager(partitioner)(gm, example_inputs), rows
    # Inductor partitions the joint graph while it compiles (the backward's code is built later, from the
    # graph chosen here), so the patch only needs to cover the compile call
    with inductor_with_partitioner(partitioner):
        return lower(gm, example_inputs, config.target), rows


__all__ = ["CheckpointPartitioner", "checkpoint_lowering", "tag_plan_nodes", "saved_bytes", "recompute_cost",
           "needs_backward", "graph_name"]
