"""The backward with fewer (batch, kv head) pairs than threads (MQA, small GQA) on CPU: danon's kernel, which splits
each pair's query blocks across the threads, against the gathered aten path such calls used to take, and SDPA.

Causal self-attention, B = 1, H = 8, D = 64, fp32, default family settings, Hkv = 1 and 2, every thread torch
has. Per (family, Hkv) one process (a cell "msra:1" of bench_main's grid) times the columns round-robin
(`--repeats` rounds after a warm-up), the backward alone (after a forward with autograd), median and spread:

- sdpa: F.scaled_dot_product_attention(is_causal=True, enable_gqa=True), the anchor;
- kernel: danon.attention(kind=...), its backward on danon's C++ kernel (split when pairs < threads);
- gathered: the same call with the kernel's backward declined (`danon.kernels.cpu.fused_backward` returning
  None), so that it runs the gathered aten path, as every call with fewer pairs than threads did before.

    python bench/few_heads_backward_cpu.py                 # N = 16384, 5 rounds
    python bench/few_heads_backward_cpu.py --seq-lens 4096 --repeats 3
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import bench_main, results_header  # noqa: E402

COLUMNS = ("sdpa", "kernel", "gathered")
CELLS = tuple(f"{kind}:{kv_heads}" for kind in ("msra", "dala", "ucsa") for kv_heads in (1, 2))


def _backward_seconds(column: str, kind: str, q, k, v) -> float:
    import torch
    import torch.nn.functional as F
    import danon
    from danon.kernels import cpu

    declined = cpu.fused_backward
    if column == "gathered":
        cpu.fused_backward = lambda *args, **kwargs: None   # the path taken before the split
    try:
        if column == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            out = danon.attention(q, k, v, kind=kind, causal=True)
        grad = torch.ones_like(out)
        start = time.perf_counter()
        out.backward(grad)
        return time.perf_counter() - start
    finally:
        cpu.fused_backward = declined
        for x in (q, k, v):
            x.grad = None


def worker(cell: str, n: int, repeats: int) -> dict:
    """One (family, Hkv) cell, "msra:1": every column's backward seconds per round."""
    import torch
    kind, kv_heads = cell.split(":")[0], int(cell.split(":")[1])
    torch.manual_seed(0)
    q = torch.randn(1, 8, n, 64, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, n, 64, requires_grad=True) for _ in range(2))
    times = {c: [] for c in COLUMNS}
    for c in COLUMNS:                      # warm-up: the kernel's build, brgemm's JIT, the plan
        _backward_seconds(c, kind, q, k, v)
    for _ in range(repeats):
        for c in COLUMNS:
            times[c].append(_backward_seconds(c, kind, q, k, v))
    threads = torch.get_num_threads()
    return {"kind": kind, "kv_heads": kv_heads, "n": n, "threads": threads, "parts": -(-threads // kv_heads),
            "repeats": repeats, "times": times}


def report(cells: list, seq_lens: list, command: str) -> str:
    lines = results_header("The backward with fewer (batch, kv head) pairs than threads, on CPU", command) + [
        f"- setting: causal self-attention, B = 1, H = 8, D = 64, fp32, default family settings; "
        f"{cells[0]['repeats']} rounds, columns round-robin in one process per row, median (spread = min-max) of "
        "the backward alone",
        "- kernel: danon's C++ kernel, each (batch, kv head) pair's query blocks split into "
        "ceil(threads / pairs) runs with their own copies of the key gradients; gathered: the aten path such calls "
        "took before (the kernel's backward declined); parts = 1: no split, and such calls took the kernel before "
        "too",
        "",
        "| family | N | Hkv | threads | parts | SDPA ms | kernel ms | gathered ms | kernel vs SDPA | kernel vs gathered |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        med = {col: statistics.median(ts) for col, ts in c["times"].items()}
        spread = {col: f"{min(ts) * 1e3:.0f}-{max(ts) * 1e3:.0f}" for col, ts in c["times"].items()}
        lines.append(f"| {c['kind']} | {c['n']} | {c['kv_heads']} | {c['threads']} | {c['parts']} "
                     f"| {med['sdpa'] * 1e3:.0f} ({spread['sdpa']}) "
                     f"| {med['kernel'] * 1e3:.0f} ({spread['kernel']}) | {med['gathered'] * 1e3:.0f} "
                     f"({spread['gathered']}) | {med['sdpa'] / med['kernel']:.1f}x "
                     f"| {med['gathered'] / med['kernel']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    bench_main(__file__, __doc__, CELLS, [16384], worker, report, argv)


if __name__ == "__main__":
    main()
