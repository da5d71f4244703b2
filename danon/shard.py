"""Tensor-parallel sharding decided by danon, applied by PyTorch (`torch.distributed.tensor.parallel`).

    plan = danon.shard_plan(model, example_inputs, world_size=2)     # inspect, no process group
    model, plan = danon.shard(model, mesh, example_inputs)           # split across the mesh's ranks
    model = torch.compile(model, backend="danon")                    # the danon op runs on local heads

The model's forward is captured once with Dynamo; danon/passes/tensor_parallel.py finds attention blocks and MLPs
in the graph and decides, per block, to split it (q/k/v and up/gate projections column-parallel,
output and down projections row-parallel: Megatron's layout, one all-reduce per block) or to keep
it replicated, saying why. `shard` hands the decisions to `parallelize_module` (DTensor does the
communication) and sets the head counts the attention modules reshape with to their local values.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch

from danon.passes.options import DanonConfig
from danon.passes.pipeline import run_pipeline
from danon.core.torch_internals import sizes_not_remembered, tree_leaves
from danon.passes.tensor_parallel import Block, merge_blocks

__all__ = ["ShardPlan", "shard", "shard_plan", "local_parameter_bytes"]


def _unique_parameters(model: torch.nn.Module):
    return list(model.parameters())        # parameters() already yields tied weights once


def _bytes(p: torch.Tensor) -> int:
    local = p.to_local() if _is_dtensor(p) else p
    return local.numel() * local.element_size()


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:       # torch built without distributed
        return False
    return isinstance(t, DTensor)


def local_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this rank holds (the local shard of each DTensor; tied weights once).

    Example:
        >>> import torch
        >>> local_parameter_bytes(torch.nn.Linear(4, 2))      # 8 weights + 2 biases, fp32
        40
    """
    return sum(_bytes(p) for p in _unique_parameters(model))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@dataclasses.dataclass
class ShardPlan:
    """The tensor-parallel decisions for one model and world size.

    blocks: one `Block` per attention block and MLP found (split, or replicated with its reason).
    world_size: the number of ranks the plan splits across.
    total_bytes: parameter bytes of the whole model; per_rank_bytes: estimated bytes on each rank.
    `str(plan)` is the readable report; `parallelize_plan()` is what `parallelize_module` receives.
    """

    world_size: int
    blocks: List[Block]
    total_bytes: int
    per_rank_bytes: int

    @property
    def sharded(self) -> List[Block]:
        return [b for b in self.blocks if b.sharded]

    @property
    def replicated(self) -> List[Block]:
        return [b for b in self.blocks if not b.sharded]

    def parallelize_plan(self) -> Dict[str, Any]:
        """{qualified name: ColwiseParallel() | RowwiseParallel()} for the split blocks."""
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
        plan: Dict[str, Any] = {}
        for block in self.sharded:
            plan.update({name: ColwiseParallel() for name in block.colwise})
            plan.update({name: RowwiseParallel() for name in block.rowwise})
        return plan

    def __str__(self) -> str:
        ws = self.world_size
        lines = [f"danon shard plan: world_size={ws}, {len(self.sharded)} block(s) split, "
                 f"{len(self.replicated)} replicated"]
        for b in self.blocks:
            if b.kind == "attention":
                what = f"attention {b.module or '<root>'}: {b.heads} heads, {b.kv_heads} kv heads, head_dim {b.head_dim}"
                if b.sharded:
                    what += f" -> {b.heads // ws} heads, {b.kv_heads // ws} kv heads per rank"
            else:
                what = f"mlp {b.module or '<root>'}: intermediate {b.intermediate}"
                if b.sharded:
                    what += f" -> {b.intermediate // ws} per rank"
            lines.append("  " + what)
            if b.sharded:
                lines.append(f"      column-parallel: {', '.join(b.colwise)}")
                lines.append(f"      row-parallel:    {', '.join(b.rowwise)}")
                if b.head_attrs:
                    lines.append("      local head counts: " + ", ".join(
                        f"{a} {v} -> {v // ws}" for _, a, v in b.head_attrs))
            else:
                lines.append(f"      replicated: {b.reason}")
        lines.append("  everything else (embeddings, norms, output head, other layers): replicated")
        share = self.per_rank_bytes / self.total_bytes if self.total_bytes else 1.0
        lines.append(f"  parameter bytes: {_human(self.total_bytes)} in all, about {_human(self.per_rank_bytes)} "
                     f"per rank ({share:.0%})")
        return "\n".join(lines)


