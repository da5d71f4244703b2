"""GPU benchmark of the Triton executor: exact vs SDPA (flash) vs FlexAttention; sparse families vs FlexAttention.

On a CUDA machine, for bf16, B = 1, H = 16, D in {64, 128}, N in {4k, 16k, 64k}, causal:
1. checks correctness first (exact vs SDPA; each sparse family vs danon/kernels/reference.py in fp32);
2. times (triton.testing.do_bench, median) the forward and forward + backward of
   - the exact family against SDPA's flash kernel and FlexAttention with a causal BlockMask,
   - each sparse family (ucsa, msra, dala, default parameters) against FlexAttention given the plan's
     exact key blocks (near window + listed blocks) as its BlockMask. Flex cannot express routed
     tokens or summaries, so it does less work than the plan: the comparison favours Flex.
3. prints and writes bench/results/gpu_attention.md: times, TFLOP/s counted on the (query, key) pairs
   each method really computes (4 D flops per pair forward, 3.5x that forward + backward), the ratios,
   and the plan-building time (not included in the kernel times).

    python bench/gpu_attention.py                     # the full run (needs CUDA)
    python bench/gpu_attention.py --dry-run           # no GPU: tiny shapes through the interpreter, no timing
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

import danon
from danon.kernels import reference
from danon.kernels import triton as tx

FAMILIES = ("exact", "ucsa", "msra", "dala")


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def plan_pairs(plan, nq: int, nk: int) -> float:
    """(query, key) pairs the plan computes per (batch, kv head), summed: exact visible keys + summaries."""
    b, causal = plan.block_size, plan.causal
    i = torch.arange(nq, device="cpu")
    tq = plan.num_query_blocks
    if plan.is_dense:
        return float(((i + 1).clamp(max=nk)).sum() if causal else nq * nk)
    total = 0.0
    if plan.window is not None:   # near blocks, token by token
        t = i // b
        lo = ((t - plan.window).clamp(min=0) * b)
        hi = ((t + 1) * b if causal else (t + plan.window + 1) * b).clamp(max=nk)
        if causal:
            hi = torch.minimum(hi, i + 1)
        total += float((hi - lo).clamp(min=0).sum())
    per_block_rows = torch.full((tq,), b, dtype=torch.float64)
    per_block_rows[-1] = nq - (tq - 1) * b
    for idx, width in ((plan.block_idx, b), (plan.token_idx, 1), (plan.summary_idx, 1)):
        if idx is not None:
            valid = (idx >= 0).to(torch.float64).sum(-1).mean((0, 1)).cpu()       # [Tq] per (batch, kv head)
            total += float((valid * width * per_block_rows).sum())
    return total


def flex_block_mask(plan, B: int, H: int, nq: int, nk: int, device):
    """The plan's exact key blocks (near window + listed blocks) as a FlexAttention BlockMask (causal per token)."""
    from torch.nn.attention.flex_attention import BlockMask
    b, tq, tk = plan.block_size, plan.num_query_blocks, plan.num_key_blocks
    t = torch.arange(tq, device=device)
    if plan.is_dense:
        lists = torch.arange(tk, device=device).expand(tq, tk)
        lists = torch.where((lists <= t[:, None]) | (not plan.causal), lists, -1)
        lists = lists.expand(B, 1, tq, tk)
    else:
        w = plan.window or 0
        offs = torch.arange(-w, 1 if plan.causal else w + 1, device=device)
        near = t[:, None] + offs
        near = torch.where((near >= 0) & (near < tk), near, -1).expand(B, plan.block_idx.shape[1] if plan.block_idx is not None else 1, tq, -1)
        lists = near if plan.block_idx is None else torch.cat([near, plan.block_idx.long().to(device)], -1)
    lists = lists.long()
    Hp = lists.shape[1]
    # sorted, valid first: kv_num_blocks counts them
    key = torch.where(lists >= 0, lists, tk + 1)
    key, _ = key.sort(-1)
    num = (key <= tk).sum(-1).to(torch.int32)
    idx = torch.where(key <= tk, key, 0).to(torch.int32)
    width = max(tk, idx.shape[-1])
    idx = F.pad(idx, (0, width - idx.shape[-1]))
    if Hp != H:
        num, idx = num.repeat_interleave(H // Hp, 1), idx.repeat_interleave(H // Hp, 1)

    def causal_mask(b_, h_, q_idx, kv_idx):
        return q_idx >= kv_idx

    return BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=b, mask_mod=causal_mask if plan.causal else None,
                                    seq_lengths=(nq, nk))


