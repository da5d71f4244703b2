"""Train every (task, N, family, seed) and write bench/results/quality.md, .json and the loss PNG.

Run from the repository root (bench/ is not an installed package; this script puts the root on
sys.path). A job is one (task, family, seed): it trains the curriculum once and then each N from
it (bench/quality/train.py). Jobs go seed by seed, the slowest family first so that the two
workers finish together; finished runs are appended to the JSON file as they end, and
``--resume`` skips them.

    python bench/quality/run.py              # all: 3 tasks x N 512, 2048 x 5 families x 3 seeds, ~40 min on 2 cores
    python bench/quality/run.py --steps 200 --out bench/results/quality_full_budget.md   # 200 steps at N, ~54 min
    python bench/quality/run.py --tasks needle --families dala dala-halfdecay --out /tmp/v.md   # a variant
    python bench/quality/run.py --seq-lens 128 --steps 20 --seeds 0 --out /tmp/q.md   # smoke
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import shlex
import sys
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench._common import machine  # noqa: E402
from bench.quality.models import FAMILIES, VARIANTS, base_family, build_model, coverage, parameter_counts  # noqa: E402
from bench.quality.report import markdown, plot_losses, run_minutes  # noqa: E402
from bench.quality.tasks import TASKS  # noqa: E402
from bench.quality.train import RunSpec, train_runs  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # the bench extra brings tqdm; without it, no progress bars
    tqdm = None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Long-range synthetic tasks: sparse attention families vs dense.")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES) + list(VARIANTS),
                   help="default: the five families; the variants (bench/quality/models.py VARIANTS) test a proposal "
                        "of docs/quality.md and run only when named")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=RunSpec.steps, help="training steps per run (every family the same)")
    p.add_argument("--tokens-per-step", type=int, default=RunSpec.tokens_per_step, help="batch = this / N sequences")
    p.add_argument("--lr", type=float, default=RunSpec.lr)
    p.add_argument("--warmup", type=int, default=RunSpec.warmup)
    p.add_argument("--eval-tokens", type=int, default=RunSpec.eval_tokens)
    p.add_argument("--steps-short", type=int, default=RunSpec.short_steps, help="curriculum steps at --short-len first")
    p.add_argument("--short-len", type=int, default=RunSpec.short_len)
    p.add_argument("--jobs", type=int, default=2, help="jobs in parallel, one process each (default 2: one per core)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (default 1: these models are too small for more, and two "
                        "threads per process on a busy 2-core machine ran 10x slower)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "quality.md"))
    p.add_argument("--resume", action="store_true", help="keep the runs already in the JSON file, do the rest")
    p.add_argument("--report-only", action="store_true", help="rewrite .md and .png from the JSON file, train nothing")
    p.add_argument("--note", default="", help="a line for the results page (e.g. that other jobs shared the CPU)")
    return p


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _worker(specs: List[RunSpec]) -> List[dict]:
    return _one(specs, bars=False)


def _one(specs: List[RunSpec], bars: bool) -> List[dict]:
    """Train one job (runs sharing a curriculum); with ``bars`` a tqdm bar follows its steps (serial mode only)."""
    first = specs[0]
    total = first.short_steps + sum(s.steps for s in specs)
    lens = ", ".join(str(s.seq_len) for s in specs)
    bar = tqdm(total=total, desc=f"{first.task} N={lens} {first.family} seed {first.seed}",
               position=1, leave=False) if bars else None

    def progress(step, loss):
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss:.3f}")

    results = train_runs(specs, progress)
    if bar is not None:
        bar.close()
    return results


# the order jobs start in: slowest first (measured step times on this CPU), so that neither worker is left
# with the hybrid alone at the end
_SLOWEST_FIRST = ("hybrid", "dala", "ucsa", "msra", "dense")


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = os.path.splitext(args.out)[0]
    json_path, png_path = base + ".json", base + "_loss.png"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    runs = []
    if args.resume and os.path.exists(json_path):
        with open(json_path) as f:
            saved = json.load(f)
        if not saved["meta"].get("shared_curriculum") and not args.report_only:
            raise SystemExit(f"--resume: {json_path} was written by the harness before the shared curriculum "
                             "(each run trained its own); its runs cannot be mixed with new ones. "
                             "Give another --out, or move the file away")
        runs = saved["runs"]
    if args.report_only:
        with open(json_path) as f:
            saved = json.load(f)
        runs = saved["runs"]
        args.resume = True
    done = {(r["task"], r["seq_len"], r["family"], r["seed"]) for r in runs}
    jobs = [(t, n, fam, s) for s in args.seeds for t in args.tasks for n in args.seq_lens for fam in args.families
            if (t, n, fam, s) not in done]
    command = "python bench/quality/run.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    meta = {"machine": machine(), "command": command.strip(), "steps": args.steps, "short_steps": args.steps_short,
            "short_len": args.short_len, "jobs": args.jobs, "threads": args.threads, "tokens_per_step": args.tokens_per_step,
            "lr": args.lr, "warmup": args.warmup, "eval_tokens": args.eval_tokens, "seeds": args.seeds,
            "tasks": args.tasks, "note": args.note, "png": os.path.basename(png_path), "resumed": bool(done),
            "shared_curriculum": True}
    meta["params"] = {f: parameter_counts(build_model(f, seed=0)) for f in args.families}
    meta["coverage"] = {(f, n): coverage(f, n) for f in args.families for n in args.seq_lens}
    for f in args.families:
        p = meta["params"][f]
        print(f"{f}: {p['total']} parameters ({p['trainable']} trainable)", flush=True)
    if args.report_only:   # the runs' own setting, not this command's defaults
        jobs = []
        meta = {**meta, **{k: v for k, v in saved["meta"].items() if k not in ("note", "png")}}
    start = time.time()
    groups: Dict[tuple, List[RunSpec]] = {}
    for task, n, family, seed in jobs:
        groups.setdefault((seed, task, family), []).append(RunSpec(
            task=task, family=family, seq_len=n, seed=seed, steps=args.steps, short_steps=args.steps_short,
            short_len=args.short_len, tokens_per_step=args.tokens_per_step, lr=args.lr, warmup=args.warmup,
            eval_tokens=args.eval_tokens))
    rank = {f: i for i, f in enumerate(_SLOWEST_FIRST)}
    work = [groups[k] for k in sorted(groups, key=lambda k: (k[0], rank.get(base_family(k[2]), len(rank)), k[1]))]
    if args.jobs > 1 and len(work) > 1:
        import multiprocessing
        pool = multiprocessing.get_context("spawn").Pool(args.jobs, initializer=_init_worker, initargs=(args.threads,))
        results = pool.imap_unordered(_worker, work)
    else:
        pool, results = None, map(functools.partial(_one, bars=tqdm is not None), work)
    outer = tqdm(results, total=len(work), desc="jobs", position=0) if tqdm else results
    for group in outer:
        for result in group:
            task, n, family, seed = result["task"], result["seq_len"], result["family"], result["seed"]
            runs.append(result)
            msg = (f"{task} N={n} {family} seed {seed}: accuracy {result['accuracy']:.3f} "
                   f"({result['curriculum_s']:.0f} s curriculum, shared, + {result['train_s']:.0f} s at N)")
            (outer.write if tqdm else print)(msg)
        with open(json_path, "w") as f:
            json.dump({"meta": {k: v for k, v in meta.items() if k != "coverage"}, "runs": runs}, f)
    if pool is not None:
        pool.close()
    wall = time.time() - start
    if not args.report_only:
        meta["wall_min"] = wall / 60
    meta["run_min"] = run_minutes(runs)
    meta.setdefault("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    plot_losses(runs, png_path)
    text = markdown(runs, meta)
    with open(args.out, "w") as f:
        f.write(text)
    with open(json_path, "w") as f:
        json.dump({"meta": {k: v for k, v in meta.items() if k != "coverage"},
                   "coverage": [{"family": f, "seq_len": n, **c} for (f, n), c in meta["coverage"].items()],
                   "runs": runs}, f)
    print(text)


if __name__ == "__main__":
    main()
