"""Run a worker function on the ranks of a gloo CPU group in spawned processes; each rank writes its results.

Shared by the distributed tests (tests/passes/test_shard.py, tests/parallel/test_context_parallel.py). A worker
is a picklable top-level function `worker(rank, world, store_path, out_dir, *args)` that ends with
`write_rank_results(out_dir, rank, results)`; `spawn_ranks` waits for every rank (bounded in time) and returns
their results, failing the test with a rank's traceback when one recorded an error.
"""
from __future__ import annotations

import json
import os
import time

import pytest


def spawn_ranks(worker, world: int, args: tuple, out_dir, timeout: float) -> list:
    import torch.multiprocessing as mp
    ctx = mp.start_processes(worker, args=(world, os.path.join(str(out_dir), "store"), str(out_dir), *args),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world} ranks did not finish within {timeout:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = [json.load(open(os.path.join(str(out_dir), f"rank{r}.json"))) for r in range(world)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} failed:\n{res['error']}"
    return results


def write_rank_results(out_dir: str, rank: int, results: dict) -> None:
    """Write one rank's results and leave its process group (in a worker's `finally`)."""
    import torch.distributed as dist
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    if dist.is_initialized():
        dist.destroy_process_group()
