"""The op's argument list is written once (danon/core/attention_args.py); the executor registry picks who runs a call."""
from __future__ import annotations

import inspect

import pytest
import torch

import danon
from danon.core import executors
from danon.core.attention_args import (ARGUMENTS, BACKWARD_LEADING, BACKWARD_TRAILING, GRADIENTS, PLAN_TENSORS,
                                       AttentionArgs, BackwardArgs, attention_args, backward_call, split_backward)


def test_the_registered_schemas_are_the_argument_list():
    forward = [a.name for a in torch.ops.danon.attention.default._schema.arguments]
    backward = [a.name for a in torch.ops.danon.attention_backward.default._schema.arguments]
    assert forward == [name for name, _ in ARGUMENTS] == list(AttentionArgs._fields)
    assert backward == [name for name, _ in BACKWARD_LEADING + ARGUMENTS + BACKWARD_TRAILING]
    assert len(torch.ops.danon.attention_backward.default._schema.returns) == len(GRADIENTS)


def test_plan_tensors_are_the_plan_fields_the_op_reads():
    plan_fields = {f.name for f in danon.Plan.__dataclass_fields__.values()}
    assert set(PLAN_TENSORS) <= plan_fields
    assert PLAN_TENSORS == ("block_idx", "token_idx", "summary_idx", "summary_k", "summary_v", "summary_count",
                            "summary_pos")


def test_the_onnx_translation_takes_the_op_arguments_by_name():
    """torch.onnx matches a translation's parameters to the op's by name: the one place they are spelled again."""
    from danon.backends.onnx import attention_to_onnx
    assert list(inspect.signature(attention_to_onnx).parameters) == list(AttentionArgs._fields)


def test_split_backward_inverts_backward_call():
    q = torch.randn(1, 1, 8, 4)
    a = attention_args(q, q, q, scale=0.5, causal=True, block_size=4)
    g = BackwardArgs(q, q[..., 0], q, q[..., 0], True, False, True)
    g2, a2 = split_backward(backward_call(g, a))
    assert tuple(g2) == tuple(g) and all(x is y for x, y in zip(a2, a))


def test_attention_args_refuses_a_causal_flag_that_contradicts_the_plan():
    q = torch.randn(1, 1, 32, 4)
    plan = danon.attention_plan(q, q, q, kind="msra", causal=True, block_size=16, window=16, num_levels=1)
    with pytest.raises(ValueError, match="causal=False contradicts the plan"):
        attention_args(q, q, q, plan, scale=0.5, causal=False)


def test_registry_picks_by_device_and_priority_and_prefer_overrides():
    q = torch.randn(1, 2, 32, 8)
    a = attention_args(q, q, q, scale=0.3)
    assert executors.registered()[-1] == "cpu"
    assert executors.executor_for(a).name == "cpu"             # Triton claims CUDA tensors only
    with executors.prefer("triton"):
        assert executors.executor_for(a).name == "triton"      # ... unless asked for (interpreted on CPU)
        assert executors.executor_for(a._replace(q=q.double(), k=q.double(), v=q.double())).name == "cpu"
    assert executors.preferred() is None
    with pytest.raises(ValueError, match="unknown executor 'tpu'"):
        with executors.prefer("tpu"):
            pass


def test_a_call_no_executor_supports_names_the_registered_ones(monkeypatch):
    monkeypatch.setattr(executors, "_EXECUTORS", {})
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(RuntimeError, match="no registered executor runs danon::attention on cpu"):
        executors.executor_for(attention_args(q, q, q, scale=0.5))


def test_the_op_runs_the_executor_the_registry_picks(monkeypatch):
    """A registered executor of higher priority takes the calls it claims, forward and backward."""
    calls = []
    cpu = executors._EXECUTORS["cpu"]

    def forward(a):
        calls.append("forward")
        return cpu.forward(a)

    def backward(a, g):
        calls.append("backward")
        return cpu.backward(a, g)

    monkeypatch.setitem(executors._EXECUTORS, "spy", executors.Executor("spy", 100, ("cpu",), lambda a: True,
                                                                        forward, backward))
    q = torch.randn(1, 2, 32, 8, dtype=torch.float64, requires_grad=True)
    out = danon.exact_attention(q, q, q, causal=True)
    out.sum().backward()
    assert calls == ["forward", "backward"]
    ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert torch.allclose(out, ref, atol=1e-12)
