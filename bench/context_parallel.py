"""Context parallelism on CPU (gloo): bytes each rank sends and time per training step, against an all-gather of K, V.

Every family runs causal attention over a sequence split across R ranks (balanced order) with
`danon.context_parallel`: one training step (forward and backward of the op on a random output gradient).
Bytes are what each rank sends to the other ranks, counted by danon's exchange collective by collective
(the backward of a differentiable collective sends as much again). The dense baseline in the same run is an
all-gather of K and V with its backward (a reduce-scatter of their gradients): what ring attention moves in
total. B 1, H 8, Hkv 8, D 64, fp32, default family settings.

    python bench/context_parallel.py                                  # -> bench/results/context_parallel.md
    python bench/context_parallel.py --seq-lens 16384 --ranks 2 --out /tmp/cp.md
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, write_results  # noqa: E402

FAMILIES = ["msra", "dala", "ucsa"]
B, H, HKV, D = 1, 8, 8, 64
TARGET = 1 / 8     # each sparse family at most 1/8 of the dense bytes at 4 ranks


def _step(cp, kind, q, k, v, grad) -> tuple:
    """(seconds, bytes sent forward, bytes sent in all) of one forward + backward."""
    import torch.distributed as dist
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    forward0, total0 = cp.bytes_sent(backward=False), cp.bytes_sent()
    dist.barrier()
    start = time.perf_counter()
    if kind == "allgather":
        parts = cp.exchange.all_gather(torch_cat([leaves[1], leaves[2]]), "keys and values")
        out = sum((p * 0.5).sum() for p in parts)
        out.backward()
    else:
        out = cp.attention(*leaves, kind, causal=True)
        out.backward(grad)
    dist.barrier()
    return time.perf_counter() - start, cp.bytes_sent(backward=False) - forward0, cp.bytes_sent() - total0


def torch_cat(xs):
    import torch
    return torch.cat(xs, -1)


def _rank(rank: int, world: int, store: str, out_dir: str, n: int, repeats: int) -> None:
    import torch
    import torch.distributed as dist
    result = {}
    try:
        dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        import danon
        cp = danon.context_parallel(n, block_size=64, balanced=True)
        g = torch.Generator().manual_seed(0)
        full = [torch.randn(B, h, n, D, generator=g) for h in (H, HKV, HKV, H)]
        q, k, v, grad = (cp.shard(x, 2) for x in full)
        del full
        for kind in ["allgather"] + FAMILIES:
            times, sent = [], None
            for i in range(repeats + 1):                     # the first step warms up
                seconds, forward, total = _step(cp, kind, q, k, v, grad)
                if i:
                    times.append(seconds)
                sent = (forward, total)
            parts = {}
            for purpose, nbytes in cp.exchange.sent.items():   # last step's split is the same as every step's
                parts[purpose] = nbytes
            cp.exchange.sent.clear()
            cp.exchange.sent_backward.clear()
            result[kind] = {"times": times, "forward_bytes": sent[0], "step_bytes": sent[1],
                            "by_purpose": {p: b // (repeats + 1) for p, b in parts.items()}}
    except Exception:
        import traceback
        result["error"] = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        if dist.is_initialized():
            dist.destroy_process_group()


def run(n: int, world: int, repeats: int) -> dict:
    """One (N, ranks) cell: every rank's numbers."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank, args=(world, os.path.join(tmp, "store"), tmp, n, repeats), nprocs=world,
                           start_method="spawn")
        ranks = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(world)]
    for r, res in enumerate(ranks):
        if "error" in res:
            raise RuntimeError(f"rank {r} failed:\n{res['error']}")
    return {"n": n, "world": world, "ranks": ranks}


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def report(cells: list, command: str) -> str:
    lines = [
        "# Context parallelism on CPU: bytes per rank and time per step",
        "",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine()}",
        f"- command: `{command}`",
        f"- setting: causal, B {B}, H {H}, Hkv {HKV}, D {D}, fp32, default family settings, block 64, balanced "
        "order; a step is one forward and one backward of the op; dense = all-gather of K and V and its backward",
        "- bytes: sent by one rank to the other ranks in one step (forward + backward), the largest over ranks; "
        "the ratio is to the dense all-gather's bytes in the same run",
        "- time: median over the steps of the slowest rank; **all ranks share this machine's 2 cores over "
        "loopback gloo**, so the times say what one step costs here, not what R machines would take; the bytes "
        "are the portable figure",
        "",
        "| N | ranks | family | bytes per rank per step | of dense | forward bytes | time per step (s) | "
        "dense time (s) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    checks = []
    for cell in cells:
        ranks = cell["ranks"]
        dense = max(r["allgather"]["step_bytes"] for r in ranks)
        dense_t = _median([max(ts) for ts in zip(*(r["allgather"]["times"] for r in ranks))])
        for kind in FAMILIES + ["allgather"]:
            step = max(r[kind]["step_bytes"] for r in ranks)
            fwd = max(r[kind]["forward_bytes"] for r in ranks)
            t = _median([max(ts) for ts in zip(*(r[kind]["times"] for r in ranks))])
            name = "dense (all-gather K, V)" if kind == "allgather" else kind
            lines.append(f"| {cell['n']} | {cell['world']} | {name} | {step / 2**20:.2f} MiB | {step / dense:.4f} | "
                         f"{fwd / 2**20:.2f} MiB | {t:.2f} | {dense_t:.2f} |")
            if kind != "allgather" and cell["world"] == 4:
                checks.append((cell["n"], kind, step / dense))
    lines += ["", "## Where the bytes go (one step, the rank that sends most)", "",
              "| N | ranks | family | collective | MiB |", "|---:|---:|---|---|---:|"]
    for cell in cells:
        for kind in FAMILIES:
            worst = max(cell["ranks"], key=lambda r: r[kind]["step_bytes"])
            for purpose, nbytes in sorted(worst[kind]["by_purpose"].items()):
                lines.append(f"| {cell['n']} | {cell['world']} | {kind} | {purpose} (forward) | {nbytes / 2**20:.3f} |")
    lines += ["", "## How the bytes scale", "",
              "Per rank and step: the block sums are (R - 1) N / (R b) rows per kv head (all-gather), the halo W b "
              "rows per piece edge whatever N and R, DALA's routing scores N (R - 1) / R scalars per kv head, the "
              "routed tokens the union of a rank's query blocks' tokens; UCSA's selected blocks the union of its "
              "query blocks' top-k (on random inputs most earlier blocks); dense (R - 1) N / R rows of K and V.",
              ""]
    step = {(c["n"], c["world"], kind): max(r[kind]["step_bytes"] for r in c["ranks"])
            for c in cells for kind in FAMILIES + ["allgather"]}
    ns = sorted({c["n"] for c in cells})
    worlds = sorted({c["world"] for c in cells})
    for kind in FAMILIES + ["allgather"]:
        name = "dense" if kind == "allgather" else kind
        parts = []
        for w in worlds:
            if len(ns) > 1:
                parts.append(f"N x{ns[-1] // ns[0]} at {w} ranks: bytes x{step[(ns[-1], w, kind)] / step[(ns[0], w, kind)]:.2f}")
        for n in ns:
            if len(worlds) > 1:
                parts.append(f"{worlds[0]} -> {worlds[-1]} ranks at N = {n}: bytes "
                             f"x{step[(n, worlds[-1], kind)] / step[(n, worlds[0], kind)]:.2f}")
        if parts:
            lines.append(f"- {name}: " + "; ".join(parts))
    lines += ["", "## Target: at most 1/8 of the dense bytes at 4 ranks", ""]
    for n, kind, ratio in checks:
        lines.append(f"- N = {n}, {kind}: {ratio:.4f} of dense: {'met' if ratio <= TARGET else '**not met**'}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "context_parallel.md"))
    args = parser.parse_args(argv)
    try:
        from tqdm import tqdm
    except ImportError:   # progress bar only with the bench extra
        def tqdm(x, **_):
            return x
    jobs = [(n, w) for n in args.seq_lens for w in args.ranks]
    cells = [run(n, w, args.repeats) for n, w in tqdm(jobs, desc="context_parallel")]
    command = ("python bench/context_parallel.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    write_results(args.out, report(cells, command), {"command": command, "cells": cells})


if __name__ == "__main__":
    main()
