"""ONNX lowering: the rewritten graph to an ONNX model (torch.onnx, dynamo=True), and the `onnxrt` target.

How the danon op becomes ONNX:
- dense plans (the exact family) are translated by `attention_to_onnx`, an onnxscript function in
  the exporter's `custom_translation_table`: one ONNX `Attention` node (opset 23) carrying
  causal masking, key padding, a general mask, softcap and GQA (4-D inputs with fewer kv heads);
  where Attention cannot express the site it falls back to MatMul/Softmax;
- sparse plans are decomposed first (`ExportedProgram.run_decompositions`) into the gather-based
  ATen computation of danon/kernels/aten.py, which the exporter translates op by op, so the model
  keeps their cost and never builds an N x N tensor. Plan building is ordinary torch ops already.

Example:
    >>> import torch, danon
    >>> from danon.backends.onnx import to_onnx
    >>> class Attn(torch.nn.Module):
    ...     def forward(self, q):
    ...         return danon.exact_attention(q, q, q, causal=True)
    >>> q = torch.randn(1, 2, 32, 8)
    >>> ep = torch.export.export(Attn(), (q,))
    >>> [n.op_type for n in to_onnx(ep).model_proto.graph.node]
    ['Attention']
"""
from __future__ import annotations

import contextlib
import io
import logging
import operator
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from danon.core.plan import is_dense_plan
from danon.core.torch_internals import backed_size_oblivious, tree_unflatten
from danon.kernels.aten import sparse_decompositions

__all__ = ["SUPPORTED_OPSETS", "DEFAULT_OPSET", "attention_to_onnx", "export_program", "to_onnx", "session",
           "run_session", "relative_error", "export_tracing", "translation_table", "symint_floordiv",
           "OnnxRuntimeGraph", "compile_onnxrt"]

DEFAULT_OPSET = 23
# Attention needs opset 23; ONNX Runtime 1.23+ runs opset 23 and 24 on CPU.
SUPPORTED_OPSETS = (23, 24)


# --------------------------------------------------------------------------------------- translation
def _known_equal(a, b) -> bool:
    """Two ONNX dims known equal: the same int, or the same symbolic name."""
    if a is None or b is None:
        return False
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    return getattr(a, "value", None) is not None and getattr(a, "value", None) == getattr(b, "value", None)


def _onnx_dtype_is(x, *names: str) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and getattr(dtype, "name", str(dtype)).upper() in names