def _check_world_size(world_size) -> int:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1 (the number of ranks), got {world_size!r}")
    return world_size


def _args(example_inputs) -> Tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError("example_inputs must be a tensor, a tuple/list of positional arguments or a dict of keyword "
                    f"arguments for model's forward, got {type(example_inputs).__name__}")


def _capture(model: torch.nn.Module, example_inputs) -> List[Tuple[torch.fx.GraphModule, list]]:
    """Dynamo's graphs of model(*example_inputs) (one per graph break) with their example inputs, captured
    by a backend of our own."""
    args, kwargs = _args(example_inputs)
    graphs: List[Tuple[torch.fx.GraphModule, list]] = []

    def capture(gm, inputs):     # a fresh backend: Dynamo traces afresh instead of answering from its cache
        graphs.append((gm, list(inputs)))
        return gm.forward

    with torch.no_grad(), sizes_not_remembered():
        torch.compile(model, backend=capture, dynamic=False)(*args, **kwargs)
    if not graphs:
        raise RuntimeError("danon.shard_plan: Dynamo captured no graph of the model (its cache answered, or the "
                           "recompile limit was reached); call torch._dynamo.reset() and try again")
    return graphs


def _estimate(model: torch.nn.Module, blocks: List[Block], world_size: int) -> Tuple[int, int]:
    split: Dict[int, int] = {}          # id(parameter) -> how many ranks share it out
    for block in blocks:
        if not block.sharded:
            continue
        for name in block.colwise:
            for p in model.get_submodule(name).parameters(recurse=False):
                split[id(p)] = world_size
        for name in block.rowwise:
            split[id(model.get_submodule(name).weight)] = world_size   # the bias stays whole (added after the reduce)
    params = _unique_parameters(model)
    total = sum(p.numel() * p.element_size() for p in params)
    per_rank = sum(p.numel() * p.element_size() // split.get(id(p), 1) for p in params)
    return total, per_rank


def shard_plan(model: torch.nn.Module, example_inputs, world_size: int) -> ShardPlan:
    """The tensor-parallel plan danon would apply on `world_size` ranks; needs no process group.

    `model(*example_inputs)` runs once (under no_grad) so Dynamo can capture the graph.

    Example:
        >>> import torch, danon
        >>> from danon.shard import shard_plan
        >>> from danon.models import create_dense_model
        >>> model = create_dense_model(hidden_size=32, num_heads=4, num_kv_heads=2, num_layers=1, vocab_size=20)
        >>> plan = shard_plan(model, torch.randint(0, 20, (1, 8)), world_size=2)
        >>> print(plan)                                          # doctest: +NORMALIZE_WHITESPACE
        danon shard plan: world_size=2, 2 block(s) split, 0 replicated
          attention layers.0.attention: 4 heads, 2 kv heads, head_dim 8 -> 2 heads, 1 kv heads per rank
              column-parallel: layers.0.attention.q_proj, layers.0.attention.k_proj, layers.0.attention.v_proj
              row-parallel:    layers.0.attention.o_proj
              local head counts: num_heads 4 -> 2, num_kv_heads 2 -> 1
          mlp layers.0.mlp: intermediate 128 -> 64 per rank
              column-parallel: layers.0.mlp.0
              row-parallel:    layers.0.mlp.2
          everything else (embeddings, norms, output head, other layers): replicated
          parameter bytes: 47.9 KiB in all, about 25.6 KiB per rank (54%)
    """
    world_size = _check_world_size(world_size)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if any(_is_dtensor(p) for p in model.parameters()):
        raise ValueError("model already holds DTensor parameters (it was sharded before); pass the unsharded model")
    # the backend's pass list and driver, stopped after the shard decisions: nothing is compiled here
    runs = [run_pipeline(gm, inputs, DanonConfig(), model=model, world_size=world_size, stop_after="shard")
            for gm, inputs in _capture(model, example_inputs)]
    blocks = merge_blocks([run.rows["shard"] for run in runs])
    total, per_rank = _estimate(model, blocks, world_size)
    return ShardPlan(world_size, blocks, total, per_rank)


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4


def _outputs(model, args, kwargs) -> List[torch.Tensor]:
    with torch.no_grad():
        out = model(*args, **kwargs)
    return [t.full_tensor() if _is_dtensor(t) else t for t in tree_leaves(out)
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


def shard(model: torch.nn.Module, mesh, example_inputs, *, plan: Optional[ShardPlan] = None,
          verify: bool = True) -> Tuple[torch.nn.Module, ShardPlan]:
    """Split `model` across the ranks of a 1-D DeviceMesh by danon's plan; returns (model, plan).

    Every rank calls it with the same model (same weights: seed the same or load the same checkpoint)
    and the same example inputs. The split is applied in place with `parallelize_module` (the split
    layers' weights become DTensors, their outputs plain local tensors), and the head counts the
    attention modules reshape with are set to the local counts. With `verify` (default) the model
    is run on `example_inputs` before and after, in eval mode, and a difference raises.

    Example (one process, a 1-rank gloo group):
        >>> import tempfile, torch, torch.distributed as dist
        >>> from torch.distributed.device_mesh import init_device_mesh
        >>> from danon.shard import shard
        >>> from danon.models import create_dense_model
        >>> store = tempfile.NamedTemporaryFile(delete=False).name
        >>> dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        >>> model = create_dense_model(hidden_size=32, num_heads=4, num_layers=1, vocab_size=20)
        >>> model, plan = shard(model, init_device_mesh("cpu", (1,)), torch.randint(0, 20, (1, 8)))
        >>> len(plan.sharded), type(model.layers[0].attention.q_proj.weight).__name__
        (2, 'DTensor')
        >>> dist.destroy_process_group()
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor.parallel import parallelize_module

    if not isinstance(mesh, DeviceMesh):
        raise TypeError("mesh must be a torch.distributed.device_mesh.DeviceMesh (e.g. init_device_mesh('cuda', "
                        f"(world_size,))), got {type(mesh).__name__}")
    if mesh.ndim != 1:
        raise ValueError(f"mesh must be 1-D (the tensor-parallel dimension), got a {mesh.ndim}-D mesh "
                         f"{tuple(mesh.shape)}; pass the tensor-parallel sub-mesh, e.g. mesh['tp']")
    devices = {p.device.type for p in model.parameters()}
    if devices and devices != {mesh.device_type}:
        raise ValueError(f"mesh device_type {mesh.device_type!r} does not match the model's parameters on "
                         f"{', '.join(sorted(devices))}; move the model to the mesh's device type first")
    world_size = mesh.size()
    if plan is None:
        plan = shard_plan(model, example_inputs, world_size)
    elif not isinstance(plan, ShardPlan):
        raise TypeError(f"plan must be a danon ShardPlan (from danon.shard_plan) or None, got {type(plan).__name__}")
    elif plan.world_size != world_size:
        raise ValueError(f"plan was made for world_size={plan.world_size} but the mesh has {world_size} ranks; "
                         f"make it with danon.shard_plan(model, example_inputs, world_size={world_size})")
    args, kwargs = _args(example_inputs)
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        before = _outputs(model, args, kwargs) if verify else []
        parallelize_module(model, mesh, plan.parallelize_plan())
        for block in plan.sharded:
            for module, attr, value in block.head_attrs:
                setattr(model.get_submodule(module), attr, value // world_size)
        try:
            after = _outputs(model, args, kwargs) if verify else []
        except RuntimeError as err:
            raise RuntimeError(f"danon.shard: the sharded model fails on example_inputs ({err}); an attention "
                               f"module probably reshapes with a head count danon does not know. Plan:\n{plan}"
                               ) from err
    finally:
        for m, flag in training.items():
            m.training = flag
    for i, (a, b) in enumerate(zip(before, after)):
        err = float("inf") if a.shape != b.shape else \
            ((b.double() - a.double()).norm() / a.double().norm().clamp_min(1e-30)).item()
        if not err <= _tolerance(a.dtype):
            raise RuntimeError(f"danon.shard: the sharded model's output {i} differs from the unsharded model's on "
                               f"example_inputs (relative error {err:.2e}); an attention module probably reshapes "
                               f"with a head count danon does not know. Plan:\n{plan}")
    return model, plan
