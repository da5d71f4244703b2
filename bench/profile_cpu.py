"""Where one attention call's time goes on CPU: every aten op inside the plan builder and the executor, by line.

A TorchDispatchMode entered inside danon's executor and plan builder (the custom ops hide their insides
from a mode entered outside them) times each aten op and charges it to the innermost danon source line
that called it; the flash kernel's calls are also grouped by key-set width, with their GFLOP/s (causal
calls counted at half). What docs/executors.md's "Where the time goes" was measured with.

    python bench/profile_cpu.py --kind msra --seq-len 16384            # forward
    python bench/profile_cpu.py --kind dala --seq-len 16384 --backward # forward + backward
    python bench/profile_cpu.py --kind ucsa --kernel-phases --backward # inside danon's C++ kernel, by phase

Without --kernel-phases, danon's C++ kernel (danon/kernels/csrc) is one op to the timer; --kernel-phases
loads its profiling build (timers per phase, summed over the threads) and splits each call's time into
gathering the listed keys, gemm, the softmax (and dS), and the scatter of the listed keys' gradients.
"""
from __future__ import annotations

import argparse
import collections
import time
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_FLASH = "_scaled_dot_product_flash_attention_for_cpu"


class OpTimer(TorchDispatchMode):
    """Seconds and calls per (aten op, danon file:line); flash calls per (keys, causal, masked)."""

    def __init__(self, by_line: dict, flash: dict):
        super().__init__()
        self.by_line, self.flash = by_line, flash

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        spent = time.perf_counter() - start
        frames = [f for f in traceback.extract_stack(limit=16) if "/danon/" in f.filename]
        where = f"{frames[-1].filename.split('/danon/')[-1]}:{frames[-1].lineno}" if frames else "?"
        entry = self.by_line[(func.overloadpacket.__name__, where)]
        entry[0] += spent
        entry[1] += 1
        if func.overloadpacket.__name__ == _FLASH:
            q, k = args[0], args[1]
            kwargs = kwargs or {}   # arguments equal to their defaults reach the mode left out
            causal = bool(args[4]) if len(args) > 4 else bool(kwargs.get("is_causal", False))
            masked = kwargs.get("attn_mask") is not None
            flops = 4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3] * (0.5 if causal else 1)
            f = self.flash[(k.shape[2], causal, masked)]
            f[0] += spent
            f[1] += 1
            f[2] += flops
        return out


def profile(kind: str, n: int, backward: bool, heads: int = 8, head_dim: int = 64):
    """Run one call (after a warm-up) with the timer inside the executor and the plan builder."""
    import danon
    import danon.core.attention_op as attention_op
    import danon.core.plan_op as plan_op

    by_line = collections.defaultdict(lambda: [0.0, 0])
    flash = collections.defaultdict(lambda: [0.0, 0, 0.0])
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, head_dim, requires_grad=backward) for _ in range(3))

    def call():
        out = danon.attention(q, k, v, kind=kind, causal=True)
        if backward:
            out.backward(torch.ones_like(out))

    call()   # warm-up, untimed
    executor_for, run_builder = attention_op.executor_for, plan_op._run_builder

    class Timed:
        def __init__(self, executor):
            self.executor = executor

        def forward(self, *a):
            with OpTimer(by_line, flash):
                return self.executor.forward(*a)

        def backward(self, *a):
            with OpTimer(by_line, flash):
                return self.executor.backward(*a)

    def timed_builder(*a, **kw):
        with OpTimer(by_line, flash):
            return run_builder(*a, **kw)

    # the modules look these names up at call time: patched for this one call, restored after it
    attention_op.executor_for, plan_op._run_builder = (lambda a: Timed(executor_for(a))), timed_builder
    try:
        start = time.perf_counter()
        call()
        total = time.perf_counter() - start
    finally:
        attention_op.executor_for, plan_op._run_builder = executor_for, run_builder
    return total, by_line, flash


PHASES = ("gather", "gemm", "softmax", "scatter")


def kernel_phases(kind: str, n: int, backward: bool, heads: int = 8, head_dim: int = 64) -> list:
    """[(pass, wall seconds, {phase: seconds summed over threads})] of one call after a warm-up."""
    import danon
    from danon.kernels import native_cpu

    ops = native_cpu.load(profile=True)
    if ops is None:
        raise SystemExit("danon's CPU kernel could not be built here")
    real_load = native_cpu.load
    native_cpu.load = lambda profile=False: ops   # fused_cpu looks the loader up at call time
    try:
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, heads, n, head_dim, requires_grad=backward) for _ in range(3))
        out = danon.attention(q, k, v, kind=kind, causal=True)   # warm-up
        if backward:
            out.backward(torch.ones_like(out))
        ops.phase_seconds()
        rows = []
        start = time.perf_counter()
        out = danon.attention(q, k, v, kind=kind, causal=True)
        rows.append(("forward", time.perf_counter() - start, dict(zip(PHASES, ops.phase_seconds()))))
        if backward:
            grad_out = torch.ones_like(out)
            start = time.perf_counter()
            out.backward(grad_out)
            rows.append(("backward", time.perf_counter() - start, dict(zip(PHASES, ops.phase_seconds()))))
        return rows
    finally:
        native_cpu.load = real_load


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="msra", choices=["msra", "dala", "ucsa"])
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--kernel-phases", action="store_true",
                        help="split danon's C++ kernel's time by phase (its profiling build)")
    args = parser.parse_args(argv)
    if args.kernel_phases:
        threads = torch.get_num_threads()
        print(f"{args.kind}, N = {args.seq_len} (B 1, H 8, D 64, fp32, causal), {threads} threads; "
              "phases in ms summed over the threads")
        for name, wall, phases in kernel_phases(args.kind, args.seq_len, args.backward):
            inside = sum(phases.values())
            print(f"{name}: {wall * 1e3:.0f} ms wall ({wall * threads * 1e3:.0f} thread-ms); kernel "
                  + ", ".join(f"{p} {t * 1e3:.0f}" for p, t in phases.items())
                  + f"; the rest (plan, layout copies, threads idle outside the kernel) "
                  f"{(wall * threads - inside) * 1e3:.0f} thread-ms")
        return
    total, by_line, flash = profile(args.kind, args.seq_len, args.backward)
    print(f"{args.kind}, N = {args.seq_len}, {'forward + backward' if args.backward else 'forward'}: "
          f"{total * 1e3:.0f} ms with the timer on (B 1, H 8, D 64, fp32, causal)")
    print("\n    ms  calls  op  (danon file:line)")
    for (op, where), (spent, calls) in sorted(by_line.items(), key=lambda x: -x[1][0])[:args.top]:
        print(f"{spent * 1e3:6.1f} {calls:6d}  {op}  ({where})")
    print("\nflash kernel calls by key set:   keys  causal  masked    ms  calls  GFLOP/s")
    for (keys, causal, masked), (spent, calls, flops) in sorted(flash.items(), key=lambda x: -x[1][0])[:args.top]:
        print(f"{'':33}{keys:5d}  {causal!s:6}  {masked!s:6} {spent * 1e3:6.1f} {calls:5d} {flops / spent / 1e9:8.0f}")


if __name__ == "__main__":
    main()
