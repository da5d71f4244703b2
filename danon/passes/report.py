"""The compile report: every attention site found, what was done with it or why not, and its cost; per graph,
what activation checkpointing saved; per linear layer, whether it was quantized and why."""
from __future__ import annotations

import dataclasses
from typing import List, Optional


@dataclasses.dataclass
class SiteReport:
    """One attention site of a compiled graph."""

    location: str                 # "file:line" of the user's code, from the node's stack trace
    source: str                   # "sdpa" | "manual" | "module"
    mask: str                     # "none" | "causal" | "key_padding" | "causal+key_padding" | "general" | "unknown"
    family: Optional[str]         # the family that runs it, or None when kept
    replaced: bool
    reason: Optional[str]         # why it was kept, or why it stayed exact
    q_shape: tuple = ()
    k_shape: tuple = ()
    dtype: str = ""
    keys_per_query: Optional[float] = None
    flops_before: Optional[float] = None
    flops_after: Optional[float] = None
    name: str = ""                # the module it runs in ("encoder.layer.0.attention.self"), the `sites` option's key
    options: dict = dataclasses.field(default_factory=dict)   # the family keywords it runs with
    approximates: str = ""        # what the family computes in place of the site's exact attention
    error: Optional[float] = None  # its output error as calibration measured it (the `sites` option's), or None


@dataclasses.dataclass
class CheckpointReport:
    """Activation checkpointing of one compiled graph (danon/passes/checkpoint.py).

    Bytes are the activations the forward saves for the backward, graph inputs (parameters, user
    inputs, and views of them) not counted: the backward holds those anyway. "before" is AOTAutograd's
    default partition (what checkpoint="none" saves), "after" the chosen one. Recompute FLOPs are the
    partitioner's estimate (torch.utils.flop_counter formulas: matmuls, convolutions, attention) of the
    forward work the backward repeats; pointwise ops and reductions show in the op counts only.
    """

    graph: str                                  # Dynamo's compile id ("0/0") or the graph's name
    training: bool                              # False: an inference graph, nothing is saved for backward
    saved_bytes_before: Optional[int] = None
    saved_bytes_after: Optional[int] = None
    recompute_flops_before: Optional[float] = None
    recompute_flops_after: Optional[float] = None
    target_bytes: Optional[int] = None          # memory_budget x saved_bytes_before, or max_activation_bytes
    partitioner_budget: Optional[float] = None  # the activation_memory_budget the chosen partition ran with
    recomputed_attention: int = 0               # danon::attention forwards the backward repeats
    recomputed_ops_before: int = 0              # forward ops the backward repeats, default partition
    recomputed_ops_after: int = 0               # ... and the chosen one
    tagged_recompute: int = 0                   # attention-plan nodes tagged PREFER_RECOMPUTE
    note: str = ""


@dataclasses.dataclass
class LinearReport:
    """One linear layer's weight under the quantize pass (danon/passes/weight_quantization.py) or danon.quantize."""

    name: str                     # module name ("layers.0.mlp.0"), from nn_module_stack or named_modules
    shape: tuple                  # the weight's (out_features, in_features)
    quantized: bool
    reason: str                   # why (not), e.g. "smaller than quantize_min_features=256"
    bytes_before: int = 0
    bytes_after: int = 0          # the torchao tensor's data, scales and zero points; = before when kept
    error: Optional[float] = None  # model output rel. error with only this layer quantized (sensitivity mode)