def family_kw(kind):
    return {"exact": {}, "ucsa": {}, "msra": {"num_levels": "auto"}, "dala": {}}[kind]


def run(args):
    cuda = torch.cuda.is_available() and not args.dry_run
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16
    rows, checks = [], []
    flex = None
    if cuda:
        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
        from triton.testing import do_bench
    for D in args.head_dims:
        for N in args.seq_lens:
            g = torch.Generator(device=dev).manual_seed(N + D)
            B, H, Hkv = 1, args.heads, args.kv_heads
            q = torch.randn(B, H, N, D, device=dev, dtype=dtype, generator=g)
            k = torch.randn(B, Hkv, N, D, device=dev, dtype=dtype, generator=g)
            v = torch.randn(B, Hkv, N, D, device=dev, dtype=dtype, generator=g)
            go = torch.randn(B, H, N, D, device=dev, dtype=dtype, generator=g)
            scale = D ** -0.5
            for kind in args.families:
                t0 = time.perf_counter()
                plan = danon.attention_plan(q, k, v, kind=kind, causal=True, block_size=args.block_size,
                                            **family_kw(kind))
                if cuda:
                    torch.cuda.synchronize()
                plan_ms = (time.perf_counter() - t0) * 1e3
                op = (q, k, v, plan.block_idx, plan.token_idx, plan.summary_idx, plan.summary_k, plan.summary_v,
                      plan.summary_count, plan.summary_pos, None, None, plan.slopes)
                opts = (scale, True, plan.block_size, -1 if plan.window is None else plan.window, -1, None)
                out, lse = tx.attention_forward(*op, *opts)
                # 1. correctness, before any timing (at the first N only: the reference is slow)
                if N == args.seq_lens[0]:
                    if kind == "exact":
                        want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                              enable_gqa=Hkv != H)
                    else:
                        want, _ = reference.reference_forward(*[x.float() if isinstance(x, torch.Tensor) and
                                                                x.is_floating_point() else x for x in op], *opts)
                    err = rel_err(out, want)
                    checks.append((kind, N, D, err))
                    if not err < 1e-2:
                        sys.exit(f"correctness check failed: {kind} N={N} D={D} rel err {err:.2e} >= 1e-2")
                pairs = plan_pairs(plan, N, N) * B * H
                fwd_flops = 4.0 * D * pairs
                row = dict(kind=kind, N=N, D=D, plan_ms=plan_ms, flops=fwd_flops)
                mask = flex_block_mask(plan, B, H, N, N, dev)
                flex_pairs = pairs if kind == "exact" else _mask_pairs(mask, N, plan.causal) * B
                if not cuda:   # dry run: the block mask is accepted by FlexAttention (eager) and nothing is timed
                    from torch.nn.attention.flex_attention import flex_attention
                    flex_attention(q.float(), k.float(), v.float(), block_mask=mask, scale=scale, enable_gqa=Hkv != H)
                    row["flex_flops"] = 4.0 * D * flex_pairs
                    rows.append(row)
                    continue

                def ours_fwd():
                    return tx.attention_forward(*op, *opts)

                def ours_fwd_bwd():
                    o, l = tx.attention_forward(*op, *opts)
                    return tx.attention_backward(go, None, *op, o, l, *opts, plan.summary_idx is not None,
                                                 False, False)

                row["ours"] = (do_bench(ours_fwd, return_mode="median"), do_bench(ours_fwd_bwd, return_mode="median"))
                qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
                baselines = {}
                if kind == "exact":
                    def sdpa():
                        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                            return F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale,
                                                                  enable_gqa=Hkv != H)
                    baselines["sdpa_flash"] = (sdpa, fwd_flops)
                baselines["flex"] = (lambda: flex(qg, kg, vg, block_mask=mask, scale=scale, enable_gqa=Hkv != H),
                                     4.0 * D * flex_pairs)
                for name, (fn, flops) in baselines.items():
                    def fwd_bwd(fn=fn):
                        return torch.autograd.grad(fn(), (qg, kg, vg), go)
                    with torch.no_grad():
                        t_f = do_bench(fn, return_mode="median")
                    row[name] = (t_f, do_bench(fwd_bwd, return_mode="median"), flops)
                rows.append(row)
                print(_line(row), flush=True)
    return rows, checks


