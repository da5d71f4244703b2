"""What UCSA's selection by attention mass costs on CPU, on a pretrained model's real attention inputs.

all-MiniLM-L6-v2 (real weights, the texts of bench/pretrained/minilm.py, B 8, N 512, 12 heads of 32 dims)
runs once with sdpa while a recording attention function keeps every site's q, k, v and padding mask. Then
each method runs the 6 sites' attention on exactly those inputs: SDPA (the anchor, same run), danon's exact
family, UCSA with a fixed top-k and UCSA with gamma. Reported per method: the median over --repeats of the 6
sites' total time, its ratio to SDPA's, the listed and capacity keys per query (mean over sites), and the
mean relative output error per site against SDPA. The CPU executor gathers, per chunk of query blocks, the
listed blocks up to the last slot used, so a plan that lists fewer blocks than its capacity costs less.

    python bench/pretrained/gamma_cpu.py              # -> bench/results/pretrained_gamma_cpu.md, .json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import danon  # noqa: E402
from bench._common import machine  # noqa: E402
from bench.pretrained.minilm import load  # noqa: E402
from danon.core.plan import listed_keys_per_query  # noqa: E402

UCSA = dict(block_size=16, local_window_size=16, global_tokens=16)
METHODS = {
    "sdpa": None,
    "exact (danon)": ("exact", {}),
    "ucsa top-8": ("ucsa", dict(UCSA, top_k_blocks=8)),
    "ucsa top-12": ("ucsa", dict(UCSA, top_k_blocks=12)),
    "ucsa gamma 0.9 (cap 32)": ("ucsa", dict(UCSA, top_k_blocks=32, gamma=0.9)),
    "ucsa gamma 0.95 (cap 32)": ("ucsa", dict(UCSA, top_k_blocks=32, gamma=0.95)),
    "ucsa gamma 0.9 (cap 16)": ("ucsa", dict(UCSA, top_k_blocks=16, gamma=0.9)),
}


def record_sites():
    """[(q, k, v, key_padding_mask [B, N] bool)] of every attention call of one sdpa forward."""
    import transformers
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    path, _, enc = load()
    sites = []

    def recording(module, q, k, v, mask, **kwargs):
        sites.append((q.detach().clone(), k.detach().clone(), v.detach().clone(), mask[:, 0, 0, :].clone()))
        return sdpa_attention_forward(module, q, k, v, mask, **kwargs)
    AttentionInterface.register("bench-record", recording)
    AttentionMaskInterface.register("bench-record", sdpa_mask)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="bench-record").eval()
    with torch.no_grad():
        model(**enc)
    return sites


def run(method, q, k, v, kpm):
    if METHODS[method] is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=kpm[:, None, None, :])
    kind, kw = METHODS[method]
    return danon.attention(q, k, v, kind=kind, key_padding_mask=kpm, **kw)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "pretrained_gamma_cpu.md"))
    args = ap.parse_args(argv)
    sites = record_sites()
    rows = []
    with torch.no_grad():
        refs = [run("sdpa", *s) for s in sites]
        for method in METHODS:
            for s in sites:           # warm-up
                run(method, *s)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                for s in sites:
                    run(method, *s)
                times.append(time.perf_counter() - start)
            errors = [float((run(method, *s) - ref).norm() / ref.norm()) for s, ref in zip(sites, refs)]
            listed = capacity = float(sites[0][0].shape[2])
            if METHODS[method] is not None and METHODS[method][0] != "exact":
                kind, kw = METHODS[method]
                plans = [danon.attention_plan(q, k, v, kind=kind, key_padding_mask=kpm, scale=q.shape[-1] ** -0.5,
                                              **kw) for q, k, v, kpm in sites]
                listed = statistics.mean(listed_keys_per_query(p) for p in plans)
                capacity = statistics.mean(float(p.keys_per_query()) for p in plans)
            rows.append(dict(method=method, median_ms=1e3 * statistics.median(times),
                             spread_ms=1e3 * (max(times) - min(times)), listed=listed, capacity=capacity,
                             error=statistics.mean(errors)))
            print(rows[-1], flush=True)
    anchor = rows[0]["median_ms"]
    q = sites[0][0]
    lines = ["# UCSA's selection by attention mass on CPU: MiniLM's real attention inputs", "",
             f"Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {machine()}. Command: "
             f"`python bench/pretrained/gamma_cpu.py --repeats {args.repeats}`. Inputs: the {len(sites)} attention "
             f"sites of all-MiniLM-L6-v2 on bench/pretrained/minilm.py's texts, q {list(q.shape)}, fp32, padded. "
             "Time: the 6 sites' attention, median of the repeats (spread: max - min); ratio: SDPA's time over the "
             "method's, same run (> 1 is faster than SDPA). Error: mean over sites of ||out - sdpa|| / ||sdpa||.", "",
             "| method | ms (spread) | ratio to sdpa | keys/query listed | capacity | rel. error per site |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['median_ms']:.1f} ({r['spread_ms']:.1f}) | {anchor / r['median_ms']:.2f}x | "
                     f"{r['listed']:.0f} | {r['capacity']:.0f} | {r['error']:.2e} |")
    out = os.path.abspath(args.out)
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump({"machine": machine(), "repeats": args.repeats, "rows": rows}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
