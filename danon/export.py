"""`danon.export`: a model to an ONNX file, through the same passes and driver as the backend.

capture (Dynamo) -> the passes (danon/passes/pipeline.py; here the attention pass) -> torch.export (sequence
length dynamic) -> sparse danon ops decomposed to ATen -> torch.onnx (danon's onnxscript translations)
-> the file, checked by running it in ONNX Runtime on the example inputs against eager.
"""
from __future__ import annotations

import inspect
import os
from typing import Optional

import torch

from danon.core.torch_internals import dynamo_export_graph, tree_leaves
from danon.passes.options import DanonConfig

__all__ = ["export", "default_dynamic_shapes", "ExportCheckError"]


class ExportCheckError(RuntimeError):
    """The exported model, run in ONNX Runtime, does not match eager PyTorch."""


def _tensors(tree) -> list:
    return [x for x in tree_leaves(tree) if isinstance(x, torch.Tensor)]


def default_dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: Optional[dict] = None):
    """The batch and sequence dims (0 and 1) of every 2-D or 3-D tensor input are dynamic; everything else
    is static.

    Returns a dict by argument name (torch.export's `dynamic_shapes`).

    Example:
        >>> import torch, danon
        >>> m = danon.create_dense_model(hidden_size=16, num_heads=2, num_layers=1, vocab_size=10)
        >>> ids = torch.zeros(1, 8, dtype=torch.long)
        >>> spec = default_dynamic_shapes(m, (ids,), {"attention_mask": torch.ones(1, 8)})
        >>> sorted(spec), spec["input_ids"][0] is spec["input_ids"][1] is torch.export.Dim.DYNAMIC
        (['attention_mask', 'input_ids'], True)
    """
    from torch.export import Dim

    names = list(inspect.signature(model.forward).parameters)
    bound = dict(zip(names, args))
    bound.update(kwargs or {})
    spec = {}
    for name in names:
        if name not in bound:
            continue
        x = bound[name]
        if isinstance(x, torch.Tensor) and x.dim() in (2, 3) and x.shape[1] > 1:
            # Dim.DYNAMIC rather than a named Dim: the model's own checks (N <= max_sequence_length)
            # refine the range, which a named Dim reports as a violation; equal lengths are unified by Dynamo
            spec[name] = {0: Dim.DYNAMIC, 1: Dim.DYNAMIC}
        else:
            spec[name] = None
    return spec


def _check_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike naming the .onnx file to write, got {type(path).__name__}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"path {path!r}: its directory {folder!r} does not exist; create it first")
    if os.path.isdir(path):
        raise IsADirectoryError(f"path {path!r} is a directory; give the .onnx file name to write")
    return path


def _brief(err: Exception, limit: int = 1500) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _without_cache_output(model, kwargs: dict) -> dict:
    """kwargs with use_cache=False for a model whose config asks for a KV cache (transformers' default):
    its cache object is no tensor an ONNX graph can return, so the file returns the logits alone. An
    explicit use_cache=True is refused in one sentence."""
    if "use_cache" not in inspect.signature(model.forward).parameters:
        return kwargs
    if kwargs.get("use_cache"):
        raise ValueError("danon.export: use_cache=True cannot be exported (the KV cache is an object, not a tensor "
                         "output); pass use_cache=False or leave it out (the file then returns the logits)")
    return {**kwargs, "use_cache": False}


def _capture(model, args, kwargs, dynamic_shapes):
    """Dynamo's torch-level graph of `model` with the model's own signature (parameters as attributes)."""
    try:
        return dynamo_export_graph(model, dynamic_shapes, args, kwargs)
    except Exception as err:   # name the model and the reason; the traceback keeps the details
        raise RuntimeError(f"danon.export: {type(model).__name__} cannot be captured as one graph by "
                           f"torch._dynamo.export ({type(err).__name__}: {_brief(err)}); "
                           "graph breaks, data-dependent control flow and non-tensor outputs cannot be exported"
                           ) from err


# backend options that danon.export does not carry into the file, and why: accepting them would drop them
_NOT_EXPORTED = {
    "target": "the file is ONNX; run it with ONNX Runtime, or compile with torch.compile(..., "
              "options={'target': ...}) instead",
    "checkpoint": "an exported graph is inference only (no backward to recompute activations for)",
    "memory_budget": "it belongs to checkpoint='auto', which an inference-only export does not run",
    "max_activation_bytes": "it belongs to checkpoint='auto', which an inference-only export does not run",
    "quantize": "the file would hold float weights: int8/fp8 weights are not exported yet; quantize the saved "
                "file with onnxruntime.quantization (e.g. quantize_dynamic), or use torch.compile(..., "
                "options={'quantize': 'int8-weight'})",
    "quantize_min_features": "it belongs to quantize, which export does not do",
    "quantize_skip": "it belongs to quantize, which export does not do",
    "quantize_tolerance": "it belongs to quantize, which export does not do",
}