def _mask_pairs(mask, N, causal) -> float:
    """(query, key) pairs a BlockMask makes Flex compute, per batch (causal per token inside the blocks)."""
    b = mask.BLOCK_SIZE[0]
    num = mask.kv_num_blocks.double()
    if not causal:
        return float(num.sum()) * b * b
    idx, tq = mask.kv_indices, mask.kv_num_blocks.shape[-1]
    t = torch.arange(tq, device=idx.device).view(1, 1, -1, 1)
    valid = torch.arange(idx.shape[-1], device=idx.device) < mask.kv_num_blocks[..., None]
    diag = ((idx == t) & valid).sum()
    return float((num.sum() - diag) * b * b + diag * b * (b + 1) / 2)


def _tflops(flops, ms):
    return flops / (ms * 1e-3) / 1e12


def _line(r) -> str:
    s = f"{r['kind']:6s} N={r['N']:6d} D={r['D']:3d} plan {r['plan_ms']:8.2f} ms"
    if "ours" in r:
        f, fb = r["ours"]
        s += f" | ours fwd {f:8.3f} ms {_tflops(r['flops'], f):6.1f} TF/s, fwd+bwd {fb:8.3f} ms"
        for name in ("sdpa_flash", "flex"):
            if name in r:
                bf, bfb, fl = r[name]
                s += f" | {name} fwd {bf:8.3f} ms ({bf / f:5.2f}x) fwd+bwd {bfb:8.3f} ms ({bfb / fb:5.2f}x)"
    return s


def report(rows, checks, command) -> str:
    import triton
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    lines = ["# Triton executor on the GPU: families vs SDPA (flash) and FlexAttention", "",
             f"GPU: {gpu}; torch {torch.__version__}, triton {triton.__version__}, Python {platform.python_version()}.",
             f"Command: `{command}`", "",
             "bf16, B = 1, causal, block size as given. Times are medians of triton.testing.do_bench (ms). TFLOP/s "
             "count 4 D flops per (query, key) pair each method computes (forward; x3.5 forward + backward). "
             "Ratios are baseline time / ours (> 1: ours faster), measured side by side in this run. Flex gets the "
             "plan's exact blocks only (it cannot express routed tokens or summaries). Plan building is not in "
             "the kernel times.", "", "Correctness (rel. error vs SDPA for exact, vs danon/kernels/reference.py in fp32 "
             "for the sparse families):", ""]
    lines += [f"- {k} N={n} D={d}: {e:.2e}" for k, n, d, e in checks]
    lines += ["", "| family | N | D | plan ms | ours fwd ms | TFLOP/s | ours fwd+bwd ms | TFLOP/s | baseline | "
              "fwd ms | TFLOP/s | fwd ratio | fwd+bwd ms | fwd+bwd ratio |", "|" + "---|" * 15]
    for r in rows:
        f, fb = r["ours"]
        for name in ("sdpa_flash", "flex"):
            if name not in r:
                continue
            bf, bfb, fl = r[name]
            lines.append(f"| {r['kind']} | {r['N']} | {r['D']} | {r['plan_ms']:.1f} | {f:.3f} | "
                         f"{_tflops(r['flops'], f):.1f} | {fb:.3f} | {_tflops(3.5 * r['flops'], fb):.1f} | {name} | "
                         f"{bf:.3f} | {_tflops(fl, bf):.1f} | {bf / f:.2f} | {bfb:.3f} | {bfb / fb:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--block-size", type=int, default=128, help="plan block size (FlexAttention's default block)")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU needed: tiny shapes through Triton's interpreter, correctness only, nothing written")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "gpu_attention.md"))
    args = p.parse_args(argv)
    if args.dry_run:
        args.seq_lens, args.head_dims, args.heads, args.kv_heads, args.block_size = [512], [32], 2, 1, 32
    elif not torch.cuda.is_available():
        sys.exit("bench/gpu_attention.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "nothing was measured. `--dry-run` checks the script on CPU through Triton's interpreter.")
    rows, checks = run(args)
    for k, n, d, e in checks:
        print(f"correct: {k} N={n} D={d} rel err {e:.2e}")
    if args.dry_run:
        for r in rows:
            print(f"{r['kind']}: N={r['N']} D={r['D']} forward GFLOP ours {r['flops'] / 1e9:.4f}, flex "
                  f"{r['flex_flops'] / 1e9:.4f}, plan {r['plan_ms']:.1f} ms")
        print("dry run: nothing timed, nothing written")
        return
    text = report(rows, checks, "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])))
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