def attention_to_onnx(q, k, v, block_idx=None, token_idx=None, summary_idx=None, summary_k=None, summary_v=None,
                      summary_count=None, summary_pos=None, key_padding_mask=None, attn_mask=None, slopes=None,
                      scale: float = 1.0, causal: bool = False, block_size: int = 64, window: int = -1,
                      band: int = -1, softcap: Optional[float] = None):
    """Translate a dense-plan `danon::attention` into ONNX (traced onnxscript): returns (out, lse).

    One `Attention` node (opset 23) where it expresses the site; MatMul/Softmax where it does not
    (fp64 inputs, which ONNX Runtime's Attention kernel does not take). Query row i sits at position
    Nk - Nq + i, as in the op (causal masking aligned bottom-right): `is_causal` is used only when Nq
    and Nk are known equal, else it is an explicit mask. Rows that see no key
    return 0, as the op does. The lse is computed from its definition; the exporter's optimizer
    removes it when nothing uses it.
    """
    from onnxscript import opset23 as op

    if not is_dense_plan(block_idx, token_idx, summary_idx, window):
        raise NotImplementedError("danon: sparse plans are decomposed to ATen before the ONNX translation "
                                  "(danon/kernels/aten.py); a sparse danon::attention reached attention_to_onnx")
    q_len, k_len = q.shape[2], k.shape[2]
    neg_inf = op.CastLike(op.Constant(value_float=float("-inf")), q)
    zero = op.CastLike(op.Constant(value_float=0.0), q)

    bool_mask = None     # True = attend
    float_mask = None    # added to the logits
    if key_padding_mask is not None:
        bool_mask = op.Unsqueeze(op.Cast(key_padding_mask, to=9), op.Constant(value_ints=[1, 2]))   # [B, 1, 1, Nk]
    if attn_mask is not None:
        if _onnx_dtype_is(attn_mask, "BOOL"):
            bool_mask = attn_mask if bool_mask is None else op.And(bool_mask, attn_mask)
        else:
            float_mask = op.CastLike(attn_mask, q)
    q_n, k_n = op.Squeeze(op.Shape(q, start=2, end=3)), op.Squeeze(op.Shape(k, start=2, end=3))
    rows = op.Unsqueeze(op.Range(op.Sub(k_n, q_n), k_n, op.Constant(value_int=1)),
                        op.Constant(value_ints=[1]))                                  # [Nq, 1]: positions Nk - Nq + i
    cols = op.Unsqueeze(op.Range(op.Constant(value_int=0), op.Squeeze(op.Shape(k, start=2, end=3)),
                                 op.Constant(value_int=1)), op.Constant(value_ints=[0]))           # [1, Nk]
    if slopes is not None:   # ALiBi: -slope_h * |i - j|, [1, H, Nq, Nk]
        dist = op.CastLike(op.Abs(op.Sub(rows, cols)), q)
        bias = op.Mul(op.Neg(op.Reshape(op.CastLike(slopes, q), op.Constant(value_ints=[1, -1, 1, 1]))), dist)
        float_mask = bias if float_mask is None else op.Add(float_mask, bias)
    use_is_causal = causal and bool_mask is None and float_mask is None and _known_equal(q_len, k_len)
    if causal and not use_is_causal:
        tril = op.LessOrEqual(cols, rows)                                                           # [Nq, Nk]
        bool_mask = tril if bool_mask is None else op.And(bool_mask, tril)

    seeing = None   # [.., Nq, 1]: rows with a visible key (None: every row sees one)
    if key_padding_mask is not None or attn_mask is not None or (causal and not use_is_causal):
        visible = bool_mask
        if float_mask is not None and attn_mask is not None and not _onnx_dtype_is(attn_mask, "BOOL"):
            finite = op.Greater(float_mask, neg_inf)
            visible = finite if visible is None else op.And(visible, finite)
        seeing = op.Cast(op.ReduceMax(op.Cast(visible, to=6), op.Constant(value_ints=[-1]), keepdims=1), to=9)
    mask = None
    mask_is_bool = float_mask is None and bool_mask is not None
    if float_mask is not None:
        mask = float_mask if bool_mask is None else op.Add(float_mask, op.Where(bool_mask, zero, neg_inf))
        if seeing is not None:   # a row that sees nothing attends everything (no NaN), then becomes 0
            mask = op.Where(seeing, mask, zero)
    elif bool_mask is not None:
        mask = bool_mask if seeing is None else op.Or(bool_mask, op.Not(seeing))
    if mask is not None:   # ONNX Runtime's Attention wants the query dim spelled out: [.., Nq, Nk], not [.., 1, Nk]
        mask = op.Expand(mask, op.Concat(op.Shape(q, start=2, end=3), op.Constant(value_ints=[1]), axis=0))

    fp64 = _onnx_dtype_is(q, "DOUBLE")
    logits = None
    if fp64:   # ONNX Runtime's CPU Attention kernel takes fp32/fp16 only: MatMul/Softmax
        out, logits = _attention_matmul_softmax(op, q, k, v, mask, mask_is_bool, scale, softcap, use_is_causal,
                                                neg_inf)
    else:
        kwargs = {"scale": float(scale), "is_causal": 1 if use_is_causal else 0}
        if softcap is not None:
            kwargs["softcap"] = float(softcap)
        out, _, _, _ = op.Attention(q, k, v, mask, **kwargs)
    if seeing is not None:
        out = op.Where(seeing, out, zero)
    lse = _lse(op, q, k, mask, mask_is_bool, scale, softcap, use_is_causal, neg_inf, logits)
    if seeing is not None:
        lse = op.Where(op.Squeeze(seeing, op.Constant(value_ints=[-1])), lse, op.CastLike(neg_inf, lse))
    return out, lse


