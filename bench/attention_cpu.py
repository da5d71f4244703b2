"""Each attention family against SDPA and FlexAttention on CPU: forward and backward time, GFLOP/s, memory.

Causal self-attention, B = 1, H = 8, D = 64, fp32, default family settings. Per N, one subprocess
times every column round-robin (`--repeats` rounds after a warm-up, so that drift of the machine hits
all alike) and measures the machine's fp32 matmul peak (2048^2 x 2048, best of 10, the faster of MKL's
torch.mm and oneDNN's matmul) before the rounds, after each and after the last; the share of peak uses the
highest of these (the machine drifts: a peak measured in a slow moment would inflate every share). oneDNN
counts because danon's kernel runs its micro-kernel (on an AMD EPYC about 15 % faster than MKL, which takes its
AVX2 path there; on an Intel Xeon the two are even). The machine line names the allocator settings the run had
(GLIBC_TUNABLES and the like change how fast fresh buffers are: docs/executors.md). Columns:

- sdpa: F.scaled_dot_product_attention(is_causal=True), the anchor;
- msra, dala, ucsa: danon.attention(kind=...) with the plan built in every call (what a user pays);
- flex-<family> and exact-<family>: the plan's exact blocks only (window, own block, UCSA's global and
  selected blocks; no summaries and no DALA routed tokens, which a BlockMask cannot hold as blocks) run
  by torch.compile(flex_attention) with a BlockMask of exactly those blocks, and by danon's executor
  on the same plan (summaries and tokens removed); DALA's ALiBi is Flex's score_mod. Forward only:
  Flex's backward raises on CPU in torch 2.13.

Times: forward without autograd; backward alone (after a forward with autograd; its grad_output is made
before the timer starts); train = both.
FLOPs are counted from the plan each call really runs: 4 D per (query, key) pair it attends to
(summaries one key each, the causal own block its triangle), times H, forward; the backward 2.5x
(the flash backward's five matmuls against the forward's two). SDPA: the causal triangle.
Peak memory: one fresh subprocess per (family, N): VmHWM minus the resident size once the inputs
exist, forward (no autograd) and train step, divided by N; before each, the freed outputs danon's CPU kernel
keeps for its next calls are given back (reset_peak), so the train step does not reuse the forward's.

    python bench/attention_cpu.py                               # N = 4k, 16k, 64k -> bench/results/attention_cpu.md
    python bench/attention_cpu.py --seq-lens 1024 4096 --repeats 2 --out /tmp/attn.md
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, reset_peak, run_cell, status_kib, write_results  # noqa: E402

FAMILIES = ["msra", "dala", "ucsa"]
H, D = 8, 64
TARGETS_16K = {"msra": (12.0, 6.0), "dala": (12.0, 6.0), "ucsa": (4.0, None)}   # forward, train step vs SDPA
EFFICIENCY_TARGET = 0.60
FLEX_TARGET = 1.5


# ------------------------------------------------------------------------------------------ measuring
def matmul_peak(tries: int = 10) -> float:
    """GFLOP/s of a 2048 x 2048 fp32 matmul, best of `tries`, by MKL (torch.mm) and by oneDNN where torch has it
    (the faster): the machine's attainable matmul rate right now."""
    import torch
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    candidates = [lambda: a @ b]
    if torch.backends.mkldnn.is_available():   # oneDNN's fp32 matmul, which torch.mm does not use on CPU
        from torch.utils import mkldnn
        linear = torch.nn.Linear(2048, 2048, bias=False)
        linear.weight.data = b
        linear, am = mkldnn.to_mkldnn(linear), a.to_mkldnn()
        candidates.append(lambda: linear(am))
    best = float("inf")
    for fn in candidates:
        fn()
        best = min(best, *(_timed(fn) for _ in range(tries)))
    return 2 * 2048 ** 3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def plan_pairs(plan, n: int) -> float:
    """(query, key) pairs one head attends to under `plan`, counted from the plan: its listed keys per query
    (near blocks, listed blocks, tokens, summaries, -1 slots left out), less the masked half of the causal
    own block, which the plan lists whole."""
    from danon.core.plan import listed_keys_per_query
    keys = listed_keys_per_query(plan)
    if plan.causal and plan.window is not None:
        keys -= (plan.block_size - 1) / 2
    return keys * n


def exact_only(plan):
    """The plan's exact blocks alone: summaries and routed tokens removed."""
    import dataclasses
    return dataclasses.replace(plan, token_idx=None, summary_idx=None, summary_k=None, summary_v=None,
                               summary_count=None, summary_pos=None)


