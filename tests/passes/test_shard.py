"""danon.shard / danon.shard_plan: tensor-parallel plans applied with torch.distributed (DTensor).

The distributed checks run in 2 processes with the gloo backend on CPU (one spawn for all of them,
bounded in time; tests/passes/_shard_workers.py), against unsharded float64 copies of the same models.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist

from danon.models import create_dala_model, create_dense_model
from danon.shard import ShardPlan, local_parameter_bytes, shard, shard_plan
from _spawn import spawn_ranks

WORLD = 2
FP32 = 1e-5


def _spawn(tmp_path, target: str, full: bool, timeout: float) -> list:
    """Run tests/passes/_shard_workers.run_checks on WORLD ranks; returns each rank's results."""
    sys.path.insert(0, os.path.dirname(__file__))
    try:
        import _shard_workers
    finally:
        sys.path.pop(0)
    return spawn_ranks(_shard_workers.run_checks, WORLD, (target, full), tmp_path, timeout)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    # Dynamo traces and the danon rewrite run in every rank; target="eager" keeps the default suite fast
    # (Inductor on DTensor graphs is checked by the slow test below)
    return _spawn(tmp_path_factory.mktemp("shard"), "eager", full=False, timeout=300)


def _models(ranks, name):
    if name.startswith("llama") and "llama_skipped" in ranks[0]:
        pytest.skip(ranks[0]["llama_skipped"])
    return [r[name] for r in ranks]


@pytest.mark.parametrize("name", ["dense", "llama_gqa"])
def test_sharded_outputs_equal_unsharded(ranks, name):
    for r, res in enumerate(_models(ranks, name)):
        assert res["replicated"] == {}, res["plan"]
        assert len(res["sharded"]) == 4, res["plan"]           # 2 attention blocks + 2 MLPs
        assert res["exact_err"] < FP32, (r, res["exact_err"])
        # the danon op replaced every site and ran on the local heads: 4 heads / 2 ranks, 2 kv heads / 2 ranks
        assert [s["replaced"] for s in res["exact_sites"]] == [True, True]
        assert all(s["q"][1] == 2 and s["k"][1] == 1 for s in res["exact_sites"]), res["exact_sites"]


def test_danon_op_sees_local_tensors_not_dtensors(ranks):
    for res in _models(ranks, "dense"):
        assert len(res["op_inputs"]) == 2
        assert all(x["type"] != "DTensor" and x["heads"] == 2 for x in res["op_inputs"]), res["op_inputs"]


def test_sparse_family_sharded_equals_unsharded(ranks):
    for r, res in enumerate(_models(ranks, "dense")):
        assert res["msra_families"] == ["msra", "msra"]
        # really sparse: fewer keys per query than the 128 of exact attention, and a different output
        assert all(k < 100 for k in res["msra_keys_per_query"]), res["msra_keys_per_query"]
        assert res["msra_vs_exact"] > 1e-3
        assert res["msra_err"] < FP32, (r, res["msra_err"])


@pytest.mark.parametrize("name", ["dense", "llama_gqa"])
def test_per_rank_parameter_bytes_about_half(ranks, name):
    for res in _models(ranks, name):
        assert res["local_bytes"] == res["plan_bytes"]       # the plan's estimate is what each rank holds
        assert 0.5 <= res["local_bytes"] / res["total_bytes"] < 0.6, res["plan"]


@pytest.mark.parametrize("name, why", [("dense_3_heads", "3 query heads do not divide by world_size 2"),
                                       ("llama_kv1", "1 kv heads do not divide by world_size 2")])
def test_heads_that_do_not_divide_stay_replicated(ranks, name, why):
    for res in _models(ranks, name):
        assert len(res["replicated"]) == 2 and set(res["replicated"].values()) == {why}, res["plan"]
        assert len(res["sharded"]) == 2 and all(m.endswith("mlp") for m in res["sharded"]), res["plan"]
        assert "replicated: " + why in res["plan"]
        assert res["exact_err"] < FP32
        heads = 3 if name == "dense_3_heads" else 4
        assert all(s["q"][1] == heads for s in res["exact_sites"]), res["exact_sites"]
        assert res["local_bytes"] == res["plan_bytes"] < res["total_bytes"]


def test_training_step_gradients_equal_unsharded(ranks):
    for r, rank in enumerate(ranks):
        t = rank["training"]
        assert t["sharded"] == 4
        assert t["param_types"]["layers.0.attention.q_proj.weight"] == "DTensor"
        assert t["param_types"]["layers.0.attention_norm.weight"] == "Parameter"
        assert t["loss_err"] < FP32
        bad = {n: e for n, e in t["grad_errs"].items() if not e < FP32}
        assert not bad, (r, bad)
        assert len(t["grad_errs"]) == len(list(create_dense_model(
            hidden_size=64, num_heads=4, num_kv_heads=2, num_layers=2, vocab_size=64).parameters()))
        assert t["step_err"] < FP32


@pytest.mark.slow
def test_sharded_inductor_and_llama_sparse(tmp_path):
    """The same checks with Inductor lowering (target="inductor") and MSRA on the Llama too."""
    results = _spawn(tmp_path, "inductor", full=True, timeout=1500)
    for res in results:
        for name in ("dense", "llama_gqa"):
            if name in res:
                assert res[name]["exact_err"] < FP32 and res[name]["msra_err"] < FP32, res[name]
        assert res["dense_3_heads"]["exact_err"] < FP32
        assert all(e < FP32 for e in res["training"]["grad_errs"].values())


# ---- without a process group ------------------------------------------------------------------

