"""Worker functions for tests/parallel/test_context_parallel.py: each rank of a gloo CPU group runs the checks.

Picklable top-level functions (torch.multiprocessing spawns fresh interpreters). Every rank draws the same
full-sequence inputs from the same seed, runs the single-process op on them as the reference, runs
`danon.context_parallel` on its own tokens, gathers outputs and gradients back into sequence order, and
writes the relative errors to a JSON file per rank; the test process asserts on them.
"""
from __future__ import annotations

import traceback

import torch
import torch.distributed as dist
from _spawn import write_rank_results

N = 200            # 13 blocks of 16, the last one 8 tokens: not a multiple of ranks x block
B, H, HKV, D = 2, 4, 2, 8
FAMILIES = {
    "exact": dict(block_size=16),
    "msra": dict(block_size=16, window=16, num_levels=2, compression_factor=2),
    "msra_auto": dict(block_size=16, window=16, num_levels="auto", compression_factor=2),
    "ucsa": dict(block_size=16, local_window_size=16, global_tokens=16, top_k_blocks=2),
    "ucsa_gamma": dict(block_size=16, local_window_size=16, global_tokens=16, top_k_blocks=3, gamma=0.6),
    "ucsa_sparsity": dict(block_size=16, local_window_size=32, global_tokens=0, sparsity_factor=0.3),
    "dala": dict(block_size=16, window=16, memory_size=8),
    "dala_no_rest": dict(block_size=16, window=16, memory_size=8, decay="none", compress_rest=False),
    "exact_band": dict(block_size=16, sliding_window=24),
    "msra_wide": dict(block_size=16, window=48, num_levels=1, compression_factor=2),   # 3 blocks > a piece
}


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    n = b.norm().item()
    return (a - b).norm().item() / n if n > 0 else (a - b).norm().item()


def _inputs(dtype, padded: bool, seed: int, dv: int = D):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, HKV, N, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, HKV, N, dv, generator=g, dtype=torch.float64)
    w = torch.randn(B, H, N, dv, generator=g, dtype=torch.float64)      # the loss's weights: sum(out * w)
    kpm = None
    if padded:   # random holes, a padded start in batch 0 and a padded end in batch 1
        kpm = torch.rand(B, N, generator=g) > 0.2
        kpm[0, :21] = False
        kpm[1, -30:] = False
    return [x.to(dtype) for x in (q, k, v, w)], kpm


def _check_op(cp, kind, options, causal, padded, dtype, seed, dv=D, tail_padding=False):
    """Relative errors of the gathered output and q, k, v gradients against the single-process op. tail_padding:
    only the sequence's last 30 tokens are padding, and a rank whose tokens hold none passes no mask at all."""
    from danon.functional import attention
    (q, k, v, w), kpm = _inputs(dtype, padded, seed, dv)
    if tail_padding:
        kpm = torch.ones(B, N, dtype=torch.bool)
        kpm[:, -30:] = False
    keywords = dict(options, causal=causal, key_padding_mask=kpm)
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = attention(*full, kind=kind, **keywords)
    (ref * w).sum().backward()
    local = [cp.shard(x.detach(), 2).requires_grad_() for x in (q, k, v)]
    local_kpm = None if kpm is None else cp.shard(kpm, 1)
    if tail_padding and bool(local_kpm.all()):
        local_kpm = None
    out = cp.attention(*local, kind, **dict(keywords, key_padding_mask=local_kpm))
    (out * cp.shard(w, 2)).sum().backward()
    got = [cp.unshard(out, 2)] + [cp.unshard(x.grad, 2) for x in local]
    want = [ref] + [x.grad for x in full]
    return {name: rel(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), got, want)} | {
        "finite": all(bool(torch.isfinite(x).all()) for x in got)}