def flex_block_mask(plan, n: int, mask_mod_holds_blocks: bool = False):
    """A BlockMask of the plan's exact blocks: near blocks before the query block and listed blocks as full
    blocks (the compiled kernel skips mask_mod there), the own block as the one partial block, whose mask_mod
    is the causal triangle. `mask_mod_holds_blocks`: the mask_mod also reads the block table, for Flex's eager
    path, which ignores the block lists and applies mask_mod everywhere (tests); the benchmark leaves it off so
    that Flex's partial blocks pay for the triangle only."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask
    b, tq = plan.block_size, plan.num_query_blocks
    heads = plan.block_idx.shape[1] if plan.block_idx is not None else 1
    t = torch.arange(tq)
    keep = torch.zeros(heads, tq, plan.num_key_blocks, dtype=torch.bool)
    d = t[:, None] - torch.arange(plan.num_key_blocks)[None, :]
    keep |= (d > 0) & (d <= plan.window)
    if plan.block_idx is not None:
        idx = plan.block_idx[0].long()                                               # [Hkv, Tq, Kb]
        ok = (idx >= 0) & (idx < t.view(1, -1, 1))
        listed = torch.zeros(heads, tq, plan.num_key_blocks + 1, dtype=torch.bool)   # -1 slots land in the last column
        listed.scatter_(2, torch.where(ok, idx, plan.num_key_blocks), True)
        keep |= listed[..., :-1]
    full_num = keep.sum(-1).to(torch.int32)
    full_idx = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True).to(torch.int32)   # kept blocks first
    own_num = torch.ones(heads, tq, dtype=torch.int32)
    own_idx = torch.cat([t.view(1, -1, 1).expand(heads, tq, 1),
                         torch.zeros(heads, tq, plan.num_key_blocks - 1, dtype=torch.long)], -1).to(torch.int32)

    seen = keep | (d == 0)[None]                                                   # the own block too

    def causal(b_, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def blocks_and_causal(b_, h, q_idx, kv_idx):
        return seen[h if heads > 1 else 0, q_idx // b, kv_idx // b] & (q_idx >= kv_idx)

    return BlockMask.from_kv_blocks(own_num[None], own_idx[None], full_num[None], full_idx[None], BLOCK_SIZE=b,
                                    mask_mod=blocks_and_causal if mask_mod_holds_blocks else causal,
                                    seq_lengths=(n, n))


def time_worker(n: int, repeats: int) -> dict:
    """Every column at one N, round-robin: forward, backward, train step; flex and exact-only forward."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import flex_attention

    import danon
    from danon.core.attention_op import run_plan
    from danon.visualization import capture_plans

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, n, D) for _ in range(3))
    scale = D ** -0.5
    peaks = [matmul_peak()]

    def family(name):
        if name == "sdpa":
            return lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, is_causal=True)
        return lambda q_, k_, v_: danon.attention(q_, k_, v_, kind=name, causal=True)

    columns = {name: family(name) for name in ["sdpa"] + FAMILIES}
    pairs = {"sdpa": n * (n + 1) / 2}
    flex_cols = {}
    flex = torch.compile(flex_attention, dynamic=False)
    for fam in FAMILIES:
        with capture_plans() as plans:
            columns[fam](q, k, v)
        plan = plans[0]
        pairs[fam] = plan_pairs(plan, n)
        exact = exact_only(plan)
        pairs["exact-" + fam] = pairs["flex-" + fam] = plan_pairs(exact, n)
        mask = flex_block_mask(exact, n)
        slopes = None if plan.slopes is None else plan.slopes.float()

        def alibi(score, b_, h, q_idx, kv_idx, slopes=slopes):
            return score - slopes[h] * (q_idx - kv_idx)

        score_mod = alibi if slopes is not None else None
        flex_cols["flex-" + fam] = (lambda mask=mask, score_mod=score_mod:
                                    flex(q, k, v, block_mask=mask, score_mod=score_mod, scale=scale))
        flex_cols["exact-" + fam] = lambda exact=exact: run_plan(q, k, v, exact, scale=scale)
        # the two agree on the same blocks (a check that the comparison is of the same work)
        diff = (flex_cols["flex-" + fam]() - flex_cols["exact-" + fam]()).abs().max().item()
        assert diff < 1e-3, f"flex and danon disagree on {fam}'s exact blocks: {diff}"

    # "peak": the matmul rate measured just before each round's call of the column (best of 3, about a second),
    # what that call's share is also reported against: this VM's rate moves by a third within a run
    times = {name: {"fwd": [], "bwd": [], "train": [], "peak": []} for name in columns}
    times.update({name: {"fwd": []} for name in flex_cols})
    grads = [x.clone().requires_grad_() for x in (q, k, v)]
    # warm-up: one of each, then `repeats` rounds
    for rnd in range(repeats + 1):
        for name, fn in columns.items():
            adjacent_peak = matmul_peak(tries=3) if rnd else None
            with torch.no_grad():
                t_fwd = _timed(lambda: fn(q, k, v))
            start = time.perf_counter()
            out = fn(*grads)
            fwd_end = time.perf_counter()
            grad_out = torch.ones_like(out)   # the harness's, not the backward's (a fresh 32 MB at 16k)
            mid = time.perf_counter()
            out.backward(grad_out)
            end = time.perf_counter()
            for x in grads:
                x.grad = None
            if rnd:
                times[name]["peak"].append(adjacent_peak)
                times[name]["fwd"].append(t_fwd)
                times[name]["bwd"].append(end - mid)
                times[name]["train"].append(fwd_end - start + end - mid)
        for name, fn in flex_cols.items():
            t_fwd = _timed(fn)
            if rnd:
                times[name]["fwd"].append(t_fwd)
        peaks.append(matmul_peak())   # between rounds too: the highest is the share's denominator
    return {"n": n, "repeats": repeats, "peak_gflops": peaks, "pairs": pairs, "times": times}


