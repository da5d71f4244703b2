"""Small experiments behind docs/quality.md: how much attention a query can put on one far key.

A "planted match": random keys, and one query row i = N - 2 whose logit with one key j (at a
random depth below 3N/4, as in the needle task) exceeds the typical logit by ``delta``. The
values are an indicator of j (v[j, 0] = 1, all else 0), so output channel 0 of row i is the
attention weight that reaches token j, exactly or through a summary (a summary holding j carries
1/n_s of it). Two regimes for the other keys:

- ``random``: k ~ N(0, 1), q ~ N(0, 1) (logits of std 1 at scale 1/sqrt(D)); the worst case;
- ``orthogonal``: every other key is orthogonal to q_i (a trained model can push filler keys out
  of the query's direction), so the only thing that hides j is averaging and selection.

Families as in the benchmark (block 16, window 64), plus two variants that are proposals:
UCSA selecting blocks by the *largest* query-row score in the query block instead of the mean
query (``ucsa-max``), and DALA without ALiBi decay (``dala-nodecay``), and DALA with its routing
given the planted key (``dala-oracle``: what a router that learned importance would reach),
with and without ALiBi (``dala-oracle-nodecay``).

    python bench/quality/probe.py              # prints a markdown table (about a minute on 2 cores)

Example:
    >>> r = planted_weight("dense", 256, delta=8.0, regime="orthogonal", trials=2)
    >>> 0.0 < r["weight"] <= 1.0 and r["reached"] == 1.0
    True
"""
from __future__ import annotations

import os
import sys
from typing import Dict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import danon  # noqa: E402
from danon.core.blocks import compact  # noqa: E402
from danon.core.attention_op import run_plan  # noqa: E402

D = 16
B16 = dict(block_size=16)
SETTINGS = {
    "msra": dict(kind="msra", window=64, num_levels="auto", compression_factor=4, **B16),
    "ucsa": dict(kind="ucsa", local_window_size=64, global_tokens=0, top_k_blocks=4, **B16),
    "dala": dict(kind="dala", window=64, memory_size=32, decay="alibi", **B16),
}


