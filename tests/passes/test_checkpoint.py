"""Activation checkpointing (danon/passes/checkpoint.py): checkpoint="auto" under a memory budget.

Bytes saved for backward are measured independently of the pass, with saved_tensors_hooks around the
compiled forward: every tensor the forward saves, graph inputs (parameters, buffers, input ids) and
views of them not counted, views of one storage counted once. Gradients of the checkpointed compile must equal
the plain compile's (recomputing gives the same numbers: fp32 rel. error < 1e-5).
"""
import pytest
import torch

import danon
from danon.backend import collect_reports

N, VOCAB = 256, 100


def _danon_model():
    torch.manual_seed(0)
    return danon.create_dense_model(hidden_size=64, num_heads=4, num_layers=4, vocab_size=VOCAB,
                                    max_sequence_length=N, hidden_dropout=0.0)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=N, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation="sdpa"))


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def train_step(make_model, options):
    """One compiled training step: (activation bytes saved for backward, gradients, compile report)."""
    torch._dynamo.reset()
    model = make_model()
    ids = torch.randint(0, VOCAB, (2, N), generator=torch.Generator().manual_seed(1))
    fn = torch.compile(model, backend="danon", options={"min_seq_len": 0, **options})
    saved = []
    with collect_reports() as report:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            logits = _logits(fn(ids))
    graph_inputs = [*model.parameters(), *model.buffers(), ids]
    inputs = {t.untyped_storage().data_ptr() for t in graph_inputs}
    storages = {}
    for t in saved:
        key = t.untyped_storage().data_ptr()
        if key not in inputs:
            storages[key] = max(storages.get(key, 0), t.nbytes)
    logits.float().pow(2).mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return sum(storages.values()), grads, report


def assert_same_grads(a, b):
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        err = float((a[name] - b[name]).norm() / b[name].norm().clamp_min(1e-30))
        assert err < 1e-5, (name, err)


@pytest.mark.parametrize("make_model, target", [
    (_danon_model, "eager"),
    pytest.param(_danon_model, "inductor", marks=pytest.mark.slow),     # 36 s: -m slow
    (_gpt2, "eager"),
    pytest.param(_gpt2, "inductor", marks=pytest.mark.slow),
], ids=["danon-4-layer-eager", "danon-4-layer-inductor", "gpt2-eager", "gpt2-inductor"])
def test_auto_half_budget_saves_at_most_55_percent_with_equal_gradients(make_model, target):
    plain_bytes, plain_grads, plain = train_step(make_model, {"target": target})
    settings = (torch._functorch.config.activation_memory_budget, torch._inductor.config.custom_partitioner_fn,
                torch._functorch.config.is_non_builtin_to_include)
    auto_bytes, auto_grads, report = train_step(make_model, {"target": target, "checkpoint": "auto",
                                                             "memory_budget": 0.5})
    assert settings == (torch._functorch.config.activation_memory_budget,      # patched for the compile only
                        torch._inductor.config.custom_partitioner_fn, torch._functorch.config.is_non_builtin_to_include)
    assert plain.checkpoint == []                       # checkpoint="none": no row, no partitioner
    assert_same_grads(auto_grads, plain_grads)
    (row,) = report.checkpoint
    assert row.training and row.saved_bytes_after == auto_bytes      # the report's number is the one the hooks saw
    # the default: AOTAutograd's default partition, what Inductor saves with checkpoint="none" (the eager
    # target without checkpointing runs the graph under plain autograd, which saves differently)
    default_bytes = row.saved_bytes_before
    if target == "inductor":
        assert default_bytes == plain_bytes
    assert default_bytes > 0
    assert auto_bytes <= 0.55 * default_bytes, (auto_bytes, default_bytes)
    assert row.recomputed_ops_after > row.recomputed_ops_before
    assert row.recompute_flops_after >= row.recompute_flops_before
    # attention-aware: at half the memory the backward repeats cheaper work than attention
    assert report.replaced == len(report.sites) > 0
    assert row.recomputed_attention == 0


def test_budget_zero_saves_only_graph_inputs():
    default_bytes, default_grads, _ = train_step(_danon_model, {"target": "eager"})
    zero_bytes, zero_grads, report = train_step(_danon_model, {"target": "eager", "checkpoint": "auto",
                                                                "memory_budget": 0.0})
    assert default_bytes > 0 and zero_bytes == 0
    assert report.checkpoint[0].saved_bytes_after == 0
    assert report.checkpoint[0].recomputed_attention == 4      # every layer's attention runs again
    assert_same_grads(zero_grads, default_grads)


def test_max_activation_bytes_caps_the_saved_bytes_and_plans_are_recomputed():
    cap = 2 * 2 ** 20
    used, grads, report = train_step(_danon_model, {"target": "eager", "attention": "msra", "window": 64,
                                                    "block_size": 16, "checkpoint": "auto",
                                                    "max_activation_bytes": cap})
    (row,) = report.checkpoint
    assert used <= cap and row.saved_bytes_after == used and row.target_bytes == cap
    assert row.saved_bytes_before > cap
    assert row.tagged_recompute > 0                   # MSRA's plan nodes: rebuilt in the backward
    _, plain_grads, _ = train_step(_danon_model, {"target": "eager", "attention": "msra", "window": 64,
                                                  "block_size": 16})
    assert_same_grads(grads, plain_grads)


def test_inference_graph_gets_a_row_and_no_partition():
    torch._dynamo.reset()
    model = _danon_model().eval()
    ids = torch.randint(0, VOCAB, (1, 64))
    with torch.no_grad(), collect_reports() as report:
        out = torch.compile(model, backend="danon", options={"target": "eager", "checkpoint": "auto"})(ids)
        ref = model(ids)
    assert torch.allclose(out, ref, atol=1e-5)
    (row,) = report.checkpoint
    assert not row.training and row.saved_bytes_after is None and "inference" in row.note