def _refuse_options_export_cannot_honour(options: dict) -> None:
    """Raise for a backend option `export` would otherwise accept and ignore (default values pass)."""
    defaults = DanonConfig()
    for name, why in _NOT_EXPORTED.items():
        if name in options and options[name] != getattr(defaults, name) and \
                not (name == "quantize_skip" and not options[name]):
            raise ValueError(f"danon.export: option {name}={options[name]!r} is not supported: {why}")
    options.pop("target", None)     # the default ("inductor") names nothing the file could hold either


def export(model: torch.nn.Module, args, path, *, kwargs: Optional[dict] = None, dynamic_shapes=None,
           attention: str = "exact", **options) -> str:
    """Export `model` to an ONNX file at `path` with danon attention; returns the path.

    args / kwargs: example inputs (a tuple, or one tensor). dynamic_shapes: as torch.export takes it,
    by argument name or position; default: `default_dynamic_shapes` (the sequence dim of 2-D and 3-D
    inputs). attention: "exact" | "ucsa" | "msra" | "dala" | "keep", and the other backend options
    (`min_seq_len`, default 0 here: an exported graph cannot switch family by length; family keywords
    such as `window`; `report=True` prints the attention pass's report). The backend's options that
    a file cannot carry (`target`, `checkpoint`, `quantize` and their settings) raise a ValueError
    instead of being ignored. A model whose forward takes `use_cache` (transformers) is exported with
    use_cache=False: the file returns the logits, not the KV cache object. Export options: `opset` (23 or 24; default 23), `check` (default True: run
    the file in ONNX Runtime on the example inputs and raise ExportCheckError with the measured
    relative error if it exceeds `tolerance`, default 1e-4).

    Example:
        >>> import os, tempfile, torch, danon
        >>> model = danon.create_dense_model(hidden_size=32, num_heads=2, num_layers=1, vocab_size=50).eval()
        >>> ids = torch.randint(0, 50, (1, 64))
        >>> from danon.export import export
        >>> path = export(model, (ids,), os.path.join(tempfile.mkdtemp(), "m.onnx"))
        >>> os.path.getsize(path) > 0
        True
    """
    from danon.backends import onnx as onnx_backend
    from danon.passes.pipeline import run_pipeline

    path = _check_path(path)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args = (args,) if isinstance(args, torch.Tensor) else tuple(args)
    kwargs = dict(kwargs or {})
    order = list(inspect.signature(model.forward).parameters)   # torch.export orders kwargs by the signature
    kwargs = dict(sorted(kwargs.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    kwargs = _without_cache_output(model, kwargs)
    opset = options.pop("opset", onnx_backend.DEFAULT_OPSET)
    if opset not in onnx_backend.SUPPORTED_OPSETS:
        raise ValueError(f"opset must be one of {', '.join(map(str, onnx_backend.SUPPORTED_OPSETS))} (ONNX Attention "
                         f"needs opset 23); got {opset!r}")
    check = options.pop("check", True)
    tolerance = options.pop("tolerance", 1e-4)
    _refuse_options_export_cannot_honour(options)
    options.setdefault("min_seq_len", 0)
    config = DanonConfig.from_options({"attention": attention, "target": "eager", **options})
    if dynamic_shapes is None:
        dynamic_shapes = default_dynamic_shapes(model, args, kwargs)

    with torch.no_grad(), onnx_backend.export_tracing():
        gm = _capture(model, args, kwargs, dynamic_shapes)
        # the backend's passes and driver: what export cannot honour was refused above, the rest runs here
        run = run_pipeline(gm, tree_leaves((args, kwargs)), config)
        gm = run.gm
        if run.state.extra_inputs or run.state.lowering is not None:   # a pass added what a file cannot carry
            raise RuntimeError(f"danon.export: passes {', '.join(run.ran)} left graph inputs or a lowering that a "
                               "file cannot carry; their options belong in _NOT_EXPORTED")
        if config.report:
            print(run.report)
        try:
            program = onnx_backend.export_program(gm, args, kwargs, dynamic_shapes=dynamic_shapes)
        except Exception as err:
            raise RuntimeError(f"danon.export: torch.export failed on the rewritten graph of {type(model).__name__} "
                               f"({type(err).__name__}: {_brief(err)})") from err
        onnx_program = onnx_backend.to_onnx(program, opset)
    onnx_program.save(path)
    if check:
        with torch.no_grad():
            expected = _tensors(model(*args, **kwargs))
        sess = onnx_backend.session(onnx_program.model_proto)
        got = onnx_backend.run_session(sess, _tensors((args, kwargs)))
        if len(got) != len(expected):
            raise ExportCheckError(f"the ONNX model at {path!r} returns {len(got)} outputs, eager returns "
                                   f"{len(expected)}")
        for i, (g, e) in enumerate(zip(got, expected)):
            err = onnx_backend.relative_error(g, e)
            if tuple(g.shape) != tuple(e.shape) or not err <= tolerance:
                raise ExportCheckError(
                    f"the ONNX model at {path!r} does not match eager PyTorch on the example inputs: output {i} "
                    f"has relative error {err:.3e} (tolerance {tolerance:g}), shapes {tuple(g.shape)} vs "
                    f"{tuple(e.shape)}")
    return path
