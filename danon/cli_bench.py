"""The `danon bench` and `danon explain` subcommands, registered on the `danon` parser by danon/cli.py.

    danon bench --quick --out bench/results/quick
    danon bench --models danon-dense gpt2 llama --seq-lens 1024 2048 4096 --repeats 5 --out DIR
    danon explain danon:create_dense_model --seq-len 4096 --attention ucsa --plot plots/
"""
from __future__ import annotations

import argparse

from danon.cli_args import model_and_example_ids, parse_assignment
from danon.core.torch_internals import dynamo_reset


# ------------------------------------------------------------------------------------------------ bench
def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register `danon bench` on an argparse subparsers object.

    Example:
        >>> parser = argparse.ArgumentParser(prog="danon")
        >>> _ = add_bench_parser(parser.add_subparsers(dest="command"))
        >>> args = parser.parse_args(["bench", "--quick", "--seq-lens", "32"])
        >>> args.quick, args.seq_lens, args.func.__name__
        (True, [32], 'cmd_bench')
    """
    from danon.benchmark import BACKENDS, MODELS, SIZES

    p = subparsers.add_parser(
        "bench", help="compare backends (eager, inductor, danon families, onnxrt, tensorrt) on the same models",
        description="Compile each model with each backend, run them round-robin and report compile time, latency "
                    "(median, min, max), peak memory and relative error against eager in float64. Writes JSON, "
                    "Markdown and PNG plots to --out.")
    p.add_argument("--quick", action="store_true",
                   help="the CI setting: tiny danon-dense model, N 256 and 512, 3 repeats (explicit flags override)")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=None,
                   help="models (default: every one installed: danon-dense, gpt2, llama)")
    p.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=None, help="backends (default: all)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=None, 
                   help="sequence lengths (default 512 1024 2048 4096)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds after warm-up (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds after the compile call (default 1)")
    p.add_argument("--model-size", choices=list(SIZES), default=None, 
                   help="model widths (default small; tiny with --quick)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default="bench/results/danon_bench", 
                   help="output folder (default bench/results/danon_bench)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench, run=cmd_bench)
    return p


def _bench_command(args) -> str:
    """The command line that reproduces a run, rebuilt from the parsed flags (the result files record it)."""
    parts = ["danon bench"] + (["--quick"] if args.quick else [])
    for flag in ("models", "backends", "seq_lens", "batch", "repeats", "warmup", "model_size", "device"):
        value = getattr(args, flag)
        if value is not None:
            values = value if isinstance(value, list) else [value]
            parts.append("--" + flag.replace("_", "-") + " " + " ".join(map(str, values)))
    return " ".join(parts + [f"--out {args.out}"])


def cmd_bench(args) -> int:
    """`danon bench`: returns the exit status; every cell holds numbers or an explicit status."""
    import torch

    from danon.benchmark import BACKENDS, QUICK, available_models, format_table, run_bench, write_all

    defaults = dict(models=[m for m in available_models() if not m.startswith("danon-") or m == "danon-dense"],
                    seq_lens=[512, 1024, 2048, 4096], batch=1, repeats=5, warmup=1, model_size="small")
    if args.quick:
        defaults.update(QUICK)
    pick = lambda name: defaults[name] if getattr(args, name) is None else getattr(args, name)   # noqa: E731
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = run_bench(pick("models"), args.backends or list(BACKENDS), pick("seq_lens"), batch=pick("batch"),
                       repeats=pick("repeats"), warmup=pick("warmup"), model_size=pick("model_size"), device=device,
                       progress=not args.no_progress, command=_bench_command(args))
    files = write_all(result, args.out)
    print(format_table(result))
    print(f"\nwrote {files['json']}, {files['markdown']}, {', '.join(files['plots'])}")
    return 0


# ---------------------------------------------------------------------------------------------- explain
def add_explain_parser(subparsers) -> argparse.ArgumentParser:
    """Register `danon explain` on an argparse subparsers object.

    Example:
        >>> parser = argparse.ArgumentParser(prog="danon")
        >>> _ = add_explain_parser(parser.add_subparsers(dest="command"))
        >>> args = parser.parse_args(["explain", "danon:create_dense_model", "--attention", "msra"])
        >>> args.attention, args.seq_len, args.func.__name__
        ('msra', 4096, 'cmd_explain')
    """
    p = subparsers.add_parser(
        "explain", help="print the compile report of a model (attention sites, family, keys per query, FLOPs)",
        description="Build a model from MODULE:FACTORY, compile it with the danon backend on random token ids and "
                    "print the compile report; --plot DIR also writes one PNG per attention site showing its plan.")
    p.add_argument("factory", help="importable model factory, e.g. danon:create_ucsa_model")
    p.add_argument("--seq-len", type=int, default=4096, help="sequence length of the example input (default 4096)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the example input (default 1)")
    p.add_argument("--vocab", type=int, default=None, 
                   help="token ids are drawn below this (default: config.vocab_size)")
    p.add_argument("--attention", default="exact", help="exact | ucsa | msra | dala | keep (default exact)")
    p.add_argument("--min-seq-len", type=int, default=0,
                   help="sites with fewer keys stay exact (default 0: the family applies at any length)")
    p.add_argument("--target", default="eager", help="danon target the report is made for (default eager: no "
                                                     "Inductor compile, the same rewrite)")
    p.add_argument("--model-arg", action="append", type=parse_assignment, default=[], metavar="NAME=VALUE",
                   help="keyword for the factory (repeatable), e.g. hidden_size=64")
    p.add_argument("--option", action="append", type=parse_assignment, default=[], metavar="NAME=VALUE",
                   help="danon option, e.g. window=512 (repeatable)")
    p.add_argument("--plot", metavar="DIR", default=None, help="write one PNG per attention site's plan here")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the report as JSON")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and example ids")
    p.set_defaults(func=cmd_explain, run=cmd_explain)
    return p


def cmd_explain(args) -> int:
    """`danon explain`: prints the compile report; returns the exit status."""
    import json

    import torch

    import danon

    model, ids = model_and_example_ids(args)
    options = dict(args.option)
    options.update(attention=args.attention, min_seq_len=args.min_seq_len, target=args.target)
    dynamo_reset()   # explain must compile afresh, not answer from an earlier cache entry
    with torch.no_grad():
        report = danon.explain(model, ids, **options)
    print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=1)
    if args.plot:
        from danon.visualization import AttentionVisualizer
        paths = AttentionVisualizer(model).plot_plans(ids, args.plot, **options)
        print(f"wrote {len(paths)} plan picture(s) to {args.plot}")
        for path in paths:
            print(f"  {path}")
    return 0
