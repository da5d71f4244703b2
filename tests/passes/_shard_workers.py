"""Worker functions for tests/passes/test_shard.py: each rank of a gloo CPU group runs the checks and writes numbers.

Picklable top-level functions (torch.multiprocessing spawns fresh interpreters). Every rank builds
the same models from the same seed, keeps an unsharded float64 copy as the reference, shards with
`danon.shard` on a 1-D mesh, compiles with backend="danon" and records errors, shapes and bytes in
a JSON file per rank; the test process asserts on them.
"""
from __future__ import annotations

import copy
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _spawn import write_rank_results

N = 128                      # sequence length: 8 blocks of 16, so MSRA with window 16 is really sparse
MSRA = {"attention": "msra", "min_seq_len": 0, "window": 16, "block_size": 16, "num_levels": 2}


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _dense_model(**overrides):
    from danon.models import create_dense_model
    kw = dict(hidden_size=64, num_heads=4, num_kv_heads=2, num_layers=2, vocab_size=64, initializer_range=0.2)
    kw.update(overrides)
    return create_dense_model(**kw)


def _llama(kv_heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      initializer_range=0.2, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _spy_backend(options, seen):
    """backend="danon"'s own function, then a look at what the rewritten graph hands the danon op."""
    from danon.backend import danon_backend
    from danon.sites import attention_site

    def backend(gm, example_inputs):
        compiled = danon_backend(gm, example_inputs, options)
        for node in gm.graph.nodes:
            if node.target is attention_site:
                q = node.args[0].meta.get("example_value")
                seen.append({"type": type(q).__name__, "heads": int(q.shape[1])})
        return compiled
    return backend


def _check_model(name, make, ids, mesh, ws, target, results, sparse=True, spy=False):
    """Shard one model; exact (and MSRA) outputs against the unsharded model in float64."""
    from danon.backend import collect_reports
    from danon.shard import local_parameter_bytes, shard

    torch.manual_seed(0)
    model = make()
    ref64 = copy.deepcopy(model).double()
    model, plan = shard(model, mesh, ids[:, :32])
    r = results[name] = {"plan": str(plan), "sharded": [b.module for b in plan.sharded],
                         "replicated": {b.module: b.reason for b in plan.replicated},
                         "local_bytes": local_parameter_bytes(model), "plan_bytes": plan.per_rank_bytes,
                         "total_bytes": plan.total_bytes}
    exact = {"attention": "exact", "target": target}
    seen = []
    with torch.no_grad(), collect_reports() as report:
        compiled = torch.compile(model, backend=_spy_backend(exact, seen) if spy else "danon", options=None if spy
                                 else exact)
        out = _logits(compiled(ids))
        ref = _logits(ref64(ids))
    r["exact_err"] = rel(out, ref)
    r["exact_sites"] = [{"q": list(s.q_shape), "k": list(s.k_shape), "replaced": s.replaced} for s in report.sites]
    r["op_inputs"] = seen
    if sparse:
        opts = dict(MSRA, target=target)
        with torch.no_grad():
            with collect_reports() as report:
                out = _logits(torch.compile(model, backend="danon", options=opts)(ids))
            ref_sparse = _logits(torch.compile(ref64, backend="danon", options=dict(MSRA, target="eager"))(ids))
        r["msra_err"] = rel(out, ref_sparse)
        r["msra_vs_exact"] = rel(ref_sparse, ref)
        r["msra_keys_per_query"] = [s.keys_per_query for s in report.sites if s.family == "msra"]
        r["msra_families"] = [s.family for s in report.sites]
    return model


def _check_training(ids, mesh, target, results):
    """One SGD step of a sharded, compiled model: gradients and updated weights equal the unsharded model's."""
    from danon.shard import shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = _dense_model()
    ref = copy.deepcopy(model).double()
    model, plan = shard(model, mesh, ids[:, :32])
    model.train()
    ref.train()
    labels = torch.randint(0, 64, ids.shape)
    compiled = torch.compile(model, backend="danon", options={"attention": "exact", "target": target})
    loss = F.cross_entropy(compiled(ids).flatten(0, 1), labels.flatten())
    loss.backward()
    ref_loss = F.cross_entropy(ref(ids).flatten(0, 1), labels.flatten())
    ref_loss.backward()
    full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t  # noqa: E731
    ref_params = dict(ref.named_parameters())
    errs, kinds = {}, {}
    for name, p in model.named_parameters():
        errs[name] = rel(full(p.grad), ref_params[name].grad)
        kinds[name] = type(p).__name__
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    step = max(rel(full(p), ref_params[n]) for n, p in model.named_parameters())
    results["training"] = {"loss_err": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()),
                           "grad_errs": errs, "param_types": kinds, "step_err": step,
                           "sharded": len(plan.sharded)}


def run_checks(rank: int, world_size: int, store: str, out_dir: str, target: str, full: bool) -> None:
    """Entry point of each spawned rank."""
    results = {"timings": {}}
    start = time.monotonic()

    def lap(name):
        results["timings"][name] = round(time.monotonic() - start, 1)
    try:
        torch.set_num_threads(1)             # two ranks on a 2-core machine
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (world_size,))
        lap("init")
        torch.manual_seed(1)
        ids = torch.randint(0, 64, (2, N))
        _check_model("dense", _dense_model, ids, mesh, world_size, target, results, spy=True)
        lap("dense")
        _check_model("dense_3_heads", lambda: _dense_model(hidden_size=48, num_heads=3, num_kv_heads=None),
                     ids, mesh, world_size, target, results, sparse=False)
        lap("dense_3_heads")
        _check_training(ids, mesh, target, results)
        lap("training")
        try:
            import transformers  # noqa: F401
        except ImportError:
            results["llama_skipped"] = "transformers is not installed"
        else:
            _check_model("llama_gqa", lambda: _llama(2), ids, mesh, world_size, target, results, sparse=full)
            lap("llama_gqa")
            _check_model("llama_kv1", lambda: _llama(1), ids, mesh, world_size, target, results, sparse=False)
            lap("llama_kv1")
    except BaseException:
        results["error"] = traceback.format_exc()
    finally:
        write_rank_results(out_dir, rank, results)
