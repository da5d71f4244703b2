"""What the benchmarks share: peak-memory probes, the machine's description, one subprocess per cell."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

from danon.benchmark import machine_info, status_kib  # noqa: F401  (status_kib: re-exported for the bench scripts)


def reset_peak() -> None:
    """Reset VmHWM to the current resident size (Linux: write 5 to /proc/self/clear_refs), after giving back the
    freed outputs danon's CPU kernel keeps for its next calls: a peak then counts what the measured call needs."""
    from danon.kernels import native_cpu

    native_cpu.release_recycled()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# process settings that change how fast fresh buffers are (glibc's malloc, a preloaded allocator): a run under them
# is not comparable to one without, so the results file names them
ALLOCATOR_ENV = ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "LD_PRELOAD",
                 "THP_MEM_ALLOC_ENABLE", "DANON_CPU_KEEP_MIB")


def machine() -> str:
    import torch
    cpu = machine_info()["cpu"]
    allocator = [f"{name}={os.environ[name]}" for name in ALLOCATOR_ENV if os.environ.get(name)]
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}, allocator: {' '.join(allocator) or 'default (glibc malloc)'}")


def results_header(title: str, command: str) -> list:
    """A results file's first lines: its title, the date (UTC), the machine and the command that wrote it."""
    from datetime import datetime, timezone
    return [f"# {title}", "", f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- machine: {machine()}", f"- command: `{command}`"]


def run_cell(script: str, args: list, env: dict = None) -> dict:
    """Run `script --worker ARGS` in a fresh interpreter (`env`: variables to set in it); its last stdout
    line is the cell's JSON."""
    done = subprocess.run([sys.executable, os.path.abspath(script), "--worker", *map(str, args)],
                          capture_output=True, text=True, env=None if env is None else {**os.environ, **env})
    if done.returncode != 0:
        raise RuntimeError(f"benchmark cell {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_main(script: str, doc: str, columns: tuple, default_seq_lens: list, worker, report, argv=None) -> None:
    """The command line both benchmarks share: run every (column, N) cell in a subprocess, write .md and .json.

    `worker(name, n, repeats) -> dict` measures one cell; `report(cells, seq_lens, command) -> str` formats them.
    """
    import argparse
    name = os.path.splitext(os.path.basename(script))[0]
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=default_seq_lens)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(script)), "results", name + ".md"))
    parser.add_argument("--worker", nargs=2, metavar=("NAME", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.repeats)))
        return
    try:
        from tqdm import tqdm
    except ImportError:   # progress bar only with the bench extra
        def tqdm(x, **_):
            return x
    jobs = [(c, n) for n in args.seq_lens for c in columns]
    cells = [run_cell(script, [c, n, "--repeats", args.repeats]) for c, n in tqdm(jobs, desc=name)]
    command = (f"python bench/{name}.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    write_results(args.out, report(cells, args.seq_lens, command), {"command": command, "cells": cells})


def write_results(out: str, text: str, data: dict) -> None:
    """Write a benchmark's report to `out` (.md) and its numbers, with the machine, next to it (.json); print it."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump({"machine": machine(), **data}, f, indent=1)
    print(text)
