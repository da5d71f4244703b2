"""Long-context generation on CPU: prefill time and decode ms per token, transformers' sdpa against danon.

A Llama-shaped model with random weights (2 layers, hidden 512, H 8, Hkv 2, D 64), B 1, fp32, through
transformers with a DynamicCache: attn_implementation "sdpa" (the anchor), "danon" (exact) and the
danon families that run through a cache ("danon-msra", "danon-dala"; UCSA's decode needs the queries
before each call, which the cache does not keep yet). Each (implementation, context) cell runs in a
fresh subprocess. Prefill: one forward over the context (contexts up to PREFILL_MAX; beyond, the cache
is filled with random keys and values, which a decode step's time does not depend on). Decode: the
median over --repeats single-token steps after the context. Peak memory is VmHWM minus the resident
size after the model exists; cache bytes are the KV tensors' (danon keeps no summary state yet: every
step rebuilds its plan from the keys).

    python bench/generate_cpu.py                              # contexts 8k, 32k, 128k -> bench/results/generate_cpu.md
    python bench/generate_cpu.py --seq-lens 2048 --repeats 3 --out /tmp/gen.md
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import bench_main, machine, reset_peak, status_kib  # noqa: E402

IMPLEMENTATIONS = ["sdpa", "danon", "danon-msra", "danon-dala"]
PREFILL_MAX = 32768
MODEL = dict(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=1 << 18)


def worker(implementation: str, n: int, repeats: int) -> dict:
    import torch
    import transformers

    import danon.hf  # noqa: F401  (registers the danon attention implementations)

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**MODEL)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation=implementation).eval()
    layers, hkv, d = MODEL["num_hidden_layers"], MODEL["num_key_value_heads"], MODEL["hidden_size"] // 8
    with torch.no_grad():   # warm up one-time initialisation on a short input
        model(torch.randint(0, 1000, (1, 256)))
    reset_peak()
    base = status_kib("VmRSS")
    cache = transformers.DynamicCache(config=config)
    prefill_s = None
    with torch.no_grad():
        if n <= PREFILL_MAX:
            ids = torch.randint(0, 1000, (1, n))
            t = time.perf_counter()
            out = model(ids, cache=cache, use_cache=True)
            prefill_s = time.perf_counter() - t
            token = out.logits[:, -1:].argmax(-1)
        else:
            for layer in range(layers):
                cache.update(torch.randn(1, hkv, n, d), torch.randn(1, hkv, n, d), layer)
            token = torch.randint(0, 1000, (1, 1))
        steps = []
        for _ in range(repeats + 1):
            t = time.perf_counter()
            out = model(token, cache=cache, use_cache=True)
            steps.append(time.perf_counter() - t)
            token = out.logits[:, -1:].argmax(-1)
    kv_bytes = sum(x.numel() * x.element_size() for layer in cache.layers for x in (layer.keys, layer.values))
    return {"implementation": implementation, "n": n, "prefill_s": prefill_s,
            "decode_ms": 1000 * statistics.median(steps[1:]), "peak_mib": (status_kib("VmHWM") - base) / 1024,
            "kv_mib": kv_bytes / 2 ** 20, "summary_mib": 0.0}


def _plot(cells, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for impl in IMPLEMENTATIONS:
        pts = sorted((c["n"], c["decode_ms"]) for c in cells if c.get("implementation") == impl and "decode_ms" in c)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode ms / token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def report(cells, seq_lens, command) -> str:
    by = {(c.get("implementation"), c.get("n")): c for c in cells}
    lines = ["# Generation on CPU: prefill and decode, transformers sdpa vs danon", "",
             f"- machine: {machine()}", f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- command: `{command}`",
             "- model: Llama-shaped, random weights, 2 layers, hidden 512, H 8, Hkv 2, D 64; B 1, fp32, DynamicCache",
             f"- prefill is measured up to {PREFILL_MAX} tokens; beyond, the cache is filled with random keys/values",
             "- ratios are sdpa's time over the cell's, measured in the same run (> 1: faster than sdpa)", "",
             "| context | implementation | prefill s | prefill vs sdpa | decode ms/token | decode vs sdpa | peak MiB | "
             "KV MiB | summary MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for n in seq_lens:
        anchor = by.get(("sdpa", n), {})
        for impl in IMPLEMENTATIONS:
            c = by.get((impl, n))
            if c is None or "error" in c:
                lines.append(f"| {n} | {impl} | error: {(c or {}).get('error', 'missing')[:80]} |||||||")
                continue
            pre = "-" if c["prefill_s"] is None else f"{c['prefill_s']:.2f}"
            pre_ratio = "-" if c["prefill_s"] is None or not anchor.get("prefill_s") else \
                f"{anchor['prefill_s'] / c['prefill_s']:.2f}x"
            dec_ratio = f"{anchor['decode_ms'] / c['decode_ms']:.2f}x" if anchor.get("decode_ms") else "-"
            lines.append(f"| {n} | {impl} | {pre} | {pre_ratio} | {c['decode_ms']:.1f} | {dec_ratio} | "
                         f"{c['peak_mib']:.0f} | {c['kv_mib']:.0f} | {c['summary_mib']:.0f} |")
    plot = _plot(cells, os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "generate_cpu.png"))
    if plot:
        lines += ["", f"![decode ms per token]({os.path.basename(plot)})"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    bench_main(__file__, __doc__, IMPLEMENTATIONS, [8192, 32768, 131072], worker, report)
