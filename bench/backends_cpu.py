"""A GPT-style model under eager, backend="inductor" and backend="danon" (exact and each sparse family), on CPU.

The model is danon.create_dense_model (pre-norm causal LM whose attention is F.scaled_dot_product_attention),
hidden 256, 8 heads, 4 layers, random weights, batch 1, inference (no_grad). Each (backend, N) cell runs
in a fresh subprocess: compile + one warm-up, then the median of --repeats forward calls (onnxrt-*: the
danon backend with target="onnxrt", i.e. the rewritten graph exported to ONNX and run by ONNX Runtime's CPU
provider; its first call includes the export); peak is the
extra resident memory of one forward after compiling; error is ||logits - eager|| / ||eager|| (eager in
float64 on the same weights).

    python bench/backends_cpu.py                                 # N = 1k, 4k, 16k -> bench/results/backends_cpu.md
    python bench/backends_cpu.py --seq-lens 1024 --repeats 2 --out /tmp/b.md
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import bench_main, machine, reset_peak, status_kib  # noqa: E402

BACKENDS = ["eager", "inductor", "danon-exact", "danon-msra", "danon-dala", "danon-ucsa",
            "onnxrt-exact", "onnxrt-msra", "onnxrt-dala", "onnxrt-ucsa"]
MODEL = dict(hidden_size=256, num_heads=8, num_layers=4, vocab_size=1000)


def worker(backend: str, n: int, repeats: int) -> dict:
    import torch

    import danon

    torch.manual_seed(0)
    model = danon.create_dense_model(max_sequence_length=n, **MODEL).eval()
    ids = torch.randint(0, MODEL["vocab_size"], (1, n))
    if backend == "eager":
        fn = model
    elif backend == "inductor":
        fn = torch.compile(model, backend="inductor")
    elif backend.startswith("onnxrt-"):   # the rewritten graph exported in memory, run by ONNX Runtime
        fn = torch.compile(model, backend="danon", dynamic=False,
                           options={"attention": backend.split("-")[1], "min_seq_len": 0, "target": "onnxrt"})
    else:
        fn = torch.compile(model, backend="danon",
                           options={"attention": backend.split("-")[1], "min_seq_len": 0})
    with torch.no_grad():
        start = time.perf_counter()
        logits = fn(ids)
        compile_s = time.perf_counter() - start
        reset_peak()
        base = status_kib("VmRSS")
        fn(ids)
        peak = (status_kib("VmHWM") - base) * 1024
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(ids)
            times.append(time.perf_counter() - start)
        ref = model.double()(ids)
    error = float((logits.double() - ref).norm() / ref.norm())
    return {"backend": backend, "n": n, "compile_s": compile_s, "median_s": statistics.median(times),
            "min_s": min(times), "max_s": max(times), "peak_bytes": peak, "rel_error": error}


def report(cells: list, seq_lens: list, command: str) -> str:
    by = {(c["backend"], c["n"]): c for c in cells}
    lines = [
        "# Backends side by side on a GPT-style model (CPU)",
        "",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine()}",
        f"- command: `{command}`",
        f"- model: danon.create_dense_model({', '.join(f'{k}={v}' for k, v in MODEL.items())}), causal, batch 1, "
        "no_grad; danon options: min_seq_len=0, family defaults",
        "- speedup = inductor median / backend median, measured in the same run",
        "- onnxrt-*: backend='danon' with target='onnxrt' (ONNX Runtime CPU provider, opset 23)",
        "",
        "| N | backend | first call s (compile) | median ms | min-max ms | vs inductor | peak MiB | rel. error vs eager fp64 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n in seq_lens:
        anchor = by[("inductor", n)]["median_s"]
        for b in BACKENDS:
            c = by[(b, n)]
            lines.append(f"| {n} | {b} | {c['compile_s']:.1f} | {c['median_s'] * 1e3:.1f} | "
                         f"{c['min_s'] * 1e3:.1f}-{c['max_s'] * 1e3:.1f} | {anchor / c['median_s']:.2f}x | "
                         f"{c['peak_bytes'] / 2 ** 20:.1f} | {c['rel_error']:.2e} |")
    lines += ["", "## Checks against the targets", ""]
    exact = [by[("inductor", n)]["median_s"] / by[("danon-exact", n)]["median_s"] for n in seq_lens]
    lines.append(f"- danon exact vs inductor: {', '.join(f'{s:.2f}x' for s in exact)} "
                 f"(target: not slower at any N: {'met' if min(exact) >= 0.95 else 'NOT met'}, 5% noise allowed)")
    if 16384 in seq_lens:
        for fam in ("msra", "dala", "ucsa"):
            s = by[("inductor", 16384)]["median_s"] / by[(f"danon-{fam}", 16384)]["median_s"]
            lines.append(f"- danon {fam} at N = 16k: {s:.2f}x inductor (target >= 3x: {'met' if s >= 3 else 'NOT met'})")
    n_top = max(seq_lens)
    for fam in ("msra", "dala", "ucsa"):
        s = by[("onnxrt-exact", n_top)]["median_s"] / by[(f"onnxrt-{fam}", n_top)]["median_s"]
        target = f"target >= 3x at N = 16k: {'met' if s >= 3 else 'NOT met'}" if n_top == 16384 else "target is at N = 16k"
        lines.append(f"- ONNX Runtime {fam} vs ONNX Runtime exact (dense) at N = {n_top}: {s:.2f}x ({target})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    bench_main(__file__, __doc__, BACKENDS, [1024, 4096, 16384], worker, report, argv)


if __name__ == "__main__":
    main()
