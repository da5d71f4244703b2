"""The demo: torch.compile a model with backend="danon", print the compile report, then the families side by side.

    python -m danon.demo                     # N = 4096, 2 layers, hidden 256
    python -m danon.demo --seq-len 8192 --layers 4 --attention dala

First a dense causal language model (its attention is F.scaled_dot_product_attention) is compiled
with backend="danon" and a sparse family; the compile report lists every attention site found and
what was done with it, and the logits are compared with eager. Then one model per family prints
its forward time, its distance from the dense model with the same weights, and per layer the
share of visible keys seen exactly, through summaries, and not at all.
"""
from __future__ import annotations

import argparse

import torch

import danon

FACTORIES = {
    "dense": danon.create_dense_model,
    "msra": danon.create_msra_model,
    "dala": danon.create_dala_model,
    "ucsa": danon.create_ucsa_model,
    "hybrid": danon.create_super_hybrid_model,
}


def run(seq_len: int = 4096, layers: int = 2, hidden: int = 256, heads: int = 8, seed: int = 0) -> list:
    """Build each family's model with the same seed, run one sequence, return one row of stats per family.

    Example:
        >>> rows = run(seq_len=512, layers=1, hidden=64, heads=4)
        >>> [r["family"] for r in rows]
        ['dense', 'msra', 'dala', 'ucsa', 'hybrid']
    """
    torch.manual_seed(seed)
    input_ids = torch.randint(0, 1000, (1, seq_len))
    rows, dense_logits = [], None
    for family, factory in FACTORIES.items():
        torch.manual_seed(seed)
        model = factory(hidden_size=hidden, num_heads=heads, num_layers=layers, vocab_size=1000,
                        max_sequence_length=seq_len).eval()
        with torch.no_grad():
            model(input_ids[:, :256])                     # warm-up
            with model.performance_monitor():
                logits = model(input_ids)
        stats = model.get_performance_stats()
        if dense_logits is None:
            dense_logits = logits
        rows.append({
            "family": family,
            "seconds": stats["computation_time"],
            "memory": stats["memory_usage"],
            "logit_distance": float((logits - dense_logits).norm() / dense_logits.norm()),
            "layers": stats["attention_distribution"],
        })
    return rows


def compile_demo(seq_len: int = 4096, layers: int = 2, hidden: int = 256, heads: int = 8, attention: str = "msra",
                 seed: int = 0) -> dict:
    """Compile a dense model with backend="danon" and `attention`; return the report, timings and the logit distance.

    Example:
        >>> result = compile_demo(seq_len=256, layers=1, hidden=64, heads=4, attention="msra")
        >>> result["report"].replaced
        1
    """
    import time
    torch.manual_seed(seed)
    model = danon.create_dense_model(hidden_size=hidden, num_heads=heads, num_layers=layers, vocab_size=1000,
                                     max_sequence_length=seq_len).eval()
    ids = torch.randint(0, 1000, (1, seq_len))
    options = {"attention": attention, "min_seq_len": min(1024, seq_len), "target": "eager"}
    with torch.no_grad():
        report = danon.explain(model, ids, **options)
        compiled = torch.compile(model, backend="danon", options=options)
        compiled(ids)
        start = time.perf_counter()
        logits = compiled(ids)
        compiled_s = time.perf_counter() - start
        start = time.perf_counter()
        eager = model(ids)
        eager_s = time.perf_counter() - start
    return {"report": report, "compiled_s": compiled_s, "eager_s": eager_s,
            "logit_distance": float((logits - eager).norm() / eager.norm()), "options": options}


def _format(rows: list, seq_len: int) -> str:
    lines = [f"danon demo: causal language models, N = {seq_len}, random weights (CPU, {torch.get_num_threads()} threads)",
             "", f"{'family':<8} {'forward s':>9} {'vs dense logits':>16}   per layer: exact / summary / skipped share of visible keys"]
    for r in rows:
        shares = "  ".join(f"{d['exact']:.2f}/{d['summary']:.2f}/{d['skipped']:.2f}" for d in _layer_list(r["layers"]))
        lines.append(f"{r['family']:<8} {r['seconds']:>9.3f} {r['logit_distance']:>16.3f}   {shares}")
    return "\n".join(lines)


def _layer_list(distribution) -> list:
    if isinstance(distribution, dict):
        return [distribution[k] for k in sorted(distribution, key=lambda k: str(k))]
    return list(distribution)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="danon demo: the attention families side by side")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--attention", default="msra", choices=["exact", "msra", "dala", "ucsa"])
    args = parser.parse_args(argv)
    result = compile_demo(args.seq_len, args.layers, args.hidden, args.heads, args.attention)
    print(f'torch.compile(model, backend="danon", options={result["options"]})')
    print(result["report"])
    print(f"forward: {result['compiled_s']:.3f} s compiled vs {result['eager_s']:.3f} s eager; "
          f"logits differ from eager by {result['logit_distance']:.3f} (relative; 0 for attention='exact')\n")
    print(_format(run(args.seq_len, args.layers, args.hidden, args.heads), args.seq_len))


if __name__ == "__main__":
    main()