def _repeat_kv(op, q, k):
    """[B, Hkv, N, D] -> [B, H, N, D] (GQA) for the MatMul path."""
    b = op.Shape(k, start=0, end=1)
    hkv = op.Shape(k, start=1, end=2)
    rep = op.Div(op.Shape(q, start=1, end=2), hkv)
    n = op.Shape(k, start=2, end=3)
    d = op.Shape(k, start=3, end=4)
    expanded = op.Expand(op.Unsqueeze(k, op.Constant(value_ints=[2])), op.Concat(b, hkv, rep, n, d, axis=0))
    return op.Reshape(expanded, op.Concat(b, op.Shape(q, start=1, end=2), n, d, axis=0))


def _logits(op, q, k, mask, mask_is_bool, scale, softcap, causal, neg_inf):
    """Masked logits [B, H, Nq, Nk] in the order of the op: scale, softcap, then the mask."""
    kk = _repeat_kv(op, q, k)
    logits = op.Mul(op.MatMul(q, op.Transpose(kk, perm=[0, 1, 3, 2])), op.CastLike(op.Constant(value_float=scale), q))
    if softcap is not None:
        c = op.CastLike(op.Constant(value_float=softcap), q)
        logits = op.Mul(c, op.Tanh(op.Div(logits, c)))
    if mask is not None:
        logits = op.Where(mask, logits, neg_inf) if mask_is_bool else op.Add(logits, mask)
    if causal:
        rows = op.Unsqueeze(op.Range(op.Constant(value_int=0), op.Squeeze(op.Shape(q, start=2, end=3)),
                                     op.Constant(value_int=1)), op.Constant(value_ints=[1]))
        cols = op.Unsqueeze(op.Range(op.Constant(value_int=0), op.Squeeze(op.Shape(k, start=2, end=3)),
                                     op.Constant(value_int=1)), op.Constant(value_ints=[0]))
        logits = op.Where(op.LessOrEqual(cols, rows), logits, neg_inf)
    return logits


def _attention_matmul_softmax(op, q, k, v, mask, mask_is_bool, scale, softcap, causal, neg_inf):
    logits = _logits(op, q, k, mask, mask_is_bool, scale, softcap, causal, neg_inf)
    return op.MatMul(op.Softmax(logits, axis=-1), _repeat_kv(op, q, v)), logits


def _lse(op, q, k, mask, mask_is_bool, scale, softcap, causal, neg_inf, logits=None):
    """log-sum-exp of the masked logits, in fp32 (fp64 for fp64 inputs), as the op's second output."""
    if logits is None:
        logits = _logits(op, q, k, mask, mask_is_bool, scale, softcap, causal, neg_inf)
    if not _onnx_dtype_is(q, "DOUBLE"):
        logits = op.Cast(logits, to=1)
    return op.ReduceLogSumExp(logits, op.Constant(value_ints=[-1]), keepdims=0)


def symint_floordiv(a, b):
    """Python's floor division of two symbolic sizes (ceil-div `-(-n // b)` is how danon counts blocks).

    The exporter's own translation of `operator.floordiv` is a plain ONNX Div, which truncates
    toward zero: right for non-negative operands only, so -(-n // b) came out as floor(n / b).
    """
    from onnxscript import opset23 as op
    a = op.Cast(a, to=7)
    b = op.CastLike(b, a)
    zero = op.CastLike(op.Constant(value_int=0), a)
    inexact = op.Not(op.Equal(op.Mod(a, b), zero))
    signs_differ = op.Not(op.Equal(op.Less(a, zero), op.Less(b, zero)))
    return op.Sub(op.Div(a, b), op.Cast(op.And(inexact, signs_differ), to=7))


def translation_table() -> Dict[Callable, Callable]:
    """The exporter's custom translations: the danon op, and a floor division that floors."""
    return {torch.ops.danon.attention.default: attention_to_onnx, operator.floordiv: symint_floordiv}