def _bytes(world: int) -> dict:
    """What one MSRA call sends, by collective, against the count from the layout (causal, contiguous, fp64)."""
    import danon
    cp = danon.context_parallel(N, block_size=16)
    (q, k, v, _), _ = _inputs(torch.float64, False, seed=3)
    local = [cp.shard(x, 2).requires_grad_() for x in (q, k, v)]
    cp.attention(*local, "msra", causal=True, **FAMILIES["msra"]).sum().backward()
    longest = max(-(-cp.layout.local_len(r) // 16) for r in range(world))
    row = B * HKV * 2 * D * 8                                  # one row of k and v for every (batch, kv head)
    last = cp.rank == world - 1
    return {"sent": dict(cp.exchange.sent), "backward": dict(cp.exchange.sent_backward),
            "expected_block_sums": (world - 1) * longest * row,
            # window 16: one block of 16 rows to the next rank; its gradient comes back in the backward
            "expected_halo": 0 if last else 16 * row, "expected_halo_backward": 0 if cp.rank == 0 else 16 * row}


def _training(cp, kind: str, steps: int = 3):
    """Parameters after `steps` SGD steps of a factory model with the sequence split, and in one process."""
    import copy
    from danon.models import create_dala_model, create_msra_model, create_ucsa_model
    from danon.models import create_dense_model
    make = {"msra": create_msra_model, "dala": create_dala_model, "ucsa": create_ucsa_model,
            "dense": create_dense_model, "msra_checkpointed": create_msra_model}[kind]
    extra = {"msra": dict(window=16, num_levels=2), "dala": dict(window=16, memory_size=8),
             "ucsa": dict(local_window_size=16, global_tokens=16, top_k_blocks=2), "dense": {},
             "msra_checkpointed": dict(window=16, num_levels=2, gradient_checkpointing=True)}[kind]
    torch.manual_seed(0)
    if kind != "dense":
        extra["block_size"] = 16
    model = make(hidden_size=32, num_heads=4, num_kv_heads=2, num_layers=2, vocab_size=50, **extra).double()
    split = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (2, N), generator=g)
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[1, -13:] = False                                  # batch 1 is padded at its end
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1).masked_fill(~mask, -100)
    count = int((labels != -100).sum())

    def loss_of(m, ids_, mask_, labels_, **kw):
        logits = m(ids_, attention_mask=mask_, **kw)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels_.flatten(), ignore_index=-100,
                                                 reduction="sum") / count
    one, many = torch.optim.SGD(model.parameters(), lr=0.5), torch.optim.SGD(split.parameters(), lr=0.5)
    losses = []
    for _ in range(steps):
        one.zero_grad()
        full_loss = loss_of(model, ids, mask, labels)
        full_loss.backward()
        one.step()
        many.zero_grad()
        with cp:
            part = loss_of(split, cp.shard(ids), cp.shard(mask), cp.shard(labels), position_ids=cp.positions())
        part.backward()
        cp.reduce_gradients(split)
        many.step()
        total = part.detach().clone()
        dist.all_reduce(total)
        losses.append((full_loss.item(), total.item()))
    err = max(rel(a, b) for a, b in zip(split.parameters(), model.parameters()))
    return {"param_rel": err, "losses": losses}


def _llama_training(cp, steps: int = 3):
    """A transformers Llama with attn_implementation="danon" (MSRA) trained with its sequence split: position_ids
    and the local attention mask go in, the loss is taken on the globally shifted labels."""
    import copy
    import transformers
    import danon.hf  # noqa: F401  (registers attn_implementation="danon")
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg.danon_attention = {"attention": "msra", "block_size": 16, "window": 16, "num_levels": 2}
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="danon").double()
    split = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 50, (2, N), generator=g)
    mask = torch.ones(2, N, dtype=torch.long)
    mask[0, -17:] = 0
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1).masked_fill(mask == 0, -100)
    count = int((labels != -100).sum())

    def loss_of(m, ids_, mask_, labels_, positions):
        logits = m(input_ids=ids_, attention_mask=mask_, position_ids=positions[None].expand(2, -1),
                   use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels_.flatten(), ignore_index=-100,
                                                 reduction="sum") / count
    one, many = torch.optim.SGD(model.parameters(), lr=0.5), torch.optim.SGD(split.parameters(), lr=0.5)
    for _ in range(steps):
        one.zero_grad()
        loss_of(model, ids, mask, labels, torch.arange(N)).backward()
        one.step()
        many.zero_grad()
        with cp:
            part = loss_of(split, cp.shard(ids), cp.shard(mask), cp.shard(labels), cp.positions())
        part.backward()
        cp.reduce_gradients(split)
        many.step()
    return {"param_rel": max(rel(a.detach(), b) for a, b in zip(split.parameters(), model.parameters()))}