def memory_worker(name: str, n: int) -> dict:
    """Peak extra resident memory of one forward (no autograd) and of one train step, in a fresh process."""
    import torch
    import torch.nn.functional as F

    import danon

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, n, D) for _ in range(3))

    def run(q_, k_, v_):
        if name == "sdpa":
            return F.scaled_dot_product_attention(q_, k_, v_, is_causal=True)
        return danon.attention(q_, k_, v_, kind=name, causal=True)

    small = [x[:, :, :256] for x in (q, k, v)]
    run(*small)                                    # one-time initialisation outside the measurement
    with torch.no_grad():
        reset_peak()
        base = status_kib("VmRSS")
        run(q, k, v)
        fwd = (status_kib("VmHWM") - base) * 1024
    grads = [x.clone().requires_grad_() for x in (q, k, v)]
    reset_peak()
    base = status_kib("VmRSS")
    out = run(*grads)
    out.backward(torch.ones_like(out))
    train = (status_kib("VmHWM") - base) * 1024
    return {"name": name, "n": n, "fwd_bytes": fwd, "train_bytes": train}


# ------------------------------------------------------------------------------------------ reporting
def _med(xs):
    return statistics.median(xs)


def _spread(xs):
    return f"{min(xs) * 1e3:.0f}-{max(xs) * 1e3:.0f}"


