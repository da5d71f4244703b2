"""Compile time: the danon backend against Inductor on the same models, first compile and dynamic recompile.

Each cell (model, backend, dynamic) runs in a fresh subprocess: compile and call the model at the first
length (the first compile), then call it at the second length (with dynamic=None Dynamo recompiles with a
symbolic length; with dynamic=True the first graph is already symbolic and the second call may reuse it).
Times are wall seconds of those first calls, each cell with an empty Inductor cache directory (warmed by
one unrelated compile, which builds the C++ toolchain's once-per-directory files) and the FX graph and
autotune caches off (else a cell would reuse kernels an earlier cell or run compiled); the ratio column is danon's time over
Inductor's for the same model, dynamic setting and call, measured in the same run.

Models (random weights, batch 1, no_grad, float32): the danon factories (hidden 256, 4 heads, 2 kv heads,
2 layers, vocabulary 4096; their attention runs the family's plan in both backends) and a transformers
Llama of that size (its SDPA sites become MSRA under danon). Backends: torch.compile(backend="inductor")
and backend="danon" with options {"attention": "keep"} for the factories (their attention is already
danon's) or {"attention": "msra", "min_seq_len": 0} for Llama and the dense factory.

    python bench/compile_cpu.py                          # -> bench/results/compile_cpu.md and .json
    python bench/compile_cpu.py --models msra --seq-lens 256 512 --out /tmp/c.md      # smoke
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
from _common import machine, run_cell  # noqa: E402

MODELS = ["dense", "msra", "dala", "ucsa", "hybrid", "llama"]
BACKENDS = ["inductor", "danon"]
DYNAMIC = ["none", "true"]
SIZE = dict(hidden_size=256, num_heads=4, num_kv_heads=2, num_layers=2, vocab_size=4096)


def _model(name: str):
    import torch
    import danon
    torch.manual_seed(0)
    if name == "llama":
        import transformers
        cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=4096,
                                       max_position_embeddings=1 << 15, use_cache=False)
        return transformers.LlamaForCausalLM(cfg).eval()
    factory = {"dense": danon.create_dense_model, "msra": danon.create_msra_model, "dala": danon.create_dala_model,
               "ucsa": danon.create_ucsa_model, "hybrid": danon.create_super_hybrid_model}[name]
    return factory(**SIZE).eval()


def worker(model_name: str, backend: str, dynamic: str, seq_lens: list) -> dict:
    import torch
    model = _model(model_name)
    kwargs = dict(dynamic=None if dynamic == "none" else True)
    if backend == "danon":
        sparse_already = model_name not in ("dense", "llama")
        options = {"attention": "keep"} if sparse_already else {"attention": "msra", "min_seq_len": 0}
        compiled = torch.compile(model, backend="danon", options=options, **kwargs)
    else:
        compiled = torch.compile(model, backend="inductor", **kwargs)
    times = []
    # no cache: an earlier cell's (or run's) compiled graphs would answer from disk and time nothing
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False, autotune_local_cache=False):
        # one unrelated compile first: it builds what the C++ toolchain builds once per cache directory
        # (headers, the kernel prelude), a fixed cost that would otherwise be added to both backends' first cell
        torch.compile(lambda x: x.sin() + 1, backend="inductor")(torch.randn(8))
        for n in seq_lens:
            ids = torch.randint(0, 4096, (1, n))
            t0 = time.perf_counter()
            compiled(ids)
            times.append(time.perf_counter() - t0)
    return {"model": model_name, "backend": backend, "dynamic": dynamic, "seq_lens": seq_lens, "first_call_s": times}


def report(cells: list, seq_lens: list, command: str) -> str:
    by = {(c["model"], c["backend"], c["dynamic"]): c["first_call_s"] for c in cells}
    lines = ["# Compile time: danon against Inductor, first compile and dynamic recompile", "",
             f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", f"- machine: {machine()}",
             f"- command: `{command}`",
             f"- models: danon factories {SIZE} and a transformers Llama of that size; batch 1, no_grad, fp32",
             f"- first call at N = {seq_lens[0]} (compile), then the first call at N = {seq_lens[1]} "
             "(dynamic=None: Dynamo's recompile with a symbolic length; dynamic=True: a symbolic graph from the "
             "start, the second call may reuse it); seconds of wall time; ratio = danon / inductor",
             "- caches: every cell in a fresh process with an empty Inductor cache directory, warmed by one "
             "unrelated compile (the C++ toolchain's once-per-directory files); FX graph and autotune caches off", "",
             "| model | dynamic | inductor compile s | danon compile s | ratio | inductor recompile s | "
             "danon recompile s | ratio |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for model in MODELS:
        for dynamic in DYNAMIC:
            ind, dan = by.get((model, "inductor", dynamic)), by.get((model, "danon", dynamic))
            if ind is None or dan is None:
                continue
            lines.append(f"| {model} | {dynamic} | {ind[0]:.1f} | {dan[0]:.1f} | {dan[0] / ind[0]:.2f} | "
                         f"{ind[1]:.1f} | {dan[1]:.1f} | {dan[1] / ind[1]:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--seq-lens", type=int, nargs=2, default=[1024, 4096])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "compile_cpu.md"))
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "BACKEND", "DYNAMIC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args.seq_lens)))
        return
    try:
        from tqdm import tqdm
    except ImportError:   # progress bar only with the bench extra
        def tqdm(x, **_):
            return x
    jobs = [(m, b, d) for m in args.models for d in DYNAMIC for b in BACKENDS]
    cells = []
    for m, b, d in tqdm(jobs, desc="compile"):
        # an empty Inductor cache directory per cell: no kernel compiled by an earlier cell or run is reused
        with tempfile.TemporaryDirectory() as cache:
            cells.append(run_cell(__file__, [m, b, d, "--seq-lens", *args.seq_lens], {"TORCHINDUCTOR_CACHE_DIR": cache}))
    command = "python bench/compile_cpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = report(cells, args.seq_lens, command.strip())
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"machine": machine(), "command": command.strip(), "cells": cells}, f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
