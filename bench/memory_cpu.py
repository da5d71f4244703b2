"""Memory decisions on CPU: activation checkpointing in training, int8 weight quantization in inference.

The model is danon.create_dense_model (pre-norm causal LM, exact attention through the danon backend),
hidden 256, 8 heads, 4 layers, vocabulary 1000, random weights, batch 1. Every cell runs in a fresh
subprocess and compiles with backend="danon" (target inductor).

Training (N = --train-n, default 4096): one step = forward, mean-square loss on the logits, backward
(no optimizer). Cells: checkpoint "none" (the anchor), "auto" with memory_budget 0.5, and the model's
own per-layer torch.utils.checkpoint (gradient_checkpointing=True) for comparison. After compiling and
one warm-up step: peak = the step's extra resident memory (VmHWM - VmRSS before it; the cells run with
MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave the resident set), time = median of --repeats steps;
saved = the compile report's activation bytes saved for backward.

Inference (N = --infer-n, default 1024, no_grad): quantize "none" (the anchor), "int8-weight" as a
backend option (the graph reads torchao int8 copies; the module keeps its fp32 weights), and
danon.quantize(model, "int8-weight") before compiling (the module's weights are replaced). Time =
median of --repeats forward calls; weights read = bytes of the parameters the compiled graph reads;
weights held = bytes of every weight kept alive (module + quantized copies); error = ||logits - fp32
eager|| / ||fp32 eager||.

    python bench/memory_cpu.py                         # -> bench/results/memory_cpu.md and .json
    python bench/memory_cpu.py --train-n 512 --infer-n 256 --repeats 2 --out /tmp/m.md     # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, reset_peak, run_cell, status_kib, write_results  # noqa: E402

MODEL = dict(hidden_size=256, num_heads=8, num_layers=4, vocab_size=1000)
TRAIN = ["train-none", "train-auto", "train-layer-checkpoint"]
INFER = ["infer-none", "infer-int8", "infer-int8-module"]


def _model(n: int, **extra):
    import torch

    import danon
    torch.manual_seed(0)
    return danon.create_dense_model(max_sequence_length=n, hidden_dropout=0.0, **MODEL, **extra)


def train_cell(name: str, n: int, repeats: int) -> dict:
    import torch

    import danon
    model = _model(n, gradient_checkpointing=(name == "train-layer-checkpoint")).train()
    ids = torch.randint(0, MODEL["vocab_size"], (1, n), generator=torch.Generator().manual_seed(1))
    options = {"checkpoint": "auto", "memory_budget": 0.5} if name == "train-auto" else {}
    fn = torch.compile(model, backend="danon", options=options)

    def step():
        model.zero_grad(set_to_none=True)
        fn(ids).float().pow(2).mean().backward()

    start = time.perf_counter()
    with danon.backend.collect_reports() as report:
        step()
    compile_s = time.perf_counter() - start
    step()
    model.zero_grad(set_to_none=True)
    reset_peak()
    base = status_kib("VmRSS")
    step()
    peak = (status_kib("VmHWM") - base) * 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    rows = report.checkpoint
    return {"cell": name, "n": n, "compile_s": compile_s, "median_s": statistics.median(times), "min_s": min(times),
            "max_s": max(times), "peak_bytes": peak,
            "saved_before": sum(r.saved_bytes_before or 0 for r in rows) if rows else None,
            "saved_after": sum(r.saved_bytes_after or 0 for r in rows) if rows else None,
            "recompute_flops": sum(r.recompute_flops_after or 0 for r in rows) if rows else None,
            "attention_recomputed": sum(r.recomputed_attention for r in rows) if rows else None}


def infer_cell(name: str, n: int, repeats: int) -> dict:
    import torch

    import danon
    from danon.passes.weight_quantization import tensor_bytes
    from danon.quantize import quantize
    model = _model(n).eval()
    ids = torch.randint(0, MODEL["vocab_size"], (1, n), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.double()(ids)
        model.float()
        options = {}
        if name == "infer-int8":
            options = {"quantize": "int8-weight"}
        elif name == "infer-int8-module":
            quantize(model, "int8-weight")
        fn = torch.compile(model, backend="danon", options=options)
        start = time.perf_counter()
        with danon.backend.collect_reports() as report:
            logits = fn(ids)
        compile_s = time.perf_counter() - start
        fn(ids)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(ids)
            times.append(time.perf_counter() - start)
    params = {id(p): p for p in model.parameters()}          # tied weights once
    held = sum(tensor_bytes(p) for p in params.values())
    read = held
    if report.linears:        # the graph reads the quantized copies instead of the linears' fp32 weights
        held += sum(r.bytes_after for r in report.linears if r.quantized)
        lm_tied = model.lm_head.weight is model.embed_tokens.weight
        read = held - sum(r.bytes_before for r in report.linears
                          if r.quantized and not (lm_tied and r.name == "lm_head"))
    error = float((logits.double() - ref).norm() / ref.norm())
    return {"cell": name, "n": n, "compile_s": compile_s, "median_s": statistics.median(times), "min_s": min(times),
            "max_s": max(times), "weights_read": read, "weights_held": held, "rel_error": error,
            "quantized_layers": sum(r.quantized for r in report.linears) or None}


def worker(name: str, n: int, repeats: int) -> dict:
    return (train_cell if name.startswith("train") else infer_cell)(name, n, repeats)


def _mib(x) -> str:
    return "-" if x is None else f"{x / 2 ** 20:.1f}"


def report(cells: list, command: str, smoke: bool = False) -> str:
    by = {c["cell"]: c for c in cells}
    lines = [
        "# Memory decisions on CPU: checkpointing (training) and int8 weights (inference)",
        "",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine()}",
        f"- command: `{command}`",
        f"- model: danon.create_dense_model({', '.join(f'{k}={v}' for k, v in MODEL.items())}), causal, batch 1, "
        "exact attention, backend danon (inductor)",
        "- ratios are to the first row of each table, measured in the same run (each cell in its own process)",
    ] + (["- SMOKE RUN: not the issue's settings (N = 4096 training, N = 1024 inference); these numbers only "
          "show that the benchmark runs"] if smoke else []) + [
        "",
        "## Training step (forward + backward)",
        "",
        "| N | checkpoint | compile s | median ms | min-max ms | time vs none | peak MiB | peak vs none "
        "| saved MiB before -> after (report) | recompute GFLOP | attention recomputed |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    anchor = by.get("train-none")
    for name in TRAIN:
        c = by.get(name)
        if c is None:
            continue
        saved = "-" if c["saved_before"] is None else f"{_mib(c['saved_before'])} -> {_mib(c['saved_after'])}"
        flops = "-" if c["recompute_flops"] is None else f"{c['recompute_flops'] / 1e9:.2f}"
        attention = "-" if c["attention_recomputed"] is None else c["attention_recomputed"]
        lines.append(
            f"| {c['n']} | {name[len('train-'):]} | {c['compile_s']:.1f} | {c['median_s'] * 1e3:.0f} | "
            f"{c['min_s'] * 1e3:.0f}-{c['max_s'] * 1e3:.0f} | {c['median_s'] / anchor['median_s']:.2f}x | "
            f"{_mib(c['peak_bytes'])} | {c['peak_bytes'] / max(anchor['peak_bytes'], 1):.2f}x | {saved} | "
            f"{flops} | {attention} |")
    lines += [
        "",
        "## Inference (no_grad)",
        "",
        "| N | quantize | compile s | median ms | min-max ms | time vs none | weights read MiB | weights held MiB "
        "| read vs none | rel. error vs fp64 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    anchor = by.get("infer-none")
    labels = {"infer-none": "none", "infer-int8": "int8-weight (backend option)",
              "infer-int8-module": "int8-weight (danon.quantize, then compile)"}
    for name in INFER:
        c = by.get(name)
        if c is None:
            continue
        lines.append(
            f"| {c['n']} | {labels[name]} | {c['compile_s']:.1f} | {c['median_s'] * 1e3:.1f} | "
            f"{c['min_s'] * 1e3:.1f}-{c['max_s'] * 1e3:.1f} | {c['median_s'] / anchor['median_s']:.2f}x | "
            f"{_mib(c['weights_read'])} | {_mib(c['weights_held'])} | "
            f"{c['weights_read'] / anchor['weights_read']:.2f}x | {c['rel_error']:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-n", type=int, default=4096)
    parser.add_argument("--infer-n", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "memory_cpu.md"))
    parser.add_argument("--worker", nargs=2, metavar=("CELL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.repeats)))
        return
    # glibc returns freed blocks above this size to the OS at once (its default threshold grows with use,
    # so a warm process would keep freed activations resident and hide the step's own peak)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    jobs = [(c, args.train_n) for c in TRAIN] + [(c, args.infer_n) for c in INFER]
    cells = []
    for cell, n in jobs:
        print(f"{cell} N={n} ...", file=sys.stderr, flush=True)
        cells.append(run_cell(__file__, [cell, n, "--repeats", args.repeats]))
    command = ("python bench/memory_cpu.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    write_results(args.out, report(cells, command, smoke=(args.train_n, args.infer_n) != (4096, 1024)),
                  {"command": command, "cells": cells})


if __name__ == "__main__":
    main()
