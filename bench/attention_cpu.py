"""Each attention family against F.scaled_dot_product_attention on CPU: time, peak memory, error.

Causal self-attention, B = 1, H = 8, D = 64, fp32, default family settings. Each (family, N)
cell runs in a fresh subprocess so that its peak memory (VmHWM minus the resident size after
the inputs exist) is its own. Times are the median of --repeats forward calls after one warm-up.
Error is ||out - exact|| / ||exact|| against SDPA on the same inputs.

    python bench/attention_cpu.py                       # N = 1k, 4k, 8k, 16k, 32k -> bench/results/attention_cpu.md
    python bench/attention_cpu.py --seq-lens 1024 4096 --repeats 3 --out /tmp/attn.md
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import bench_main, machine, reset_peak, status_kib  # noqa: E402

FAMILIES = ["sdpa", "msra", "dala", "ucsa"]


def worker(family: str, n: int, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    import danon

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, n, 64) for _ in range(3))

    def run():
        if family == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return danon.attention(q, k, v, kind=family, causal=True)

    small = [x[:, :, :256] for x in (q, k, v)]        # warm up one-time initialisation on a small input
    if family == "sdpa":
        F.scaled_dot_product_attention(*small, is_causal=True)
    else:
        danon.attention(*small, kind=family, causal=True)
    reset_peak()
    base = status_kib("VmRSS")
    out = run()
    peak = (status_kib("VmHWM") - base) * 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    error = biased_error = 0.0
    if family != "sdpa":
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        error = float((out - ref).norm() / ref.norm())
    if family == "dala":   # DALA's decay is part of its definition: also compare with dense attention + ALiBi
        ref = _dense_alibi(q, k, v, danon.alibi_slopes(8))
        biased_error = float((out - ref).norm() / ref.norm())
    return {"family": family, "n": n, "median_s": statistics.median(times), "min_s": min(times),
            "max_s": max(times), "peak_bytes": peak, "rel_error": error, "rel_error_biased": biased_error}


def _dense_alibi(q, k, v, slopes, rows: int = 512):
    """Exact causal attention with the bias -slope_h |i - j|, a chunk of query rows at a time."""
    import torch
    import torch.nn.functional as F
    n = q.shape[2]
    out = torch.empty_like(q)
    j = torch.arange(n)
    for r0 in range(0, n, rows):
        i = torch.arange(r0, min(n, r0 + rows))
        dist = (i[:, None] - j[None, :]).float()
        bias = -slopes.view(-1, 1, 1) * dist.abs()
        bias = bias.masked_fill(dist < 0, float("-inf"))
        out[:, :, r0:r0 + len(i)] = F.scaled_dot_product_attention(q[:, :, i], k, v, attn_mask=bias)
    return out


def report(cells: list, seq_lens: list, command: str) -> str:
    by = {(c["family"], c["n"]): c for c in cells}
    lines = [
        "# Attention families vs SDPA on CPU",
        "",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine()}",
        f"- command: `{command}`",
        "- setting: causal self-attention, B = 1, H = 8, D = 64, fp32, default family settings "
        "(block 64; MSRA window 256, 3 levels, c = 4; DALA window 256, memory 64; UCSA window 512, 64 global, top-16)",
        "- speedup = SDPA median / family median, measured in the same run; peak = extra resident memory of the call",
        "- errors are on random inputs, the worst case for any sparse approximation (attention spread evenly); "
        "DALA's ALiBi decay is part of its definition, so it is also compared with dense attention + the same ALiBi",
        "",
        "| N | family | median ms | min-max ms | speedup vs SDPA | peak MiB | rel. error vs exact | vs exact + ALiBi |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n in seq_lens:
        sdpa = by[("sdpa", n)]
        for fam in FAMILIES:
            c = by[(fam, n)]
            speed = sdpa["median_s"] / c["median_s"]
            err = "-" if fam == "sdpa" else f"{c['rel_error']:.3f}"
            biased = f"{c['rel_error_biased']:.3f}" if fam == "dala" else "-"
            lines.append(f"| {n} | {fam} | {c['median_s'] * 1e3:.1f} | {c['min_s'] * 1e3:.1f}-{c['max_s'] * 1e3:.1f} "
                         f"| {speed:.2f}x | {c['peak_bytes'] / 2 ** 20:.1f} | {err} | {biased} |")
    lines += ["", "## Checks against the targets", ""]
    for fam, target in (("msra", 5.0), ("dala", 5.0), ("ucsa", 2.0)):
        speeds = [by[("sdpa", n)]["median_s"] / by[(fam, n)]["median_s"] for n in seq_lens]
        grows = all(b >= a for a, b in zip(speeds, speeds[1:]))
        at16k = ""
        if 16384 in seq_lens:
            s = speeds[seq_lens.index(16384)]
            at16k = f"N = 16k speedup {s:.2f}x (target >= {target:.0f}x: {'met' if s >= target else 'NOT met'}); "
        lines.append(f"- {fam}: {at16k}speedup grows with N: {'yes' if grows else 'no'} "
                     f"({', '.join(f'{s:.2f}' for s in speeds)})")
    for fam in ("msra", "dala"):
        peaks = [by[(fam, n)]["peak_bytes"] / n for n in seq_lens]
        lines.append(f"- {fam}: peak bytes per token: {', '.join(f'{p / 1024:.1f} KiB' for p in peaks)} "
                     "(constant = linear memory in N)")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    bench_main(__file__, __doc__, FAMILIES, [1024, 4096, 8192, 16384, 32768], worker, report, argv)


if __name__ == "__main__":
    main()