def _inputs(n: int, delta: float, regime: str, g: torch.Generator, heads: int = 1):
    q = torch.randn(1, heads, n, D, generator=g)
    k = torch.randn(1, 1, n, D, generator=g)
    i = n - 2
    j = int(torch.randint(0, 3 * n // 4 - 2, (1,), generator=g))
    u = k[0, 0, j] / k[0, 0, j].norm()
    if regime == "orthogonal":
        k = k - (k @ u)[..., None] * u          # every key orthogonal to u ...
        k[0, 0, j] = u * 4.0                     # ... but j, along u
    # q_i along u with logit(i, j) = delta above the typical (mean) logit, at scale 1/sqrt(D)
    q[0, :, i] = u * (delta * D ** 0.5 / float(k[0, 0, j] @ u))
    v = torch.zeros(1, 1, n, D)
    v[0, 0, j, 0] = 1.0
    return q, k, v, i, j


def _ucsa_max_plan(q, k, plan, top_k: int):
    """UCSA's plan with blocks chosen by max over the query block's rows of q_i . kbar_t (proposal)."""
    b = plan.block_size
    n = q.shape[2]
    tq = n // b
    kbar = plan.summary_k                                           # [1, 1, Tk, D] block means
    rows = (q.sum(1, keepdim=True) @ kbar.transpose(-1, -2))        # [1, 1, N, Tk] summed over the group
    score = rows.view(1, 1, tq, b, -1).amax(3)                      # [1, 1, Tq, Tk]
    t = torch.arange(tq)
    eligible = (t[None, :] < t[:, None] - plan.window)              # causal, outside the window
    score = score.masked_fill(~eligible, float("-inf"))
    val, idx = torch.topk(score, top_k, -1)
    chosen = torch.zeros_like(score, dtype=torch.bool).scatter(-1, idx, val > float("-inf"))
    plan.block_idx = compact(chosen, top_k)
    plan.summary_idx = compact(eligible & ~chosen, tq)
    return plan


def planted_weight(family: str, n: int, *, delta: float, regime: str, trials: int = 20, seed: int = 0
                   ) -> Dict[str, float]:
    """Mean attention weight on the planted key j from row i (and the share of trials where j is
    attended exactly: ``reached``), over ``trials`` random draws.

    For ``dala`` and ``dala-nodecay`` with the default importance (||k||) and 4 query heads with
    ALiBi's slopes, the weight is the mean over heads; ``per_head`` lists them.
    """
    g = torch.Generator().manual_seed(seed)
    weights, reached, per_head = [], [], []
    for _ in range(trials):
        heads = 4 if family.startswith("dala") else 1
        q, k, v, i, j = _inputs(n, delta, regime, g, heads)
        scale = D ** -0.5
        if family == "dense":
            out = danon.exact_attention(q, k, v, causal=True)
            hit = True
        elif family in ("msra", "ucsa"):
            plan = danon.attention_plan(q, k, v, causal=True, **SETTINGS[family])
            out = run_plan(q, k, v, plan, scale=scale)
            hit = _exact_hit(plan, i, j)
        elif family == "ucsa-max":
            kw = dict(SETTINGS["ucsa"])
            kw.pop("kind")
            plan = _ucsa_max_plan(q, k, danon.attention_plan(q, k, v, kind="ucsa", causal=True, **kw), 4)
            out = run_plan(q, k, v, plan, scale=scale)
            hit = _exact_hit(plan, i, j)
        else:
            kw = {key: val for key, val in SETTINGS["dala"].items() if key != "kind"}
            if "nodecay" in family:
                kw["decay"] = "none"
            if "oracle" in family:
                imp = torch.zeros(1, 1, n)
                imp[0, 0, j] = 1.0
                kw["importance"] = imp
            plan = danon.attention_plan(q, k, v, kind="dala", causal=True, **kw)
            out = run_plan(q, k, v, plan, scale=scale)
            hit = _exact_hit(plan, i, j)
        w = out[0, :, i, 0]
        weights.append(float(w.mean()))
        per_head.append(w.tolist())
        reached.append(float(hit))
    res = {"weight": sum(weights) / trials, "reached": sum(reached) / trials}
    if family.startswith("dala"):
        res["per_head"] = [round(sum(h[x] for h in per_head) / trials, 3) for x in range(4)]
    return res


def _exact_hit(plan, i: int, j: int) -> bool:
    """Whether key j is in row i's exact set (near blocks, listed blocks or routed tokens)."""
    b = plan.block_size
    tq, tj = i // b, j // b
    if plan.window is not None and 0 <= tq - tj <= plan.window:
        return True
    if plan.block_idx is not None and bool((plan.block_idx[0, 0, tq] == tj).any()):
        return True
    if plan.token_idx is not None and bool((plan.token_idx[0, 0, tq] == j).any()):
        return True
    return False


def main() -> None:
    families = ("dense", "msra", "ucsa", "ucsa-max", "dala", "dala-nodecay", "dala-oracle", "dala-oracle-nodecay")
    print("| regime | N | delta | " + " | ".join(families) + " |")
    print("|---|---:|---:|" + "---:|" * len(families))
    for regime in ("orthogonal", "random"):
        for n in (512, 2048):
            for delta in (6.0, 10.0):
                cells = []
                for f in families:
                    r = planted_weight(f, n, delta=delta, regime=regime)
                    cells.append(f"{r['weight']:.3f} ({r['reached']:.2f})")
                print(f"| {regime} | {n} | {delta:g} | " + " | ".join(cells) + " |", flush=True)
    print("\nDALA weight per head (ALiBi slopes 1/4, 1/16, 1/64, 1/256), orthogonal, delta 10:")
    for n in (512, 2048):
        print(n, planted_weight("dala-oracle", n, delta=10.0, regime="orthogonal")["per_head"])


if __name__ == "__main__":
    main()
