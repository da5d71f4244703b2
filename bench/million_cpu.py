"""A million tokens on CPU: MSRA and DALA forward and backward at N = 1,048,576 within 16 GiB.

B = 1, H = 4, Hkv = 2 (GQA), D = 64, fp32, causal, default family settings. Each family runs in a
fresh subprocess: one forward with autograd, then one backward (a random output gradient), timed
separately; peak memory is the process's VmHWM (everything: inputs, outputs, gradients, the plan,
the executor's buffers) and its growth over the resident size once the inputs exist. The outputs and
the input gradients are checked to be finite.

    python bench/million_cpu.py                       # -> bench/results/million_cpu.md
    python bench/million_cpu.py --seq-len 262144 --out /tmp/m.md
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import results_header, run_cell, status_kib, write_results  # noqa: E402

FAMILIES = ["msra", "dala"]
LIMIT_GIB = 16


def worker(family: str, n: int) -> dict:
    import torch

    import danon

    torch.manual_seed(0)
    danon.attention(*(torch.randn(1, h, 512, 64) for h in (4, 2, 2)), kind=family, causal=True)   # warm-up
    q = torch.randn(1, 4, n, 64, requires_grad=True)
    k, v = (torch.randn(1, 2, n, 64, requires_grad=True) for _ in range(2))
    base = status_kib("VmRSS")
    start = time.perf_counter()
    out = danon.attention(q, k, v, kind=family, causal=True)
    fwd = time.perf_counter() - start
    after_fwd = status_kib("VmHWM")
    grad = torch.randn_like(out)
    start = time.perf_counter()
    out.backward(grad)
    bwd = time.perf_counter() - start
    finite = bool(out.isfinite().all()) and all(bool(x.grad.isfinite().all()) for x in (q, k, v))
    return {"family": family, "n": n, "fwd_s": fwd, "bwd_s": bwd, "inputs_kib": base,
            "peak_fwd_kib": after_fwd, "peak_kib": status_kib("VmHWM"), "finite": finite}


def report(cells: list, n: int, command: str) -> str:
    lines = results_header("A million tokens on CPU", command) + [
        f"- setting: N = {n}, causal, B = 1, H = 4, Hkv = 2, D = 64, fp32, default family settings; one forward "
        "(with autograd) and one backward, each family in a fresh process",
        "- peak = the process's VmHWM (inputs, outputs, gradients, plan and buffers included); growth = peak minus "
        "the resident size once the inputs existed",
        "",
        "| family | forward s | backward s | train step s | peak GiB (after fwd) | peak GiB | growth KiB/token "
        "| finite | within 16 GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for c in cells:
        peak = c["peak_kib"] / 2 ** 20
        lines.append(f"| {c['family']} | {c['fwd_s']:.1f} | {c['bwd_s']:.1f} | {c['fwd_s'] + c['bwd_s']:.1f} "
                     f"| {c['peak_fwd_kib'] / 2 ** 20:.2f} | {peak:.2f} "
                     f"| {(c['peak_kib'] - c['inputs_kib']) / n:.1f} | {'yes' if c['finite'] else 'NO'} "
                     f"| {'yes' if peak <= LIMIT_GIB else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=1 << 20)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "million_cpu.md"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.seq_len)))
        return
    cells = []
    for fam in FAMILIES:
        print(f"{fam}: N = {args.seq_len} ...", flush=True)
        cells.append(run_cell(__file__, [fam, "--seq-len", args.seq_len]))
    command = ("python bench/million_cpu.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    write_results(args.out, report(cells, args.seq_len, command), {"command": command, "cells": cells})


if __name__ == "__main__":
    main()
