"""One training run: a family on a task at one sequence length, from one seed.

Causal LM training with the loss only on the answer positions (cross-entropy, ``IGNORE``
elsewhere); AdamW with linear warm-up and cosine decay; the batch holds a fixed number of tokens
(``tokens_per_step``), so N = 2048 runs see fewer, longer sequences per step than N = 512 runs.

Curriculum: the first ``short_steps`` steps train on the same task at ``short_len`` tokens
(default 128), the remaining ``steps`` at N. On CPU the budget is a few hundred steps; short
sequences give 4-16x more answers per unit of compute, which is what lets a 2-layer model form
the induction circuit in that budget. Every family gets the same curriculum, and the sparse
families run their own plans in both phases (at 128 tokens a 64-token window is already only
part of the context).
The curriculum does not depend on N, so runs that differ only in N share it (``train_runs``):
it is trained once, and each N continues from its own copy of the model and optimizer. That
is the same budget per run as training each from scratch, at a fraction of the compute.
The curriculum's data depend only on (task, seed), the data at N only on (task, N, seed) and
the evaluation data only on (task, N), so every family sees the same batches.

Example:
    >>> from bench.quality.train import RunSpec, train_run
    >>> r = train_run(RunSpec(task="copy", family="dense", seq_len=64, seed=0, steps=3, tokens_per_step=256,
    ...                       eval_tokens=256, short_steps=2, short_len=32))
    >>> len(r["losses"]), 0.0 <= r["accuracy"] <= 1.0
    (5, True)
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from bench.quality.models import build_model, parameter_counts
from bench.quality.tasks import IGNORE, make_batch

_TASK_IDS = {"mqar": 1, "needle": 2, "copy": 3}


@dataclasses.dataclass
class RunSpec:
    """What one run trains: task, family, N, seed, and the budget (the same for every family)."""

    task: str
    family: str
    seq_len: int
    seed: int
    steps: int = 120
    short_steps: int = 300
    short_len: int = 128
    tokens_per_step: int = 4096
    lr: float = 1e-2
    warmup: int = 30
    eval_tokens: int = 65536

    @property
    def batch(self) -> int:
        return max(1, self.tokens_per_step // self.seq_len)

    @property
    def total_steps(self) -> int:
        return self.short_steps + self.steps

    def length_at(self, step: int) -> int:
        return self.short_len if step < self.short_steps else self.seq_len


def _lr_at(step: int, spec: RunSpec) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.total_steps - spec.warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: str, seq_len: int, eval_tokens: int, batch: int) -> Dict[str, float]:
    """Accuracy (argmax = target) over the answer positions of fresh sequences, the same for every
    family and seed (generator seeded by the task and N only).

    Example:
        >>> from bench.quality.models import build_model
        >>> r = evaluate(build_model("dense", seed=0), "needle", 64, 128, 2)
        >>> sorted(r)
        ['accuracy', 'answers', 'loss']
    """
    model.eval()
    g = torch.Generator().manual_seed(10_000 + 100 * _TASK_IDS[task] + seq_len)
    sequences = max(1, eval_tokens // seq_len)
    correct = total = 0
    loss_sum = 0.0
    done = 0
    while done < sequences:
        b = min(batch, sequences - done)
        x, y = make_batch(task, b, seq_len, g)
        logits = model(x)
        mask = y != IGNORE
        correct += int((logits.argmax(-1)[mask] == y[mask]).sum())
        total += int(mask.sum())
        loss_sum += float(_loss(logits, y)) * int(mask.sum())
        done += b
    model.train()
    return {"accuracy": correct / max(1, total), "answers": total, "loss": loss_sum / max(1, total)}


def _optimizer(model: torch.nn.Module, spec: RunSpec) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.lr,
                             betas=(0.9, 0.98), weight_decay=0.0)


def _train_steps(model, opt, spec: RunSpec, steps: range, g: torch.Generator, losses: List[float],
                 progress: Optional[Callable[[int, float], None]]) -> None:
    """Steps ``steps`` of the schedule (the step number picks the length and the learning rate)."""
    model.train()
    for step in steps:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, spec)
        n = spec.length_at(step)
        x, y = make_batch(spec.task, max(1, spec.tokens_per_step // n), n, g)
        loss = _loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step, losses[-1])


_SHARED = ("task", "family", "seed", "steps", "short_steps", "short_len", "tokens_per_step", "lr", "warmup")


def train_runs(specs: Sequence[RunSpec], progress: Optional[Callable[[int, float], None]] = None,
               keep_models: bool = False) -> List[Dict]:
    """Train runs that differ only in N, sharing their curriculum; one result per spec, in order.

    Each result holds the spec, the losses of all its steps (curriculum first), accuracy, and
    timings: ``curriculum_s`` (the shared phase, the same number in every result of the call),
    ``train_s`` (this run's own steps at N) and ``eval_s``. ``progress(step, loss)`` is called
    after every step, the curriculum's once. keep_models: each result also holds its trained model ("model").

    Example:
        >>> specs = [RunSpec(task="copy", family="dense", seq_len=n, seed=0, steps=2, tokens_per_step=256,
        ...                  eval_tokens=256, short_steps=3, short_len=32) for n in (64, 128)]
        >>> a, b = train_runs(specs)
        >>> a["losses"][:3] == b["losses"][:3], len(b["losses"]), a["curriculum_s"] == b["curriculum_s"]
        (True, 5, True)
    """
    if not specs:
        return []
    first = specs[0]
    for spec in specs[1:]:
        differ = [k for k in _SHARED if getattr(spec, k) != getattr(first, k)]
        if differ:
            raise ValueError(f"train_runs shares one curriculum: the specs may differ only in seq_len, "
                             f"but {', '.join(differ)} differ")
    torch.manual_seed(first.seed)
    model = build_model(first.family, seed=first.seed)
    params = parameter_counts(model)
    opt = _optimizer(model, first)
    curriculum: List[float] = []
    cpu_start, start = time.process_time(), time.perf_counter()
    g = torch.Generator().manual_seed(7_000_000 + 1_000 * first.seed + 100 * _TASK_IDS[first.task])
    _train_steps(model, opt, first, range(first.short_steps), g, curriculum, progress)
    curriculum_s, curriculum_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    results = []
    for spec in specs:
        own = copy.deepcopy(model)
        own_opt = _optimizer(own, spec)
        own_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        losses = list(curriculum)
        g = torch.Generator().manual_seed(1_000 * spec.seed + 100 * _TASK_IDS[spec.task] + spec.seq_len)
        cpu_start, start = time.process_time(), time.perf_counter()
        _train_steps(own, own_opt, spec, range(spec.short_steps, spec.total_steps), g, losses, progress)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        result = evaluate(own, spec.task, spec.seq_len, spec.eval_tokens, spec.batch)
        results.append({**dataclasses.asdict(spec), **result, "losses": losses, "params": params["total"],
                        "trainable_params": params["trainable"], "curriculum_s": curriculum_s,
                        "train_s": train_s, "eval_s": time.perf_counter() - start,
                        "cpu_s": time.process_time() - cpu_start, "curriculum_cpu_s": curriculum_cpu})
        if keep_models:
            results[-1]["model"] = own.eval()
    return results


def train_run(spec: RunSpec, progress: Optional[Callable[[int, float], None]] = None) -> Dict:
    """Train one model and evaluate it (``train_runs`` of one spec).

    Example:
        >>> r = train_run(RunSpec(task="copy", family="dense", seq_len=64, seed=0, steps=3, tokens_per_step=256,
        ...                       eval_tokens=256, short_steps=2, short_len=32))
        >>> len(r["losses"]), 0.0 <= r["accuracy"] <= 1.0
        (5, True)
    """
    return train_runs([spec], progress)[0]
