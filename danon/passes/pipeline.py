"""The passes as one ordered list, and the one driver that runs them.

Every entry point that works on a captured graph runs `run_pipeline` over `PASSES`: the backend
(danon/backend.py: then lowers), `danon.export` (then exports) and `danon.shard_plan` (stops after the
shard decisions). One list and one driver is what keeps them from drifting apart: an option a pass
reads reaches every caller, or the caller refuses it (export refuses what a file cannot carry), instead
of one driver silently skipping a pass another runs.

Each pass is GraphModule in, GraphModule out, plus its report rows; whether it runs is a predicate
on the `PassState` (the config, and what the caller gave beside the graph). In order:

- shard: the tensor-parallel decisions (danon/passes/tensor_parallel.py). They read the graph as Dynamo captured it,
  before the attention pass hides the sites it replaces, and need the module and a world size: only
  `danon.shard_plan` gives those. No rewrite: the split is applied to the module, not the graph.
- attention: find each attention site and replace it (danon/passes/attention.py); always runs (with
  attention="keep" it still reports every site and why it was kept).
- checkpoint: the decision is AOTAutograd's partitioner's, made while the graph lowers, so this pass
  changes no graph: it leaves the lowering `danon/passes/checkpoint.checkpoint_lowering`, which
  `PipelineRun.lower` wraps around the caller's lowering function.
- quantize: int8/fp8 weight-only linear layers (danon/passes/weight_quantization.py); the quantized weights become
  trailing inputs of the graph, which `PipelineRun.lower` appends to every call.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from .attention import rewrite_attention
from .checkpoint import checkpoint_lowering
from .options import DanonConfig
from .weight_quantization import quantize_graph
from .report import CompileReport
from .tensor_parallel import find_blocks


@dataclasses.dataclass
class PassState:
    """What a pass reads beside the graph, and what it leaves for the passes after it and the lowering.

    example_inputs: the graph's inputs (Dynamo's example inputs). extra_inputs: trailing inputs passes
    added to the graph (quantized weights), in order. model, world_size: the module the graph was
    captured from and the ranks to split it across (shard decisions only). lowering: how the graph is
    to be lowered, `checkpoint_lowering`'s signature (gm, inputs, config, lower) -> (callable, rows);
    None lowers it as it is.
    """

    config: DanonConfig
    example_inputs: List[Any]
    extra_inputs: List[Any] = dataclasses.field(default_factory=list)
    model: Optional[torch.nn.Module] = None
    world_size: Optional[int] = None
    lowering: Optional[Callable] = None

    @property
    def inputs(self) -> List[Any]:
        """The inputs of the graph as the passes so far left it."""
        return list(self.example_inputs) + list(self.extra_inputs)


@dataclasses.dataclass(frozen=True)
class Pass:
    """One step of the pipeline: `apply(gm, state) -> (gm, rows)` when `runs(state)`.

    report: the CompileReport field the rows extend ("sites", "linears", "checkpoint"), or None for
    rows the report does not hold (the shard decisions: `danon.ShardPlan` reports those).
    """

    name: str
    runs: Callable[[PassState], bool]
    apply: Callable[[fx.GraphModule, PassState], Tuple[fx.GraphModule, list]]
    report: Optional[str] = None


def _shard(gm: fx.GraphModule, state: PassState):
    return gm, find_blocks(gm, state.model, state.world_size)


def _attention(gm: fx.GraphModule, state: PassState):
    return rewrite_attention(gm, state.config)


def _checkpoint(gm: fx.GraphModule, state: PassState):
    # its rows come from the partitioner during lowering (PipelineRun.lower files them under "checkpoint")
    state.lowering = checkpoint_lowering
    return gm, []


def _quantize(gm: fx.GraphModule, state: PassState):
    # inference only: quantize_graph raises for a graph that needs a backward
    gm, extra, rows = quantize_graph(gm, state.inputs, state.config)
    state.extra_inputs.extend(extra)
    return gm, rows


PASSES: Tuple[Pass, ...] = (
    Pass("shard", lambda s: s.model is not None and s.world_size is not None, _shard),
    Pass("attention", lambda s: True, _attention, report="sites"),
    Pass("checkpoint", lambda s: s.config.checkpoint != "none", _checkpoint, report="checkpoint"),
    Pass("quantize", lambda s: s.config.quantize != "none", _quantize, report="linears"),
)


@dataclasses.dataclass
class PipelineRun:
    """What `run_pipeline` did to one graph: the graph, the report, each pass's rows, the passes that ran."""

    gm: fx.GraphModule
    state: PassState
    report: CompileReport
    rows: Dict[str, list]
    ran: List[str]

    def lower(self, lower: Callable) -> Callable:
        """The compiled graph, by `lower(gm, inputs, target)` under the lowering the passes chose.

        The returned callable takes the graph's original inputs: the inputs passes added (quantized
        weights) are appended to every call. Checkpointing's rows land in `report.checkpoint`.
        """
        state = self.state
        if state.lowering is None:
            compiled = lower(self.gm, state.inputs, state.config.target)
        else:
            compiled, rows = state.lowering(self.gm, state.inputs, state.config, lower)
            self.rows["checkpoint"] = rows
            self.report.checkpoint.extend(rows)
        extra = list(state.extra_inputs)
        if not extra:
            return compiled

        def run(*args):     # the quantized weights are inputs of the rewritten graph after Dynamo's own
            return compiled(*args, *extra)
        return run


def run_pipeline(gm: fx.GraphModule, example_inputs: Sequence[Any], config: DanonConfig, *,
                 model: Optional[torch.nn.Module] = None, world_size: Optional[int] = None,
                 stop_after: Optional[str] = None, passes: Optional[Sequence[Pass]] = None) -> PipelineRun:
    """Run the passes (default `PASSES`, in order) on `gm`; returns a PipelineRun (lower it with `.lower`).

    stop_after: the name of the last pass to run (`danon.shard_plan` needs the shard decisions only).
    The attention pass rewrites `gm` in place, as Dynamo's backends may; quantize works on a copy.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from danon.passes.options import DanonConfig
        >>> runs = []
        >>> def backend(gm, inputs):
        ...     runs.append(run_pipeline(gm, inputs, DanonConfig(target="eager")))
        ...     return runs[-1].lower(lambda gm, inputs, target: gm.forward)
        >>> f = lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=True)
        >>> q = torch.randn(1, 2, 64, 8)
        >>> torch.allclose(torch.compile(f, backend=backend)(q), f(q), atol=1e-6)
        True
        >>> runs[0].ran, runs[0].report.replaced, [p.name for p in PASSES]
        (['attention'], 1, ['shard', 'attention', 'checkpoint', 'quantize'])
    """
    passes = PASSES if passes is None else tuple(passes)    # read at call time: one list for every caller
    names = [p.name for p in passes]
    if stop_after is not None and stop_after not in names:
        raise ValueError(f"stop_after must name a pass ({', '.join(names)}); got {stop_after!r}")
    state = PassState(config, list(example_inputs), model=model, world_size=world_size)
    report = CompileReport()
    rows: Dict[str, list] = {}
    ran: List[str] = []
    for p in passes:
        if p.runs(state):
            gm, rows[p.name] = p.apply(gm, state)
            ran.append(p.name)
            if p.report is not None:
                getattr(report, p.report).extend(rows[p.name])
        if p.name == stop_after:
            break
    return PipelineRun(gm, state, report, rows, ran)


__all__ = ["Pass", "PassState", "PipelineRun", "PASSES", "run_pipeline"]