def report(cells: dict, memory: dict, seq_lens: list, command: str) -> str:
    lines = [
        "# Attention families vs SDPA and FlexAttention on CPU",
        "",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine()}",
        f"- command: `{command}`",
        "- setting: causal self-attention, B = 1, H = 8, D = 64, fp32, default family settings (block 64; MSRA "
        "window 256, 3 levels, c = 4; DALA window 256, memory 64; UCSA window 512, 64 global, top-16)",
        "- each N: one process, columns round-robin, median of the rounds (spread = min-max); fwd without autograd, "
        "bwd alone (grad_output made before the timer), train = fwd + bwd with autograd",
        "- GFLOP: counted from the plan each call runs (4 D per attended (query, key) pair per head; summaries one "
        "key each; the causal own block its triangle); backward 2.5x forward. Share = GFLOP/s over the fp32 matmul "
        "peak (2048^3, best of 10, the faster of MKL's torch.mm and oneDNN's matmul) measured in the same process "
        "before, between and after the rounds (the highest of them); share next to it = the median over the rounds "
        "of each call's GFLOP/s over the peak measured just before that call (best of 3), as this VM's matmul rate "
        "moves by up to a third within a run",
        "- memory: peak extra resident bytes per token of one call in a fresh process (fwd: no autograd; train: "
        "forward + backward), the outputs danon's kernel keeps for its next calls given back before each",
        "- fwd vs Flex (first table): Flex on the plan's exact blocks alone against the family's whole call (summaries "
        "and routed tokens included); the same-blocks table below compares the same work",
        "- Flex has no train step here: in torch 2.13 `flex_attention` raises NotImplementedError (\"FlexAttention does "
        "not support backward on CPU\") as soon as an input requires grad (tests/api/test_bench_attention.py)",
        "",
    ]
    for n in seq_lens:
        c = cells[n]
        peak = max(c["peak_gflops"])
        t, pairs = c["times"], c["pairs"]
        sdpa = t["sdpa"]
        lines += [f"## N = {n}", "",
                  f"matmul peak {peak:.0f} GFLOP/s (highest of {len(c['peak_gflops'])} measurements, lowest "
                  f"{min(c['peak_gflops']):.0f}), "
                  f"{c['repeats']} rounds", "",
                  "| column | fwd ms (spread) | bwd ms (spread) | train ms | GFLOP fwd | GFLOP/s fwd (share) "
                  "| GFLOP/s bwd (share) | share next to it fwd / bwd | fwd vs SDPA | train vs SDPA | fwd vs Flex "
                  "| KiB/token fwd | KiB/token train |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name in ["sdpa"] + FAMILIES:
            x = t[name]
            gf = 4 * D * H * pairs[name] / 1e9
            fwd, bwd, train = _med(x["fwd"]), _med(x["bwd"]), _med(x["train"])
            flex_ratio = "-"
            if name in FAMILIES:
                flex_ratio = f"{_med(t['flex-' + name]['fwd']) / fwd:.2f}x"
            mem = memory.get((name, n))
            mem_f = f"{mem['fwd_bytes'] / n / 1024:.1f}" if mem else "-"
            mem_t = f"{mem['train_bytes'] / n / 1024:.1f}" if mem else "-"
            adj_f, adj_b = adjacent_shares(x, gf)
            adjacent = f"{adj_f:.0%} / {adj_b:.0%}" if adj_f is not None else "-"
            lines.append(
                f"| {name} | {fwd * 1e3:.1f} ({_spread(x['fwd'])}) | {bwd * 1e3:.1f} ({_spread(x['bwd'])}) "
                f"| {train * 1e3:.1f} | {gf:.2f} | {gf / fwd:.0f} ({gf / fwd / peak:.0%}) "
                f"| {2.5 * gf / bwd:.0f} ({2.5 * gf / bwd / peak:.0%}) | {adjacent} | {_med(sdpa['fwd']) / fwd:.2f}x "
                f"| {_med(sdpa['train']) / train:.2f}x | {flex_ratio} | {mem_f} | {mem_t} |")
        lines += ["", "Same blocks, forward: the plan's exact blocks (summaries and routed tokens removed), "
                      "Flex (compiled, BlockMask of those blocks) against danon's executor on that plan:", "",
                  "| family | keys per query | GFLOP | Flex ms (spread) | danon ms (spread) | danon vs Flex "
                  "| danon GFLOP/s (share) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for fam in FAMILIES:
            f, e = t["flex-" + fam]["fwd"], t["exact-" + fam]["fwd"]
            gf = 4 * D * H * pairs["exact-" + fam] / 1e9
            lines.append(f"| {fam} | {pairs['exact-' + fam] / n:.0f} | {gf:.2f} | {_med(f) * 1e3:.1f} ({_spread(f)}) "
                         f"| {_med(e) * 1e3:.1f} ({_spread(e)}) | {_med(f) / _med(e):.2f}x "
                         f"| {gf / _med(e):.0f} ({gf / _med(e) / peak:.0%}) |")
        lines.append("")
    lines += _targets(cells, memory, seq_lens)
    return "\n".join(lines) + "\n"


def adjacent_shares(x: dict, gflop: float):
    """(forward, backward) share of the peak measured just before each call, median over the rounds; (None, None)
    for results from before those measurements.

    Example:
        >>> adjacent_shares({"fwd": [1.0, 2.0, 1.0], "bwd": [5.0, 5.0, 5.0], "peak": [4.0, 2.0, 2.0]}, 2.0)
        (0.5, 0.5)
    """
    peaks = x.get("peak")
    if not peaks:
        return None, None
    fwd = [gflop / t / p for t, p in zip(x["fwd"], peaks)]
    bwd = [2.5 * gflop / t / p for t, p in zip(x["bwd"], peaks)]
    return _med(fwd), _med(bwd)


def _targets(cells, memory, seq_lens) -> list:
    lines = ["## Checks against the targets", ""]
    if 16384 in seq_lens:
        t = cells[16384]["times"]
        sdpa = t["sdpa"]
        for fam, (fwd_target, train_target) in TARGETS_16K.items():
            s_fwd = _med(sdpa["fwd"]) / _med(t[fam]["fwd"])
            line = f"- {fam}, N = 16k: forward {s_fwd:.2f}x SDPA (target >= {fwd_target:.0f}x: " \
                   f"{'met' if s_fwd >= fwd_target else 'NOT met'})"
            if train_target:
                s_tr = _med(sdpa["train"]) / _med(t[fam]["train"])
                line += f"; train step {s_tr:.2f}x (target >= {train_target:.0f}x: " \
                        f"{'met' if s_tr >= train_target else 'NOT met'})"
            lines.append(line)
    for n in seq_lens:
        c = cells[n]
        peak = max(c["peak_gflops"])
        for fam in FAMILIES:
            gf = 4 * D * H * c["pairs"][fam] / 1e9
            share_f = gf / _med(c["times"][fam]["fwd"]) / peak
            share_b = 2.5 * gf / _med(c["times"][fam]["bwd"]) / peak
            flex = _med(c["times"]["flex-" + fam]["fwd"]) / _med(c["times"]["exact-" + fam]["fwd"])
            ok = share_f >= EFFICIENCY_TARGET and share_b >= EFFICIENCY_TARGET
            line = (f"- {fam}, N = {n}: {share_f:.0%} of the run's highest peak forward, {share_b:.0%} backward "
                    f"(target >= {EFFICIENCY_TARGET:.0%}: {'met' if ok else 'NOT met'})")
            adj_f, adj_b = adjacent_shares(c["times"][fam], gf)
            if adj_f is not None:
                ok = adj_f >= EFFICIENCY_TARGET and adj_b >= EFFICIENCY_TARGET
                line += (f"; {adj_f:.0%} / {adj_b:.0%} of the peak next to each call "
                         f"({'met' if ok else 'NOT met'})")
            lines.append(line + f"; same blocks {flex:.2f}x Flex "
                         f"(target >= {FLEX_TARGET}x: {'met' if flex >= FLEX_TARGET else 'NOT met'})")
    for fam in FAMILIES:
        per_token = [memory[(fam, n)]["train_bytes"] / n / 1024 for n in seq_lens if (fam, n) in memory]
        if per_token:
            lines.append(f"- {fam}: train-step peak KiB per token {', '.join(f'{p:.1f}' for p in per_token)} "
                         f"(N = {', '.join(str(n) for n in seq_lens)}; constant = memory linear in N)")
    return lines + [""]


def plot(cells: dict, seq_lens: list, path: str) -> None:
    """Forward and train-step time against N, log-log, with N^2 and N log N slopes through SDPA's / MSRA's
    first point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    ns = [n for n in seq_lens]
    for ax, what in zip(axes, ("fwd", "train")):
        names = ["sdpa"] + FAMILIES + ([f"flex-{f}" for f in FAMILIES] if what == "fwd" else [])
        for name in names:
            ys = [_med(cells[n]["times"][name][what]) for n in ns]
            ax.plot(ns, ys, "o-" if not name.startswith("flex") else "x--", label=name)
        y0 = _med(cells[ns[0]]["times"]["sdpa"][what])
        ax.plot(ns, [y0 * (n / ns[0]) ** 2 for n in ns], ":", color="gray", label="O(N^2)")
        y1 = _med(cells[ns[0]]["times"]["msra"][what])
        ax.plot(ns, [y1 * n * math.log2(n) / (ns[0] * math.log2(ns[0])) for n in ns], "-.", color="gray",
                label="O(N log N)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (tokens)")
        ax.set_ylabel("seconds")
        ax.set_title({"fwd": "forward", "train": "train step (forward + backward)"}[what])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "attention_cpu.md"))
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, *rest = args.worker
        result = time_worker(int(rest[0]), args.repeats) if kind == "time" else memory_worker(rest[0], int(rest[1]))
        print(json.dumps(result))
        return
    try:
        from tqdm import tqdm
    except ImportError:   # progress bar only with the bench extra
        def tqdm(x, **_):
            return x
    jobs = [("time", n) for n in args.seq_lens] + [("memory", fam, n) for n in args.seq_lens for fam in FAMILIES]
    cells, memory = {}, {}
    for job in tqdm(jobs, desc="attention_cpu"):
        result = run_cell(__file__, [*job, "--repeats", args.repeats])
        if job[0] == "time":
            cells[job[1]] = result
        else:
            memory[(job[1], job[2])] = result
    command = ("python bench/attention_cpu.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    write_results(args.out, report(cells, memory, args.seq_lens, command),
                  {"command": command, "cells": list(cells.values()), "memory": list(memory.values())})
    base = os.path.splitext(args.out)[0]
    plot(cells, args.seq_lens, base + ".png")


if __name__ == "__main__":
    main()
