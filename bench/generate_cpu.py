"""Long-context generation on CPU: prefill time and decode ms per token, transformers' sdpa against danon.

A Llama-shaped model with random weights (2 layers, hidden 512, H 8, Hkv 2, D 64), B 1, fp32, through
transformers: attn_implementation "sdpa" with its DynamicCache (the anchor), "sdpa" with danon.SparseCache
(the same attention over growing buffers instead of torch.cat: what the cache alone changes), "danon" (exact,
DynamicCache) and the sparse families with danon.SparseCache ("danon-msra", "danon-dala", "danon-ucsa"), whose
decode steps run from the cache's plan state. Each cell runs in a fresh subprocess. Prefill: one forward over
the context (contexts up to PREFILL_MAX; beyond, the cache is filled with random keys and values, and UCSA's
state is shown random queries for the block before the first step; a step's time does not depend on the
values). Decode: the median over --repeats single-token steps after the context, the first step left out (it
folds the filled cache into the plan state, once). Peak memory is VmHWM minus the resident size after the
model exists; KV bytes are the cache's key and value buffers, summary bytes the plan states'.

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

# cell name -> (attn_implementation, cache)
CELLS = {"sdpa": ("sdpa", "dynamic"), "sdpa+SparseCache": ("sdpa", "sparse"), "danon": ("danon", "dynamic"),
         "danon-msra": ("danon-msra", "sparse"), "danon-dala": ("danon-dala", "sparse"),
         "danon-ucsa": ("danon-ucsa", "sparse")}
IMPLEMENTATIONS = list(CELLS)
PREFILL_MAX = 32768
MODEL = dict(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=1 << 18)


def worker(cell: str, n: int, repeats: int) -> dict:
    import torch
    import transformers

    import danon
    import danon.hf  # noqa: F401  (registers the danon attention implementations)

    implementation, cache_kind = CELLS[cell]
    # time the attention calls themselves: re-register the implementation's function wrapped in a timer
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    attention_s, attend = [0.0], ALL_ATTENTION_FUNCTIONS[implementation]

    def timed(*args, **kwargs):
        t = time.perf_counter()
        out = attend(*args, **kwargs)
        attention_s[0] += time.perf_counter() - t
        return out

    AttentionInterface.register(implementation, timed)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**MODEL)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation=implementation).eval()
    layers, hkv, d = MODEL["num_hidden_layers"], MODEL["num_key_value_heads"], MODEL["hidden_size"] // 8
    with torch.no_grad():   # warm up one-time initialisation on a short input
        model(torch.randint(0, 1000, (1, 256)))
    reset_peak()
    base = status_kib("VmRSS")
    cache = danon.SparseCache() if cache_kind == "sparse" else transformers.DynamicCache(config=config)
    prefill_s = prefill_attention_s = None
    with torch.no_grad():
        if n <= PREFILL_MAX:
            ids = torch.randint(0, 1000, (1, n))
            attention_s[0] = 0.0
            t = time.perf_counter()
            out = model(ids, cache=cache, use_cache=True)
            prefill_s = time.perf_counter() - t
            prefill_attention_s = attention_s[0]
            token = out.logits[:, -1:].argmax(-1)
        else:
            for layer in range(layers):
                cache.update(torch.randn(1, hkv, n, d), torch.randn(1, hkv, n, d), layer)
                if implementation == "danon-ucsa":   # the queries of the last blocks, which UCSA selects with
                    cache.layers[layer].plan_state("ucsa", {}).observe(torch.randn(1, 8, 128, d), n)
            token = torch.randint(0, 1000, (1, 1))
        steps = []
        for _ in range(repeats + 1):
            t = time.perf_counter()
            out = model(token, cache=cache, use_cache=True)
            steps.append(time.perf_counter() - t)
            token = out.logits[:, -1:].argmax(-1)
    if cache_kind == "sparse":
        kv_bytes, summary_bytes, local = cache.kv_bytes(), cache.summary_bytes(), cache.local_calls()
    else:
        kv_bytes = sum(x.numel() * x.element_size() for layer in cache.layers for x in (layer.keys, layer.values))
        summary_bytes, local = 0, 0
    return {"implementation": cell, "n": n, "prefill_s": prefill_s, "prefill_attention_s": prefill_attention_s,
            "decode_ms": 1000 * statistics.median(steps[1:]), "decode_ms_all": [1000 * x for x in steps],
            "peak_mib": (status_kib("VmHWM") - base) / 1024, "kv_mib": kv_bytes / 2 ** 20,
            "summary_mib": summary_bytes / 2 ** 20, "steps_from_state": local}


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
    ax.set_yscale("log")
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
             "- model: Llama-shaped, random weights, 2 layers, hidden 512, H 8, Hkv 2, D 64; B 1, fp32",
             "- caches: sdpa and danon (exact) a DynamicCache; sdpa+SparseCache and the danon-* families "
             "danon.SparseCache",
             f"- prefill is measured up to {PREFILL_MAX} tokens; beyond, the cache is filled with random keys/values",
             "- ratios are sdpa's time over the cell's, measured in the same run (> 1: faster than sdpa)", "",
             "- prefill attention: the seconds spent in the attention function during the prefill (the rest, "
             "projections, MLPs and logits, is the same computation in every cell)", "",
             "| context | implementation | prefill s | prefill vs sdpa | prefill attention s | attention vs sdpa | "
             "decode ms/token | decode vs sdpa | peak MiB | KV MiB | summary MiB | summary / KV |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in seq_lens:
        anchor = by.get(("sdpa", n), {})
        for impl in IMPLEMENTATIONS:
            c = by.get((impl, n))
            if c is None or "error" in c:
                lines.append(f"| {n} | {impl} | error: {(c or {}).get('error', 'missing')[:80]} ||||||||||")
                continue
            pre = "-" if c["prefill_s"] is None else f"{c['prefill_s']:.2f}"
            pre_ratio = "-" if c["prefill_s"] is None or not anchor.get("prefill_s") else \
                f"{anchor['prefill_s'] / c['prefill_s']:.2f}x"
            dec_ratio = f"{anchor['decode_ms'] / c['decode_ms']:.2f}x" if anchor.get("decode_ms") else "-"
            att = "-" if c.get("prefill_attention_s") is None else f"{c['prefill_attention_s']:.2f}"
            att_ratio = "-" if c.get("prefill_attention_s") is None or not anchor.get("prefill_attention_s") else \
                f"{anchor['prefill_attention_s'] / c['prefill_attention_s']:.2f}x"
            lines.append(f"| {n} | {impl} | {pre} | {pre_ratio} | {att} | {att_ratio} | {c['decode_ms']:.1f} | "
                         f"{dec_ratio} | "
                         f"{c['peak_mib']:.0f} | {c['kv_mib']:.0f} | {c['summary_mib']:.2f} | "
                         f"{100 * c['summary_mib'] / c['kv_mib']:.1f} % |")
    plot = _plot(cells, os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "generate_cpu.png"))
    if plot:
        lines += ["", f"![decode ms per token]({os.path.basename(plot)})"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    bench_main(__file__, __doc__, IMPLEMENTATIONS, [8192, 32768, 131072], worker, report)
