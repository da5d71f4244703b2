"""Two builds of danon's CPU kernel in one process, calls interleaved: is a kernel change faster?

This VM's speed moves by 20-40 % between minutes (docs/executors.md, "The noise"), so two separate benchmark
runs cannot tell a 5 % change. Here the kernel source at a git revision (`--base`) and the working tree's are
built side by side (their own torch.library namespaces), their largest output difference reported, then
called in turns (ABAB, then BABA) on the same inputs; the report gives each build's median, lower quartile and minimum
wall time and its median CPU time, and the ratio of the medians. The plan, the layout and DALA's routing scan
are the working tree's for both: only the kernel's .cpp differs.

    python bench/kernel_ab_cpu.py --base HEAD~1 --kind ucsa               # forward at N = 16k
    python bench/kernel_ab_cpu.py --base HEAD~1 --kind msra --mode train --calls 8
    python bench/kernel_ab_cpu.py --base HEAD~1 --kind dala --out bench/results/kernel_ab_cpu.md
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import results_header, write_results  # noqa: E402

KERNEL = "danon/kernels/csrc/sparse_attention_cpu.cpp"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _source(revision):
    """The kernel's source at git `revision` (None: the working tree's file)."""
    if revision is None:
        with open(os.path.join(REPO, KERNEL)) as f:
            return f.read()
    return subprocess.run(["git", "-C", REPO, "show", f"{revision}:{KERNEL}"], capture_output=True, text=True,
                          check=True).stdout


def renamed_source(text, namespace):
    """The kernel source with its torch.library namespace renamed, so that two builds load in one process.

    Example:
        >>> text = renamed_source(_source(None), "danon_cpu_ab_tree")
        >>> "#define DANON_LIBRARY danon_cpu_ab_tree" in text and "danon_library.h" not in text
        True
    """
    # sources name their library through danon_library.h; before fef6b1a they defined DANON_LIBRARY themselves
    renamed = text.replace('#include "danon_library.h"', f"#define DANON_LIBRARY {namespace}")
    renamed = renamed.replace("#define DANON_LIBRARY danon_cpu\n", f"#define DANON_LIBRARY {namespace}\n")
    if renamed == text:
        raise ValueError("the kernel source names no library this script knows how to rename "
                         "(expected #include \"danon_library.h\" or #define DANON_LIBRARY danon_cpu)")
    return renamed


def _read(path):
    """A file's text, or None when there is none."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read()


def _build(label, text, build_dir):
    """Compile `text` as library danon_cpu_ab_<label> (as native_cpu.load compiles the kernel); returns its
    torch.ops namespace."""
    import torch

    from danon.kernels import native_cpu

    namespace = f"danon_cpu_ab_{label}"
    path, text = os.path.join(build_dir, f"{namespace}.cpp"), renamed_source(text, namespace)
    if _read(path) != text:   # rewritten only when it changed: a new mtime makes ninja compile it again (~40 s)
        with open(path, "w") as f:
            f.write(text)
    native_cpu.compile_sources(namespace, [path])
    return getattr(torch.ops, namespace)


class _Switch:
    """Stands in for native_cpu inside fused_cpu: load() returns the build currently selected."""

    def __init__(self, builds):
        self.builds, self.current = builds, None

    def load(self, profile=False):
        return self.builds[self.current]

    def available(self):
        return True


def measure(base, kind, mode, n, calls, build_dir):
    """Interleaved timings of the two builds: {label: {"wall_ms": [...], "cpu_ms": [...]}}, max |out| difference."""
    from danon.kernels import fused_cpu, native_cpu

    native_cpu.load()   # the working tree's extension: DALA's routing scan lives in it
    builds = {"base": _build("base", _source(base), build_dir), "tree": _build("tree", _source(None), build_dir)}
    switch = _Switch(builds)
    fused_cpu.native_cpu = switch
    try:
        return _interleaved(switch, builds, kind, mode, n, calls)
    finally:   # the process's later calls (a test run, say) go through the working tree's build again
        fused_cpu.native_cpu = native_cpu


def _interleaved(switch, builds, kind, mode, n, calls):
    import torch

    import danon

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, n, 64, requires_grad=mode == "train") for _ in range(3))

    def call():
        if mode == "fwd":
            with torch.no_grad():
                return danon.attention(q, k, v, kind=kind, causal=True)
        out = danon.attention(q, k, v, kind=kind, causal=True)
        out.sum().backward()
        return out.detach()

    outs = {}
    for label in builds:
        switch.current = label
        outs[label] = call()   # also the warm-up: JIT kernels, pages
    diff = (outs["tree"] - outs["base"]).abs().max().item()
    times = {label: {"wall_ms": [], "cpu_ms": []} for label in builds}
    for i in range(calls):
        for label in (["base", "tree"] if i % 2 == 0 else ["tree", "base"]):
            switch.current = label
            c0, t0 = time.process_time(), time.perf_counter()
            call()
            times[label]["wall_ms"].append((time.perf_counter() - t0) * 1e3)
            times[label]["cpu_ms"].append((time.process_time() - c0) * 1e3)
    return times, diff


def report(times, diff, args, command):
    lines = results_header("danon's CPU kernel: two builds, calls interleaved", command)
    lines += [f"- setting: {args.kind}, {args.mode}, causal, B 1, H 8, D 64, N = {args.seq_len}, fp32, default family "
              f"settings; {args.calls} calls each, interleaved (ABAB, BABA)",
              f"- base: the kernel source at `{args.base}`; tree: the working tree's; max |out difference| {diff:.2e}",
              "", "| build | median ms | lower quartile | min | CPU ms (median) |", "|---|---:|---:|---:|---:|"]
    medians = {}
    for label, t in times.items():
        wall = sorted(t["wall_ms"])
        medians[label] = statistics.median(wall)
        lines.append(f"| {label} | {medians[label]:.1f} | {wall[len(wall) // 4]:.1f} | {wall[0]:.1f} | "
                     f"{statistics.median(t['cpu_ms']):.1f} |")
    lines += ["", f"tree / base (medians): {medians['tree'] / medians['base']:.3f}"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="git revision whose kernel source is the baseline")
    parser.add_argument("--kind", choices=["msra", "dala", "ucsa"], default="ucsa")
    parser.add_argument("--mode", choices=["fwd", "train"], default="fwd")
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--calls", type=int, default=12)
    parser.add_argument("--build-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "danon_kernel_ab"))
    parser.add_argument("--out", help="also write the report here (.md, and .json next to it)")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error(f"--calls must be at least 1, got {args.calls}")
    os.makedirs(args.build_dir, exist_ok=True)
    times, diff = measure(args.base, args.kind, args.mode, args.seq_len, args.calls, args.build_dir)
    command = "python bench/kernel_ab_cpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = report(times, diff, args, command.strip())
    if args.out:
        write_results(args.out, text, {"command": command, "times": times, "max_out_difference": diff})
    else:
        print(text)


if __name__ == "__main__":
    main()