# --------------------------------------------------------------------------------------- export
@contextlib.contextmanager
def _quiet():
    """torch.onnx prints its progress and torchvision warnings: keep them out of the user's output."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter._registration")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def export_tracing():
    """Trace sizes size-obliviously (torch.fx.experimental config `backed_size_oblivious`).

    Without it, the stride bookkeeping of views guards on whether a symbolic size is 1 (e.g. the
    number of level-2 MSRA spans), which narrows the range of sequence lengths the export is valid for.
    """
    with backed_size_oblivious():
        yield


def export_program(module: torch.nn.Module, args: tuple, kwargs: Optional[dict] = None,
                   dynamic_shapes=None) -> torch.export.ExportedProgram:
    """torch.export the (rewritten) module, then decompose the sparse danon ops into ATen.

    Example:
        >>> import torch, danon
        >>> class Attn(torch.nn.Module):
        ...     def forward(self, q):
        ...         return danon.msra_attention(q, q, q, causal=True, block_size=16, window=16, num_levels=1)
        >>> ep = export_program(Attn(), (torch.randn(1, 2, 64, 8),))
        >>> any("danon" in str(n.target) for n in ep.graph.nodes)   # the sparse op is gone
        False
    """
    ep = torch.export.export(module, tuple(args), kwargs=kwargs or None, dynamic_shapes=dynamic_shapes)
    return ep.run_decompositions(sparse_decompositions())


def to_onnx(program: torch.export.ExportedProgram, opset: int = DEFAULT_OPSET):
    """An ExportedProgram to an in-memory `torch.onnx.ONNXProgram` with danon's translations
    (and its broadcast shape annotations repaired, see `repair_broadcast_shapes`)."""
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(f"opset must be one of {', '.join(map(str, SUPPORTED_OPSETS))} (ONNX Attention needs "
                         f"opset 23); got {opset!r}")
    with _quiet():
        onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset,
                                         custom_translation_table=translation_table(), verbose=False,
                                         optimize=False)
    repair_broadcast_shapes(onnx_program.model.graph)
    return onnx_program


# element-wise ops whose output shape is the broadcast of their inputs' shapes
_BROADCASTING_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Min", "Max", "Where", "And", "Or", "Xor", "Not", "Equal", "Less",
    "LessOrEqual", "Greater", "GreaterOrEqual", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot", "Cast",
    "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Relu", "Sigmoid", "Tanh", "IsInf", "IsNaN", "Sign",
})


def repair_broadcast_shapes(graph) -> int:
    """Give back the symbolic size to element-wise outputs annotated 1 where an input has that size.

    When a plan size is 1 at the export length (e.g. MSRA's coarsest level at N = 128), torch.export can
    annotate an element-wise op's output with a literal 1 where its input keeps the symbolic size. The
    computation is right, but ONNX Runtime plans buffer re-use from these annotations and fails at
    lengths where the size is not 1 ("Shape mismatch attempting to re-use buffer"). The output of a
    broadcasting op is the broadcast of its inputs, so a literal 1 there, with one symbolic size and only
    1s among the inputs on that axis, is that symbol. Hand-written: the exporter has no such check.
    Returns the number of dims repaired (graph: an onnx_ir Graph, changed in place).

    Example:
        >>> import onnx_ir as ir
        >>> x = ir.Value(name="x", shape=ir.Shape([1, "n"]), type=ir.TensorType(ir.DataType.FLOAT))
        >>> one = ir.Value(name="one", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT))
        >>> node = ir.Node("", "Add", [x, one])
        >>> node.outputs[0].shape = ir.Shape([1, 1])          # the wrong annotation
        >>> g = ir.Graph([x, one], node.outputs, nodes=[node])
        >>> repair_broadcast_shapes(g), node.outputs[0].shape
        (1, Shape([1, SymbolicDim('n')]))
    """
    import onnx_ir as ir   # torch.onnx's IR (a dependency of onnxscript); danon's onnx extra brings it

    repaired = 0
    for node in graph:   # topological order: a repaired output is seen repaired by its users
        if node.op_type not in _BROADCASTING_OPS or node.domain not in ("", "ai.onnx"):
            continue
        out = node.outputs[0]
        inputs = [v for v in node.inputs if v is not None]
        if out.shape is None or not inputs or any(v.shape is None for v in inputs):
            continue
        dims = list(out.shape)
        for axis in range(1, len(dims) + 1):          # broadcasting aligns the trailing dims
            if dims[-axis] != 1:
                continue
            on_axis = [v.shape[-axis] for v in inputs if len(v.shape) >= axis]
            symbols = {d.value for d in on_axis if isinstance(d, ir.SymbolicDim) and d.value is not None}
            if len(symbols) == 1 and all(isinstance(d, ir.SymbolicDim) or d == 1 for d in on_axis):
                dims[-axis] = ir.SymbolicDim(symbols.pop())
                repaired += 1
        if dims != list(out.shape):
            out.shape = ir.Shape(dims)
    return repaired


def session(model_proto, threads: Optional[int] = None):
    """An ONNX Runtime CPU InferenceSession on an in-memory ModelProto."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_session(sess, inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Run a session on tensors given in the graph's input order; returns torch tensors."""
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(inputs):
        raise ValueError(f"the ONNX model takes {len(names)} inputs ({', '.join(names)}), got {len(inputs)}")
    feeds = {n: x.detach().contiguous().numpy() for n, x in zip(names, inputs)}
    return [torch.from_numpy(o) for o in sess.run(None, feeds)]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 (0 when both are empty or zero)."""
    got, want = got.double(), want.double()
    denom = want.norm()
    diff = (got - want).norm()
    return float(diff / denom) if denom > 0 else float(diff)


# --------------------------------------------------------------------------------------- onnxrt target
class _Bound(torch.nn.Module):
    """A graph whose SymInt inputs are fixed to one call's values, so it takes tensors only."""

    def __init__(self, gm: fx.GraphModule, ints: Dict[int, int], n_inputs: int):
        super().__init__()
        self.gm, self.ints, self.n_inputs = gm, ints, n_inputs

    def forward(self, *tensors):
        it = iter(tensors)
        args = [self.ints[i] if i in self.ints else next(it) for i in range(self.n_inputs)]
        return self.gm(*args)