def _mesh_2d(steps: int = 3):
    """A 2 x 2 mesh: the sequence split over "cp", the model's heads and MLP over "tp" (danon.shard); parameters
    after `steps` SGD steps against one process."""
    import copy
    import danon
    from danon.models import create_msra_model
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("cp", "tp"))
    torch.manual_seed(0)
    model = create_msra_model(hidden_size=32, num_heads=4, num_kv_heads=2, num_layers=2, vocab_size=50,
                              block_size=16, window=16, num_levels=2).double()
    split = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (2, N), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
    count = int((labels != -100).sum())
    split, plan = danon.shard(split, mesh["tp"], ids[:, :32])
    cp = danon.context_parallel(N, group=mesh.get_group("cp"), block_size=16, balanced=True)

    def loss_of(m, ids_, labels_, **kw):
        logits = m(ids_, **kw)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels_.flatten(), ignore_index=-100,
                                                 reduction="sum") / count
    one, many = torch.optim.SGD(model.parameters(), lr=0.5), torch.optim.SGD(split.parameters(), lr=0.5)
    for _ in range(steps):
        one.zero_grad()
        loss_of(model, ids, labels).backward()
        one.step()
        many.zero_grad()
        with cp:
            part = loss_of(split, cp.shard(ids), cp.shard(labels), position_ids=cp.positions())
        part.backward()
        cp.reduce_gradients(split)
        many.step()
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in split.parameters()]
    err = max(rel(a.detach(), b) for a, b in zip(full, model.parameters()))
    heads = split.layers[0].attention.num_heads
    return {"param_rel": err, "sharded": len(plan.sharded), "local_heads": heads}


def run_checks(rank: int, world: int, store_path: str, out_dir: str, which: str) -> None:
    results = {}
    try:
        store = dist.FileStore(store_path, world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
        torch.set_num_threads(1)
        import danon
        for balanced in (False, True):
            cp = danon.context_parallel(N, block_size=16, balanced=balanced)
            layout = "balanced" if balanced else "contiguous"
            for name, options in FAMILIES.items():
                kind = name.split("_")[0]
                for causal in (True, False):
                    for padded in (False, True):
                        key = f"{name}|{layout}|{'causal' if causal else 'full'}|{'padded' if padded else 'dense'}"
                        results[key] = _check_op(cp, kind, options, causal, padded, torch.float64, seed=len(results))
                    results[f"{name}|{layout}|{'causal' if causal else 'full'}|fp32"] = _check_op(
                        cp, kind, options, causal, causal, torch.float32, seed=len(results))
                results[f"{name}|{layout}|causal|tail padding"] = _check_op(
                    cp, kind, options, True, False, torch.float64, seed=len(results), tail_padding=True)
            results[f"msra|{layout}|causal|dv 12"] = _check_op(cp, "msra", FAMILIES["msra"], True, True,
                                                                torch.float64, seed=len(results), dv=12)
            results[f"dala|{layout}|full|dv 12"] = _check_op(cp, "dala", FAMILIES["dala"], False, True,
                                                              torch.float64, seed=len(results), dv=12)
        results["bytes"] = _bytes(world)
        cp = danon.context_parallel(N, block_size=16, balanced=True)
        before = cp.bytes_sent()
        results["training|msra"] = _training(cp, "msra")
        results["bytes_training"] = cp.bytes_sent() - before
        results["training|dense"] = _training(cp, "dense")
        results["training|llama"] = _llama_training(cp)
        results["training|msra_checkpointed"] = _training(cp, "msra_checkpointed")
        if which == "full":
            for kind in ("dala", "ucsa"):
                results[f"training|{kind}"] = _training(cp, kind)
            if world == 4:
                results["mesh_2d"] = _mesh_2d()
    except Exception:
        results["error"] = traceback.format_exc()
    finally:
        write_rank_results(out_dir, rank, results)
