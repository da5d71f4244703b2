"""The quantize pass: weight-only quantization of linear layers, for inference.

torchao makes the quantized weights and runs them (`Int8WeightOnlyConfig`: int8 data, one fp32 scale
per output row; `Float8WeightOnlyConfig`: float8 e4m3 per row, CUDA with compute capability >= 8.9);
danon decides which layers: not the small ones (`quantize_min_features`), not the ones the user names
(`quantize_skip`), and, with `quantize_tolerance`, only as many as keep the output error on the example
inputs within the tolerance, least sensitive first (each layer's sensitivity: the output error with it
alone quantized).

In the Dynamo graph a weight is a graph input (torch inlines nn modules) that Dynamo passes on every
call. The pass copies the graph, gives each chosen weight a new input, and points the layer's linear
calls at it; the backend appends the quantized tensors to Dynamo's arguments. The user's parameters are
untouched (an input shared with other uses, such as a tied embedding, keeps serving them); the copy
leaves Dynamo's own graph, which it reads after the backend returns, as it was.
"""
from __future__ import annotations

import copy
import fnmatch
import functools
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from danon.core import torch_internals
from danon.core.torch_internals import is_traceable_wrapper_subclass, tree_leaves

from .options import DanonConfig

from .report import LinearReport

LINEAR_TARGETS = (*torch_internals.LINEAR_TARGETS, torch.ops.aten.linear.default)
FLOAT_WEIGHTS = (torch.float32, torch.float16, torch.bfloat16)
FP8_CAPABILITY = (8, 9)


def check_device(mode: str, device: torch.device) -> None:
    """Raise a clear error where `mode` cannot run on `device` (fp8-weight: CUDA, capability >= 8.9).

    Example:
        >>> check_device("int8-weight", torch.device("cpu"))
        >>> check_device("fp8-weight", torch.device("cpu"))
        Traceback (most recent call last):
        ...
        ValueError: quantize='fp8-weight' needs a CUDA GPU with compute capability >= 8.9 (Ada, Hopper or newer); the weights are on cpu. Use 'int8-weight' here.
    """
    if mode != "fp8-weight":
        return
    if device.type != "cuda":
        raise ValueError(f"quantize='fp8-weight' needs a CUDA GPU with compute capability >= 8.9 (Ada, Hopper or "
                         f"newer); the weights are on {device}. Use 'int8-weight' here.")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        raise ValueError(f"quantize='fp8-weight' needs a CUDA GPU with compute capability >= 8.9; {device} has "
                         f"{capability[0]}.{capability[1]}. Use 'int8-weight' there.")


def torchao_config(mode: str):
    """The torchao config for `mode`; never changes global Inductor settings (set_inductor_config=False)."""
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig
    if mode == "int8-weight":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    if mode == "fp8-weight":
        return Float8WeightOnlyConfig(set_inductor_config=False)
    raise ValueError(f"quantize mode must be 'int8-weight' or 'fp8-weight', got {mode!r}")


def quantized_weight(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """torchao's quantized tensor for a linear weight [out, in], made by torchao's own module handler.

    Example:
        >>> q = quantized_weight(torch.randn(64, 128), "int8-weight")
        >>> type(q).__name__, tensor_bytes(q)       # int8 data + fp32 scale + int8 zero point per row
        ('Int8Tensor', 8512)
    """
    from torchao.quantization import quantize_
    holder = torch.nn.Module()    # torchao quantizes modules' weights; a holder lends it this one
    holder.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
    quantize_(holder, torchao_config(mode), filter_fn=lambda module, fqn: module is holder)
    return holder.weight.detach()


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; for a torchao tensor, the sum of its inner tensors (data, scales, zero points)."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def skip_pattern(name: str, patterns: Sequence[str]) -> Optional[str]:
    """The first pattern of `patterns` that `name` matches (fnmatch; a plain name also matches as a suffix).

    Example:
        >>> skip_pattern("model.lm_head", ["lm_head"]), skip_pattern("layers.3.mlp.0", ["layers.*.mlp.*"])
        ('lm_head', 'layers.*.mlp.*')
        >>> skip_pattern("layers.0.q", ["head"]) is None
        True
    """
    for p in patterns:
        if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p):
            return p
    return None


