"""The `danon` command line: one subcommand per function (`danon export ...`).

    danon export MODULE:FACTORY --out model.onnx --seq-len 1024 --attention msra
    danon bench --quick --out bench/results/quick
    danon explain danon:create_dense_model --seq-len 4096 --attention ucsa --plot plots/
    python -m danon.cli export danon:create_dense_model --out m.onnx --seq-len 256 \\
        --model-arg hidden_size=64 --model-arg num_layers=2

A subcommand is a function `cmd_<name>(args) -> int` plus a function that adds its parser (setting
`run=cmd_<name>`), registered in `SUBCOMMANDS`; bench and explain live in danon/cli_bench.py.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Optional

from danon.cli_args import model_and_example_ids, parse_assignment
from danon.cli_bench import add_bench_parser, add_explain_parser


# --------------------------------------------------------------------------------------- export
def _add_export(sub) -> None:
    p = sub.add_parser("export", help="build a model from a factory and export it to ONNX",
                       description="Build a model from MODULE:FACTORY, run danon's attention pass and write an "
                                   "ONNX file (sequence length dynamic), checked in ONNX Runtime against eager.")
    p.add_argument("factory", help="importable model factory, e.g. danon:create_msra_model")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--seq-len", type=int, default=1024, help="example sequence length (default 1024)")
    p.add_argument("--batch", type=int, default=1, help="example batch size (default 1)")
    p.add_argument("--vocab", type=int, default=None,
                   help="token ids are drawn below this (default: the model's config.vocab_size)")
    p.add_argument("--attention", default="exact", help="exact | ucsa | msra | dala | keep (default exact)")
    p.add_argument("--opset", type=int, default=23, help="ONNX opset: 23 or 24 (default 23)")
    p.add_argument("--static", action="store_true", help="export static shapes (default: sequence length dynamic)")
    p.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime check against eager")
    p.add_argument("--model-arg", action="append", type=parse_assignment, default=[], metavar="NAME=VALUE",
                   help="keyword for the factory (repeatable)")
    p.add_argument("--option", action="append", type=parse_assignment, default=[], metavar="NAME=VALUE",
                   help="danon option, e.g. window=512 (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and example ids")
    p.set_defaults(run=cmd_export)


def cmd_export(args) -> int:
    """`danon export`: returns the exit status."""
    from danon.export import export

    model, ids = model_and_example_ids(args)
    options = dict(args.option)
    options.update(opset=args.opset, check=not args.no_check)
    dynamic = {} if not args.static else {"dynamic_shapes": {"input_ids": None}}
    path = export(model, (ids,), args.out, attention=args.attention, **dynamic, **options)
    print(f"wrote {path} ({type(model).__name__}, attention={args.attention}, example [{args.batch}, {args.seq_len}]"
          f"{'' if args.no_check else ', checked in ONNX Runtime'})")
    return 0


SUBCOMMANDS: Dict[str, Callable] = {"export": _add_export, "bench": add_bench_parser, "explain": add_explain_parser}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="danon", description="danon: long-sequence attention for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS.values():
        add(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `danon` script; errors print one line and return status 2.

    Example:
        >>> main(["export", "nomodule:f", "--out", "/tmp/x.onnx"])   # the message goes to stderr
        2
    """
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError, IsADirectoryError, RuntimeError) as err:
        print(f"danon {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
