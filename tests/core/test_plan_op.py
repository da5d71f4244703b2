"""`danon::plan`: its fake impl (closed-form sizes, danon/core/plan_shapes.py) against the built plans,
torch.library's opcheck of the op, and compiles over symbolic lengths that neither guard nor change results."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

import danon
from danon.core.plan_shapes import plan_shapes
from danon.core.plan_op import FIELDS, _pack, _run_builder

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


@st.composite
def plan_cases(draw):
    kind = draw(st.sampled_from(["msra", "ucsa", "dala"]))
    b = draw(st.sampled_from([4, 8, 16]))
    hkv = draw(st.sampled_from([1, 2]))
    h = hkv * draw(st.sampled_from([1, 2]))
    n = draw(st.integers(1, 300))
    causal = draw(st.booleans())
    window = draw(st.integers(1, 4 * b))
    if kind == "msra":
        options = dict(window=window, num_levels=draw(st.sampled_from([0, 1, 2, 3, "auto"])),
                       compression_factor=draw(st.sampled_from([2, 3, 4])))
    elif kind == "ucsa":
        sparsity = draw(st.sampled_from([None, 0.0, 0.1, 0.5, 1.0]))
        options = dict(local_window_size=window, global_tokens=draw(st.sampled_from([0, 1, b, 5 * b])),
                       top_k_blocks=draw(st.integers(0, 6)), sparsity_factor=sparsity, compress=draw(st.booleans()),
                       gamma=draw(st.sampled_from([None, 0.5, 0.95])))
    else:
        options = dict(window=window, memory_size=draw(st.sampled_from([0, 1, 7, 64])),
                       decay=draw(st.sampled_from(["alibi", "none"])), compress_rest=draw(st.booleans()))
    options.update(block_size=b, causal=causal)
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    padded = draw(st.booleans())
    dk, dv = draw(st.sampled_from([(8, 8), (8, 12)]))
    return kind, h, hkv, n, dk, dv, dtype, padded, options


def _inputs(h, hkv, n, dk, dv, dtype, padded, batch=2):
    q = torch.randn(batch, h, n, dk, dtype=dtype)
    k = torch.randn(batch, hkv, n, dk, dtype=dtype)
    v = torch.randn(batch, hkv, n, dv, dtype=dtype)
    kpm = None
    if padded:
        kpm = torch.ones(batch, n, dtype=torch.bool)
        kpm[1, : n // 3] = False
    return q, k, v, kpm


@SETTINGS
@given(plan_cases())
def test_closed_form_sizes_equal_the_built_plan(case):
    kind, h, hkv, n, dk, dv, dtype, padded, options = case
    q, k, v, kpm = _inputs(h, hkv, n, dk, dv, dtype, padded)
    rest = {name: value for name, value in options.items() if name not in ("sparsity_factor", "gamma")}
    built = _pack(_run_builder(kind, q, k, v, kpm, None, options.get("sparsity_factor"), json.dumps(rest),
                               options.get("gamma")), q)
    shapes = plan_shapes(kind, q, k, v, kpm, options)
    for field, tensor in zip(FIELDS, built):
        if tensor.dim() == 1:            # a field the plan leaves None
            assert field not in shapes, (field, shapes[field])
        else:
            assert shapes.get(field) == (tuple(tensor.shape), tensor.dtype), field


@pytest.mark.parametrize("kind,options", [
    ("msra", dict(window=16, num_levels=2, compression_factor=2)),
    ("msra", dict(window=8, num_levels="auto", compression_factor=4)),
    ("ucsa", dict(local_window_size=16, global_tokens=8, top_k_blocks=2, sparsity_factor=None, compress=True)),
    ("ucsa", dict(local_window_size=8, global_tokens=0, top_k_blocks=0, sparsity_factor=0.3, compress=False)),
    ("ucsa", dict(local_window_size=8, global_tokens=8, top_k_blocks=3, sparsity_factor=None, compress=True,
                  gamma=0.7, scale=0.5)),
    ("dala", dict(window=16, memory_size=8, decay="alibi", compress_rest=True)),
])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_opcheck_plan_op(kind, options, padded, grad):
    """torch.library's own checks: fake impl against the kernel (shapes, dtypes, strides), schema, autograd.

    With grad, opcheck's AOT test sums every output into one loss starting from its first output; an
    integer first output (UCSA's block lists) makes that sum an integer it cannot add floats to (a limit
    of the harness, not of the op), so UCSA's backward runs the other checks here and its values are checked by tests/core/test_gradients.py."""
    options = dict(options, block_size=8, causal=True)
    q, k, v, kpm = _inputs(4, 2, 100, 8, 8, torch.float64, padded)
    floats = ("sparsity_factor", "gamma", "scale")
    rest = {name: value for name, value in options.items() if name not in floats}
    args = (q, k, v, kpm, None, options.get("sparsity_factor"), kind, json.dumps(rest, sort_keys=True),
            options.get("gamma"), options.get("scale"))
    checks = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if grad:
        if not torch.ops.danon.plan(*args)[0].is_floating_point():
            checks = checks[:-1]
        k.requires_grad_(True)
        v.requires_grad_(True)
    torch.library.opcheck(torch.ops.danon.plan.default, args, test_utils=checks)


class _Family(torch.nn.Module):
    def __init__(self, kind, **kw):
        super().__init__()
        self.fn, self.kw = getattr(danon, f"{kind}_attention"), kw

    def forward(self, q, k, v):
        return self.fn(q, k, v, causal=True, **self.kw)


@pytest.mark.parametrize("kind,kw", [
    ("msra", dict(block_size=16, window=16, num_levels=2, compression_factor=2)),
    ("ucsa", dict(block_size=16, local_window_size=16, global_tokens=16, top_k_blocks=2, sparsity_factor=0.25)),
    ("ucsa", dict(block_size=16, local_window_size=16, global_tokens=16, top_k_blocks=4, gamma=0.8)),
    ("dala", dict(block_size=16, window=16, memory_size=8)),
])
def test_one_symbolic_graph_serves_lengths_where_plan_sizes_cross_their_bounds(kind, kw):
    """dynamic=True: one graph for lengths on both sides of the bounds the sizes are clamped by (global
    blocks vs Tk, top-k vs Tk, memory vs N, MSRA's span capacities vs spans); each output equals eager's.
    (MSRA's "auto" levels guard by design: a level count changes the plan's structure.)"""
    lengths = (24, 97, 200)
    module = _Family(kind, **kw)
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return danon.danon_backend(gm, example_inputs, {"attention": "keep", "target": "inductor"})

    compiled = torch.compile(module, backend=backend, dynamic=True)
    with torch.no_grad():
        for i, n in enumerate(lengths):
            q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
            torch.testing.assert_close(compiled(q, k, v), module(q, k, v), atol=1e-5, rtol=1e-5)
            if i == 0:
                # the first call may compile twice: Dynamo restarts its analysis once the op specializes
                # UCSA's sparsity_factor (dynamic=True traces a module's float attribute as a SymFloat)
                first = len(compiles)
    assert len(compiles) == first, f"lengths {lengths[1:]} compiled again ({len(compiles) - first} more)"