class OnnxRuntimeGraph:
    """The callable the `onnxrt` target returns: one ONNX Runtime session per input signature.

    A signature is the inputs' shapes and dtypes (and the values of integer inputs); a new one
    exports the graph again (static shapes) and opens a session. Inference only.
    """

    def __init__(self, gm: fx.GraphModule, opset: int = DEFAULT_OPSET):
        self.gm, self.opset = gm, opset
        self.sessions: Dict[tuple, Tuple[Any, Any]] = {}

    @staticmethod
    def signature(args) -> tuple:
        return tuple((tuple(a.shape), a.dtype, str(a.device)) if isinstance(a, torch.Tensor) else ("int", int(a))
                     for a in args)

    def _build(self, args):
        ints = {i: int(a) for i, a in enumerate(args) if not isinstance(a, torch.Tensor)}
        tensors = tuple(a for a in args if isinstance(a, torch.Tensor))
        module = _Bound(self.gm, ints, len(args))
        with torch.no_grad():
            program = export_program(module, tensors)
        onnx_program = to_onnx(program, self.opset)
        return session(onnx_program.model_proto), program.call_spec.out_spec

    def __call__(self, *args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            raise RuntimeError("danon target='onnxrt' runs inference only, and this call needs gradients (grad mode "
                               "is on and an input or parameter requires grad): call the model under "
                               "torch.no_grad() or torch.inference_mode(), or compile with target='inductor' "
                               "for training")
        if any(t.device.type != "cpu" for t in tensors):
            raise RuntimeError("danon target='onnxrt' runs on CPU tensors (ONNX Runtime's CPU provider); got "
                               f"{sorted({str(t.device) for t in tensors if t.device.type != 'cpu'})}")
        key = self.signature(args)
        if key not in self.sessions:
            self.sessions[key] = self._build(args)
        sess, out_spec = self.sessions[key]
        outputs = run_session(sess, tensors)
        return tree_unflatten(outputs, out_spec)


def compile_onnxrt(gm: fx.GraphModule, example_inputs, opset: int = DEFAULT_OPSET) -> Callable:
    """The `onnxrt` lowering of a rewritten Dynamo graph (sessions are built on first call per signature).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> f = lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=True)
        >>> q = torch.randn(1, 2, 64, 8)
        >>> with torch.no_grad():
        ...     out = torch.compile(f, backend="danon", options={"target": "onnxrt"})(q)
        >>> bool(torch.allclose(out, f(q), atol=1e-5))
        True
    """
    return OnnxRuntimeGraph(gm, opset)