def output_error(reference, outputs) -> float:
    """||outputs - reference|| / ||reference|| over the floating-point tensors of two output structures."""
    ref = [t for t in tree_leaves(reference) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    out = [t for t in tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    num = sum(float((o.double() - r.double()).pow(2).sum()) for o, r in zip(out, ref))
    den = sum(float(r.double().pow(2).sum()) for r in ref)
    return (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))


def decide(layers: Sequence[Tuple[str, torch.Tensor]], mode: str, *, min_features: Optional[int] = None,
           skip: Sequence[str] = (), tolerance: Optional[float] = None,
           measure: Optional[Callable[[Dict[int, torch.Tensor]], float]] = None
           ) -> Tuple[List[LinearReport], Dict[int, torch.Tensor], Optional[float]]:
    """Which of `layers` (name, weight) to quantize: (report rows, {index: quantized weight}, output error).

    `measure({index: quantized weight})` returns the model's output error with those layers quantized; it
    is needed with `tolerance`, where layers are taken least sensitive first while the error stays within
    it. The error returned is the last one measured for the chosen set (None without `measure`).

    Example:
        >>> w = {"a": torch.randn(64, 64), "b": torch.randn(8, 64), "head": torch.randn(64, 64)}
        >>> rows, chosen, _ = decide(list(w.items()), "int8-weight", min_features=16, skip=["head"])
        >>> [(r.name, r.quantized, r.reason) for r in rows]   # doctest: +NORMALIZE_WHITESPACE
        [('a', True, 'quantized'), ('b', False, 'smaller than quantize_min_features=16'),
         ('head', False, "matches quantize_skip pattern 'head'")]
    """
    min_features = min_features or 0
    rows, candidates = [], {}
    for i, (name, w) in enumerate(layers):
        size = tensor_bytes(w)
        row = LinearReport(name=name, shape=tuple(w.shape), quantized=False, reason="", bytes_before=size,
                           bytes_after=size)
        rows.append(row)
        pattern = skip_pattern(name, skip)
        if is_traceable_wrapper_subclass(w):
            row.reason = f"already a {type(w).__name__}"
        elif w.dim() != 2 or w.dtype not in FLOAT_WEIGHTS:
            row.reason = f"weight is {w.dtype} {list(w.shape)}; quantized are 2-D float32/float16/bfloat16 weights"
        elif min(w.shape) < min_features:
            row.reason = f"smaller than quantize_min_features={min_features}"
        elif pattern is not None:
            row.reason = f"matches quantize_skip pattern {pattern!r}"
        else:
            check_device(mode, w.device)
            candidates[i] = quantized_weight(w, mode)
    error = None
    if tolerance is None:
        chosen = dict(candidates)
        for i in chosen:
            rows[i].reason = "quantized"
        if measure is not None and chosen:
            error = measure(chosen)
    else:
        if measure is None:
            raise ValueError("quantize_tolerance needs example inputs to measure each layer's sensitivity")
        for i, q in candidates.items():
            rows[i].error = measure({i: q})
        chosen, error = {}, 0.0
        for i in sorted(candidates, key=lambda j: rows[j].error):
            if rows[i].error > tolerance:
                rows[i].reason = f"sensitive: alone it makes the output error {rows[i].error:.2e} > tolerance {tolerance:g}"
                continue
            trial = {**chosen, i: candidates[i]}
            e = measure(trial)
            if e <= tolerance:
                chosen, error = trial, e
                rows[i].reason = f"quantized (output error so far {e:.2e} <= tolerance {tolerance:g})"
            else:
                rows[i].reason = f"sensitive: with the layers before it the output error would be {e:.2e} > " \
                                 f"tolerance {tolerance:g}"
    for i, q in chosen.items():
        rows[i].quantized, rows[i].bytes_after = True, tensor_bytes(q)
    return rows, chosen, error


# the compiled module: a local (L['self'], L['model']), or a positional argument of a wrapper (L['args'][0])
_ROOT = re.compile(r"^[LG]\[['\"](?:args|kwargs)['\"]\]\[[^\]]+\]|^[LG]\[['\"][^'\"]+['\"]\]")


def module_name(path: str) -> str:
    """A Dynamo source path as a module name: "L['self'].layers[0]._modules['mlp']" -> "layers.0.mlp".

    Example:
        >>> module_name("L['self'].layers.0.mlp.0"), module_name("L['self']._modules['head']._parameters['weight']")
        ('layers.0.mlp.0', 'head.weight')
        >>> module_name("L['args'][0].model.layers[1].q_proj")
        'model.layers.1.q_proj'
    """
    s = _ROOT.sub("", path)
    s = re.sub(r"\._(?:modules|parameters|buffers)\[['\"]([^'\"]+)['\"]\]", r".\1", s)
    s = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", s)
    return s.lstrip(".")


def _layer_name(linear: fx.Node, weight: fx.Node) -> str:
    stack = linear.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return module_name(path)
    grapharg = weight.meta.get("grapharg")
    if grapharg is not None and getattr(grapharg, "source", None) is not None:
        return module_name(grapharg.source.name).rsplit(".", 1)[0]
    return weight.target if weight.op == "get_attr" else weight.name


def _weight_arg(node: fx.Node):
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")


def find_linear_weights(gm: fx.GraphModule, example_inputs) -> List[Tuple[str, fx.Node, torch.Tensor, List[fx.Node]]]:
    """(name, weight node, weight value, linear calls) for each parameter the graph's linear calls read.

    A weight must be a parameter: a graph input Dynamo lifted from a module, or a module attribute.
    A plain input (an argument of the compiled function) may change from call to call and is left alone.
    """
    placeholders = {n: i for i, n in enumerate(gm.graph.find_nodes(op="placeholder"))}
    found: Dict[fx.Node, Tuple[str, torch.Tensor, List[fx.Node]]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in LINEAR_TARGETS:
            continue
        w = _weight_arg(node)
        if not isinstance(w, fx.Node):
            continue
        if w.op == "placeholder" and w in placeholders and placeholders[w] < len(example_inputs):
            value = example_inputs[placeholders[w]]
        elif w.op == "get_attr":
            value = functools.reduce(getattr, w.target.split("."), gm)
        else:
            continue
        if not isinstance(value, torch.nn.Parameter) and not is_traceable_wrapper_subclass(value):
            continue
        if w in found:
            found[w][2].append(node)
        else:
            found[w] = (_layer_name(node, w), value, [node])
    return [(name, w, value, nodes) for w, (name, value, nodes) in found.items()]


def _concrete(x):
    """A symbolic size (dynamic shapes) as the value it has on these example inputs, for an eager run."""
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return x.node.hint if x.node.hint is not None else x
    return x


def _copy_with_weight_inputs(gm: fx.GraphModule, layers, which: Sequence[int]) -> fx.GraphModule:
    """A copy of `gm` whose linear calls of the layers `which` read a new trailing input each."""
    memo: dict = {}                 # old node -> new node; fx.Graph.__deepcopy__ without its memo quirk
    graph = fx.Graph(tracer_cls=gm.graph._tracer_cls)
    out_val, old_out = graph.graph_copy(gm.graph, memo, return_output_node=True)   # node meta: shallow copies
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    graph.output(out_val, type_expr=getattr(old_out, "type", None)).meta = copy.copy(old_out.meta)
    last = graph.find_nodes(op="placeholder")[-1]
    for j, i in enumerate(which):
        with graph.inserting_after(last):
            last = graph.placeholder(f"danon_qweight_{j}")
        last._dynamo_source = None   # an input Dynamo did not lift (AOTAutograd reads this attribute)
        old_w = layers[i][1]
        for linear in layers[i][3]:
            memo[linear].replace_input_with(memo[old_w], last)
    new = fx.GraphModule(gm, graph)
    new.meta.update(getattr(gm, "meta", {}))
    if hasattr(gm, "_param_name_to_source"):
        new._param_name_to_source = gm._param_name_to_source
    for old in gm.graph.find_nodes(op="placeholder"):
        if hasattr(old, "_dynamo_source"):
            memo[old]._dynamo_source = old._dynamo_source
    graph.lint()
    new.recompile()
    return new


def quantize_graph(gm: fx.GraphModule, example_inputs, config: DanonConfig
                   ) -> Tuple[fx.GraphModule, List[torch.Tensor], List[LinearReport]]:
    """Apply config.quantize to the linear layers of a Dynamo graph: (graph, extra inputs, report rows).

    The returned graph takes the quantized weights as trailing inputs, in the order of the extra list.
    Raises for a graph that needs a backward (quantize is inference-only).

    Example:
        >>> import torch
        >>> from danon.passes.options import DanonConfig
        >>> lin = torch.nn.Linear(64, 64)
        >>> rows = []
        >>> def backend(gm, inputs):
        ...     gm, extra, r = quantize_graph(gm, inputs, DanonConfig(quantize="int8-weight", target="eager"))
        ...     rows.extend(r)
        ...     return lambda *args: gm(*args, *extra)
        >>> x = torch.randn(2, 64)
        >>> with torch.no_grad():
        ...     out = torch.compile(lin, backend=backend)(x)
        ...     err = float((out - lin(x)).norm() / lin(x).norm())
        >>> rows[0].quantized, rows[0].bytes_before / rows[0].bytes_after > 3.5, err < 2e-2
        (True, True, True)
    """
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
        raise ValueError(
            f"danon option quantize={config.quantize!r} is for inference, but this graph is compiled for training "
            "(grad mode is on and parameters require grad). Run the model under torch.no_grad() or "
            "torch.inference_mode(), or call model.requires_grad_(False), or leave quantize='none'.")
    layers = find_linear_weights(gm, example_inputs)
    named = [(name, value) for name, _, value, _ in layers]
    measure: Optional[Callable[[Dict[int, torch.Tensor]], float]] = None
    if config.quantize_tolerance is not None:
        probe = _copy_with_weight_inputs(gm, layers, range(len(layers)))
        weights = [value for _, value in named]

        def run(quantized: Dict[int, torch.Tensor]):
            # fresh copies of the non-parameter inputs: a graph may update a buffer or a cache in place
            args = [x.clone() if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter)
                    else _concrete(x) for x in example_inputs]
            with torch.no_grad():
                return probe(*args, *[quantized.get(i, w) for i, w in enumerate(weights)])
        reference = run({})
        measure = lambda quantized: output_error(reference, run(quantized))   # noqa: E731
    rows, chosen, _ = decide(named, config.quantize, min_features=config.quantize_min_features,
                             skip=config.quantize_skip, tolerance=config.quantize_tolerance, measure=measure)
    if not chosen:
        return gm, [], rows
    which = sorted(chosen)
    return _copy_with_weight_inputs(gm, layers, which), [chosen[i] for i in which], rows


__all__ = ["quantize_graph", "decide", "quantized_weight", "tensor_bytes", "check_device", "skip_pattern",
           "module_name", "output_error", "find_linear_weights", "torchao_config"]
