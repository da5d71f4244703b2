"""`danon export MODULE:FACTORY --out model.onnx ...` and `python -m danon.cli export ...`."""
import subprocess
import sys

import onnx
import pytest
import torch

import danon
from danon.backends.onnx import relative_error, run_session, session
from danon.cli import build_parser, main
from danon.cli_args import load_factory

TINY = ["--model-arg", "hidden_size=32", "--model-arg", "num_heads=2", "--model-arg", "num_layers=1",
        "--model-arg", "vocab_size=50"]


def test_python_m_danon_cli_export_writes_a_model_that_runs_at_another_length(tmp_path):
    out = tmp_path / "dense.onnx"
    done = subprocess.run([sys.executable, "-m", "danon.cli", "export", "danon:create_dense_model", "--out", str(out),
                           "--seq-len", "64", *TINY], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "wrote" in done.stdout and "checked in ONNX Runtime" in done.stdout
    assert "Attention" in {n.op_type for n in onnx.load(str(out)).graph.node}
    torch.manual_seed(0)   # the CLI's default seed: the same weights
    model = danon.create_dense_model(hidden_size=32, num_heads=2, num_layers=1, vocab_size=50).eval()
    ids = torch.randint(0, 50, (1, 100))
    with torch.no_grad():
        want = model(ids)
    assert relative_error(run_session(session(onnx.load(str(out))), [ids])[0], want) < 1e-4


def test_export_subcommand_options():
    args = build_parser().parse_args(["export", "danon:create_msra_model", "--out", "m.onnx", "--seq-len", "1024",
                                      "--attention", "msra", "--option", "window=128", "--batch", "2"])
    assert (args.seq_len, args.attention, args.batch, dict(args.option), args.opset) == (1024, "msra", 2,
                                                                                        {"window": 128}, 23)


@pytest.mark.parametrize("spec,message", [("danon.nothing:f", "cannot import module"),
                                          ("danon:no_such_factory", "has no attribute"),
                                          ("danon", "MODULE:FACTORY")])
def test_bad_factory_is_a_clear_error(spec, message):
    with pytest.raises(ValueError, match=message):
        load_factory(spec)


def test_cli_errors_exit_2_with_one_line(tmp_path, capsys):
    status = main(["export", "danon:create_dense_model", "--out", str(tmp_path / "no" / "m.onnx"), *TINY])
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("danon export:") and "does not exist" in err and err.count("\n") == 1