def _table(head: list, rows: list) -> List[str]:
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()   # noqa: E731
    return [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _mib(x: Optional[int]) -> str:
    return "-" if x is None else f"{x / 2 ** 20:.2f}"


def checkpoint_lines(rows: List[CheckpointReport]) -> List[str]:
    """The checkpointing section of a report, one line per graph."""
    head = ["graph", "saved MiB before", "saved MiB after", "recompute GFLOP before", "recompute GFLOP after",
            "ops recomputed", "attention recomputed", "note"]
    body = [[r.graph, _mib(r.saved_bytes_before), _mib(r.saved_bytes_after),
             "-" if r.recompute_flops_before is None else f"{r.recompute_flops_before / 1e9:.3f}",
             "-" if r.recompute_flops_after is None else f"{r.recompute_flops_after / 1e9:.3f}",
             f"{r.recomputed_ops_before} -> {r.recomputed_ops_after}" if r.training else "-",
             r.recomputed_attention, r.note] for r in rows]
    return ["activation checkpointing (activations saved for backward, graph inputs not counted):"] + _table(head, body)


def linear_lines(rows: List[LinearReport]) -> List[str]:
    """The quantization section of a report, one line per linear layer."""
    head = ["layer", "weight", "quantized", "MiB before", "MiB after", "error alone", "why"]
    body = [[r.name, "x".join(str(d) for d in r.shape), "yes" if r.quantized else "no", _mib(r.bytes_before),
             _mib(r.bytes_after), "-" if r.error is None else f"{r.error:.2e}", r.reason] for r in rows]
    before = sum(r.bytes_before for r in rows)
    after = sum(r.bytes_after for r in rows)
    total = f"linear weights: {_mib(before)} MiB -> {_mib(after)} MiB ({sum(r.quantized for r in rows)} of {len(rows)} quantized)"
    return ["weight quantization:"] + _table(head, body) + [total]


@dataclasses.dataclass
class QuantizeReport:
    """What `danon.quantize` did to a module: one row per linear layer, and the output error it measured.

    Example:
        >>> r = QuantizeReport([LinearReport("fc", (64, 64), True, "quantized", 16384, 4416)])
        >>> r.to_dict()["layers"][0]["bytes_after"], r.quantized
        (4416, 1)
    """

    layers: List[LinearReport] = dataclasses.field(default_factory=list)
    mode: str = "int8-weight"
    output_error: Optional[float] = None   # rel. error of the outputs on the example inputs, when given

    @property
    def quantized(self) -> int:
        return sum(r.quantized for r in self.layers)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "output_error": self.output_error,
                "layers": [dataclasses.asdict(r) for r in self.layers]}

    def __str__(self) -> str:
        out = linear_lines(self.layers)
        if self.output_error is not None:
            out.append(f"output rel. error on the example inputs: {self.output_error:.2e}")
        return "\n".join(out)


@dataclasses.dataclass
class CompileReport:
    """What the danon backend did to each attention site.

    Example:
        >>> report = CompileReport([SiteReport("model.py:12", "sdpa", "causal", "msra", True, None)])
        >>> report.to_dict()["sites"][0]["family"]
        'msra'
    """

    sites: List[SiteReport] = dataclasses.field(default_factory=list)
    graphs: int = 1               # FX graphs the report covers
    checkpoint: List[CheckpointReport] = dataclasses.field(default_factory=list)   # one per graph, when asked
    linears: List[LinearReport] = dataclasses.field(default_factory=list)          # one per weight, when asked

    def extend(self, other: "CompileReport") -> None:
        self.sites.extend(other.sites)
        self.graphs += other.graphs
        self.checkpoint.extend(other.checkpoint)
        self.linears.extend(other.linears)

    @property
    def replaced(self) -> int:
        return sum(s.replaced for s in self.sites)

    def totals(self) -> dict:
        before = sum(s.flops_before or 0 for s in self.sites)
        after = sum((s.flops_after if s.replaced else s.flops_before) or 0 for s in self.sites)
        return {"graphs": self.graphs, "sites": len(self.sites), "replaced": self.replaced,
                "flops_before": before, "flops_after": after}

    def to_dict(self) -> dict:
        """JSON-ready: {"sites": [...], "totals": {...}, "checkpoint": [...], "linears": [...]}."""
        return {"sites": [dataclasses.asdict(s) for s in self.sites], "totals": self.totals(),
                "checkpoint": [dataclasses.asdict(c) for c in self.checkpoint],
                "linears": [dataclasses.asdict(r) for r in self.linears]}

    def __str__(self) -> str:
        head = ["site", "location", "source", "mask", "q shape", "family", "keys/query", "GFLOP before",
                "GFLOP after", "error", "approximates", "note"]
        rows = []
        for s in self.sites:
            rows.append([s.name or "-", s.location, s.source, s.mask, "x".join(str(d) for d in s.q_shape),
                         s.family if s.replaced else "kept",
                         "-" if s.keys_per_query is None else f"{s.keys_per_query:.0f}",
                         "-" if s.flops_before is None else f"{s.flops_before / 1e9:.3f}",
                         "-" if s.flops_after is None else f"{s.flops_after / 1e9:.3f}",
                         "-" if s.error is None else f"{s.error:.1e}", s.approximates or "-", s.reason or ""])
        widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
        line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()   # noqa: E731
        t = self.totals()
        out = [f"danon compile report: {t['replaced']} of {t['sites']} attention sites replaced", line(head),
               line(["-" * w for w in widths])] + [line(r) for r in rows]
        if t["flops_before"]:
            out.append(f"total attention GFLOP: {t['flops_before'] / 1e9:.3f} -> {t['flops_after'] / 1e9:.3f}")
        if self.checkpoint:
            out += checkpoint_lines(self.checkpoint)
        if self.linears:
            out += linear_lines(self.linears)
        return "\n".join(out)
