"""Turn finished runs into bench/results/quality.md and the loss-curve PNG.

Example:
    >>> from bench.quality.report import summarise
    >>> rows = summarise([{"task": "copy", "seq_len": 64, "family": "dense", "seed": s, "accuracy": a}
    ...                   for s, a in enumerate([0.5, 0.7, 0.9])])
    >>> rows[0]["mean"], rows[0]["n"]
    (0.7, 3)
"""
from __future__ import annotations

import statistics
from typing import Dict, List, Sequence

from bench.quality.models import VARIANTS, family_rank, ordered_families, settings_of

TASK_ORDER = ("mqar", "needle", "copy")
TASK_TITLES = {"mqar": "MQAR (4 key-value pairs in the first 8 tokens, each key asked once in the 2nd half)",
               "needle": "needle (1 pair at depth < 3N/4, asked at the end)",
               "copy": "local copy control (8-token spans, each repeated once)"}


def _order(cell: Dict) -> tuple:
    t = TASK_ORDER.index(cell["task"]) if cell["task"] in TASK_ORDER else 99
    return (t, cell["seq_len"], family_rank(cell["family"]))


def summarise(runs: Sequence[Dict]) -> List[Dict]:
    """Mean, sample standard deviation, min and max of the accuracy per (task, N, family)."""
    groups: Dict[tuple, List[float]] = {}
    for r in runs:
        groups.setdefault((r["task"], r["seq_len"], r["family"]), []).append(r["accuracy"])
    rows = []
    for (task, n, family), accs in groups.items():
        rows.append({"task": task, "seq_len": n, "family": family, "n": len(accs), "mean": round(statistics.fmean(accs), 6),
                     "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "min": min(accs), "max": max(accs)})
    return sorted(rows, key=_order)


def plot_losses(runs: Sequence[Dict], path: str, smooth: int = 10) -> None:
    """Training loss (answer positions) per step: one panel per (task, N), one line per family
    (mean over seeds, moving average of ``smooth`` steps), shaded between the seeds' min and max."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = sorted({(r["task"], r["seq_len"]) for r in runs}, key=lambda p: (_order({"task": p[0], "seq_len": p[1], "family": ""})))
    tasks = [t for t in TASK_ORDER if any(p[0] == t for p in panels)] + sorted({p[0] for p in panels} - set(TASK_ORDER))
    lens = sorted({p[1] for p in panels})
    fig, axes = plt.subplots(len(tasks), len(lens), figsize=(5 * len(lens), 3.2 * len(tasks)), squeeze=False)
    kernel = np.ones(smooth) / smooth
    for i, task in enumerate(tasks):
        for j, n in enumerate(lens):
            ax = axes[i][j]
            for family in ordered_families({r["family"] for r in runs}):
                curves = [r["losses"] for r in runs if r["task"] == task and r["seq_len"] == n and r["family"] == family]
                if not curves:
                    continue
                steps = min(len(c) for c in curves)
                arr = np.array([c[:steps] for c in curves])
                if steps >= smooth:
                    arr = np.array([np.convolve(c, kernel, mode="valid") for c in arr])
                x = np.arange(arr.shape[1]) + (smooth - 1 if steps >= smooth else 0)
                line, = ax.plot(x, arr.mean(0), label=f"{family} ({len(curves)} seeds)", lw=1.2)
                ax.fill_between(x, arr.min(0), arr.max(0), color=line.get_color(), alpha=0.15)
            switch = {r.get("short_steps", 0) for r in runs if r["task"] == task and r["seq_len"] == n}
            for step in switch - {0}:   # the curriculum's switch from short sequences to N
                ax.axvline(step, color="grey", ls=":", lw=1)
            ax.set_title(f"{task}, N = {n}" + (" (dotted: switch from the short curriculum to N)" if switch - {0} else ""),
                         fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel("loss on answers")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt_settings(families: Sequence[str]) -> List[str]:
    lines = []
    for family in families:
        s = settings_of(family)
        what = f" ({VARIANTS[family]['what']})" if family in VARIANTS else ""
        lines.append(f"- {family}{what}: " + (", ".join(f"{k}={v!r}" for k, v in s.items()) if s else "exact attention (SDPA)"))
    return lines


def run_minutes(runs: Sequence[Dict]) -> float:
    """Minutes of training and evaluation in ``runs``, each shared curriculum counted once.

    Example:
        >>> run_minutes([{"task": "copy", "family": "dense", "seed": 0, "curriculum_s": 60, "train_s": 30, "eval_s": 0},
        ...              {"task": "copy", "family": "dense", "seed": 0, "curriculum_s": 60, "train_s": 90, "eval_s": 0}])
        3.0
    """
    curricula = {(r["task"], r["family"], r["seed"]): r.get("curriculum_s", 0.0) for r in runs}
    return (sum(curricula.values()) + sum(r["train_s"] + r["eval_s"] for r in runs)) / 60


def _cpu_minutes(runs: Sequence[Dict]) -> float:
    curricula = {(r["task"], r["family"], r["seed"]): r.get("curriculum_cpu_s", 0.0) for r in runs}
    return (sum(curricula.values()) + sum(r["cpu_s"] for r in runs)) / 60


def markdown(runs: Sequence[Dict], meta: Dict) -> str:
    """The results page: setting, parameters, coverage, accuracy table, loss curves, timing."""
    rows = summarise(runs)
    families = ordered_families({r["family"] for r in runs} | set(meta["params"]))
    out = ["# Do the sparse families learn? Long-range synthetic tasks vs dense attention", ""]
    out += [f"- date: {meta['date']}", f"- machine: {meta['machine']}", f"- command: `{meta['command']}`",
            (f"- wall time: {meta['wall_min']:.1f} min for {len(runs)} runs" if "wall_min" in meta else
             f"- wall time: not recorded (the run was stopped before its end; {len(runs)} runs in the file)")
            + (" (resumed; the sum of the runs' own times is " + f"{meta['run_min']:.1f} min)" if meta.get("resumed") else "")
            + (f"; CPU time of the runs: {_cpu_minutes(runs):.1f} min"
               if all("cpu_s" in r for r in runs) else ""),
            *([f"- {meta['note']}"] if meta.get("note") else []), ""]
    out += ["## Setting", "",
            f"- budget per run (same for every family): {meta['short_steps']} steps at N = {meta['short_len']} "
            f"(curriculum{', shared by the runs of both lengths' if meta.get('shared_curriculum') else ''}), "
            f"then {meta['steps']} steps at N, each of {meta['tokens_per_step']} tokens "
            f"(batch = tokens / length), AdamW lr {meta['lr']} (warm-up {meta['warmup']} steps, cosine to 10 %), grad clip 1.0; "
            f"loss only on the answer positions; accuracy = argmax on the answer positions of "
            f"{meta['eval_tokens']} fresh evaluation tokens per (task, N), the same sequences for every family and seed",
            f"- {meta['jobs']} {'jobs (one per task, family and seed)' if meta.get('shared_curriculum') else 'runs'} "
            f"in parallel, {meta['threads']} torch thread(s) each",
            f"- seeds: {meta['seeds']} (the seed fixes the initialisation and the training batches; families share both)",
            "- models: 2 layers, hidden 64, 4 heads (head dim 16), MLP 256, vocabulary 96, causal, "
            "sinusoidal positions; untied LM head, weights N(0, 0.125) (initializer_range = 1/sqrt(hidden)), "
            "token embeddings re-drawn N(0, 1) to match the unit-amplitude position encoding (with the "
            "factories' 0.02 a 64-wide model sat on a plateau for the whole budget)",
            "- tasks: " + "; ".join(f"{t}: {TASK_TITLES[t]}" for t in TASK_ORDER if t in meta["tasks"]),
            "- family settings (block 16 tokens, so that every window is a few blocks and the plans are sparse "
            "at both lengths):"]
    out += ["  " + line for line in _fmt_settings(families)]
    out += ["", "Parameters (DALA's router, 2 x 1108 weights, is frozen in danon: top-k routing sends it no gradient):", "",
            "| family | parameters | trainable | vs dense |", "|---|---:|---:|---:|"]
    dense = meta["params"].get("dense", {}).get("total")
    for family in families:
        if family in meta["params"]:
            p = meta["params"][family]
            vs = f"{100 * (p['total'] / dense - 1):+.1f} %" if dense else "-"
            out.append(f"| {family} | {p['total']} | {p['trainable']} | {vs} |")
    out += ["", "Coverage of the first layer's plan (danon.plan_coverage, causal; share of the visible keys seen "
            "exactly / through summaries / not at all) and keys per query (list capacity):", "",
            "| family | N | exact | summary | skipped | keys per query |", "|---|---:|---:|---:|---:|---:|"]
    for (family, n), cov in sorted(meta["coverage"].items(), key=lambda kv: (families.index(kv[0][0]), kv[0][1])):
        parts = [p for p in ("msra", "dala", "ucsa") if f"{p}_exact" in cov] or [""]
        for part in parts:
            pre = f"{part}_" if part else ""
            name = f"{family} ({part})" if part else family
            out.append(f"| {name} | {n} | {cov[pre + 'exact']:.3f} | {cov[pre + 'summary']:.3f} | "
                       f"{cov[pre + 'skipped']:.3f} | {cov[pre + 'keys_per_query']:.0f} |")
    out += ["", "## Accuracy on the answer positions", "",
            "mean ± sample standard deviation over the seeds [min - max]; chance is 1/32 for MQAR and needle "
            "(32 values), 1/64 for copy", "",
            "| task | N | " + " | ".join(families) + " |", "|---|---:|" + "---:|" * len(families)]
    by_key = {(r["task"], r["seq_len"], r["family"]): r for r in rows}
    for task, n in sorted({(r["task"], r["seq_len"]) for r in rows}, key=lambda p: (TASK_ORDER.index(p[0]), p[1])):
        cells = []
        for family in families:
            r = by_key.get((task, n, family))
            if r is None:
                cells.append("-")
            elif r["n"] == 1:   # one seed: no spread to show
                cells.append(f"{r['mean']:.3f} (1 seed)")
            else:
                cells.append(f"{r['mean']:.3f} ± {r['std']:.3f} [{r['min']:.2f}-{r['max']:.2f}]"
                             + ("" if r["n"] == len(meta["seeds"]) else f" ({r['n']} seeds)"))
        out.append(f"| {task} | {n} | " + " | ".join(cells) + " |")
    out += ["", f"![training loss curves]({meta['png']})", "",
            f"Training time per run at N (s, mean over seeds; {meta['jobs']} jobs at a time, so a run shared the "
            "CPU with another; without the shared curriculum, which the next table holds):", "",
            "| task | N | " + " | ".join(families) + " |", "|---|---:|" + "---:|" * len(families)]
    for task, n in sorted({(r["task"], r["seq_len"]) for r in runs}, key=lambda p: (TASK_ORDER.index(p[0]), p[1])):
        cells = []
        for family in families:
            ts = [r["train_s"] for r in runs if (r["task"], r["seq_len"], r["family"]) == (task, n, family)]
            cells.append(f"{statistics.fmean(ts):.0f}" if ts else "-")
        out.append(f"| {task} | {n} | " + " | ".join(cells) + " |")
    if any("curriculum_s" in r for r in runs):
        out += ["", f"Curriculum time per job (s, mean over seeds; {meta['short_steps']} steps at N = "
                f"{meta['short_len']}, trained once and shared by the runs at every N):", "",
                "| task | " + " | ".join(families) + " |", "|---|" + "---:|" * len(families)]
        for task in [t for t in TASK_ORDER if any(r["task"] == t for r in runs)]:
            cells = []
            for family in families:
                ts = {r["seed"]: r["curriculum_s"] for r in runs
                      if (r["task"], r["family"]) == (task, family) and "curriculum_s" in r}
                cells.append(f"{statistics.fmean(ts.values()):.0f}" if ts else "-")
            out.append(f"| {task} | " + " | ".join(cells) + " |")
    out += ["", "Analysis and proposals: docs/quality.md.", ""]
    return "\n".join(out)