def _tiny(**kw):
    torch.manual_seed(0)
    base = dict(hidden_size=32, num_heads=4, num_kv_heads=2, num_layers=1, vocab_size=20)
    base.update(kw)
    return create_dense_model(**base)


IDS = torch.randint(0, 20, (1, 16))


def test_shard_plan_without_process_group():
    assert not dist.is_initialized()
    plan = shard_plan(_tiny(), IDS, world_size=2)
    assert isinstance(plan, ShardPlan) and plan.world_size == 2
    attn, mlp = plan.blocks
    assert (attn.kind, attn.module, attn.heads, attn.kv_heads, attn.sharded) == \
        ("attention", "layers.0.attention", 4, 2, True)
    assert attn.colwise == tuple(f"layers.0.attention.{p}_proj" for p in "qkv")
    assert attn.rowwise == ("layers.0.attention.o_proj",)
    assert ("layers.0.attention", "num_heads", 4) in attn.head_attrs
    assert (mlp.kind, mlp.colwise, mlp.rowwise, mlp.intermediate) == ("mlp", ("layers.0.mlp.0",), ("layers.0.mlp.2",), 128)
    text = str(plan)
    assert "2 heads, 1 kv heads per rank" in text and "per rank" in text and "column-parallel" in text
    # the estimate: split weights count 1/2, replicated parameters and row-parallel biases in full
    assert plan.total_bytes == local_parameter_bytes(_tiny())
    assert plan.total_bytes / 2 < plan.per_rank_bytes < plan.total_bytes


def test_shard_plan_leaves_no_dynamic_sizes_behind():
    """The plan's capture at one length must not make the user's first compile at another length dynamic
    (a dynamic DTensor training graph recurses without end in AOTAutograd: pytorch#152954)."""
    model = _tiny()
    shard_plan(model, IDS, world_size=2)
    seen = []

    def record(gm, inputs):     # the traced (fake) values of the graph's inputs: symbolic where dynamic
        seen.extend(n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder")
        return gm.forward
    with torch.no_grad():
        torch.compile(model, backend=record)(torch.randint(0, 20, (1, 24)))
    assert seen, "the backend saw no graph"
    sizes = [tuple(x.shape) if isinstance(x, torch.Tensor) else x for x in seen]
    assert all(type(d) is int for s in sizes for d in (s if isinstance(s, tuple) else (s,))), sizes


def test_shard_plan_world_size_four_and_one():
    plan4 = shard_plan(_tiny(), IDS, world_size=4)          # 2 kv heads do not divide by 4
    assert [b.sharded for b in plan4.blocks] == [False, True]
    assert plan4.blocks[0].reason == "2 kv heads do not divide by world_size 4"
    assert "replicated: 2 kv heads do not divide by world_size 4" in str(plan4)
    plan1 = shard_plan(_tiny(), IDS, world_size=1)
    assert plan1.per_rank_bytes == plan1.total_bytes


def test_blocks_with_per_head_parameters_stay_replicated():
    model = create_dala_model(hidden_size=32, num_heads=4, num_layers=1, vocab_size=20, block_size=16, window=16,
                              memory_size=16)
    plan = shard_plan(model, torch.randint(0, 20, (1, 64)), world_size=2)
    attn = [b for b in plan.blocks if b.kind == "attention"]
    assert len(attn) == 1 and not attn[0].sharded and "slopes" in attn[0].reason
    # the router inside the replicated block is not taken for an MLP
    assert [b.module for b in plan.sharded] == ["layers.0.mlp"]


@pytest.mark.parametrize("bad", [0, -2, 1.5, "2", True, None])
def test_shard_plan_rejects_bad_world_size(bad):
    with pytest.raises(ValueError, match="world_size must be an integer >= 1"):
        shard_plan(_tiny(), IDS, world_size=bad)


def test_shard_plan_rejects_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        shard_plan(lambda x: x, IDS, world_size=2)
    with pytest.raises(TypeError, match="example_inputs must be"):
        shard_plan(_tiny(), 3, world_size=2)


def test_shard_rejects_a_mesh_that_is_not_a_device_mesh():
    with pytest.raises(TypeError, match="mesh must be a torch.distributed.device_mesh.DeviceMesh"):
        shard(_tiny(), 2, IDS)


@pytest.fixture
def one_rank_group(tmp_path):
    """A 1-rank gloo group in this process (file rendezvous: no port to collide on)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_shard_rejects_mesh_mismatches(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (1,))
    plan2 = shard_plan(_tiny(), IDS, world_size=2)
    with pytest.raises(ValueError, match="plan was made for world_size=2 but the mesh has 1 ranks"):
        shard(_tiny(), mesh, IDS, plan=plan2)
    with pytest.raises(ValueError, match="mesh must be 1-D"):
        shard(_tiny(), init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp")), IDS)
    with pytest.raises(ValueError, match="does not match the model's parameters on meta"):
        shard(_tiny().to("meta"), mesh, IDS)
    model, plan = shard(_tiny(), mesh, IDS)
    with pytest.raises(ValueError, match="already holds DTensor parameters"):
        shard(model, mesh, IDS)


def test_shard_catches_a_wrong_local_head_count(one_rank_group):
    """A module left reshaping with a wrong head count fails shard()'s check on example_inputs, loudly."""
    from torch.distributed.device_mesh import init_device_mesh
    model = _tiny()
    plan = shard_plan(model, IDS, world_size=1)
    plan.blocks[0].head_attrs = (("layers.0.attention", "num_heads", 8),)   # sets num_heads = 8 // 1: wrong
    with pytest.raises(RuntimeError, match="danon.shard: the sharded model fails on example_inputs"):
        shard(model, init_device_mesh("cpu", (1,)), IDS, plan=plan)
