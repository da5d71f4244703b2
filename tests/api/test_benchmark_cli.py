"""`danon bench`: the quick run on tiny sizes writes JSON (valid against the schema), Markdown and PNGs, fills
every cell, and the backends that compute the same function as eager agree with float64 eager."""
import argparse
import json
import math

import pytest
import torch

import danon.benchmark as bench
from danon.cli_bench import add_bench_parser

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("matplotlib")

SEQ_LENS = [64]   # one length: recompiles for a second one are tested in tests/api/test_backend.py
SPARSE = ("danon-msra", "danon-dala", "danon-ucsa")


def _parse(argv):
    parser = argparse.ArgumentParser(prog="danon")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One `danon bench --quick` on tiny sizes (every backend), shared by the checks below."""
    out = tmp_path_factory.mktemp("bench")
    args = _parse(["bench", "--quick", "--seq-lens", *map(str, SEQ_LENS), "--repeats", "2", "--warmup", "0",
                   "--out", str(out), "--no-progress"])
    assert args.func(args) == 0
    with open(out / "bench.json") as f:
        return out, json.load(f)


def test_quick_writes_json_valid_against_the_schema(quick):
    out, result = quick
    with open(bench.SCHEMA_PATH) as f:
        schema = json.load(f)
    jsonschema.validate(result, schema)
    assert result["command"].startswith("danon bench --quick")
    assert result["versions"]["torch"] == torch.__version__ and result["machine"]["cpu_count"] >= 1


def test_schema_rejects_a_cell_without_numbers_or_status(quick):
    _, result = quick
    with open(bench.SCHEMA_PATH) as f:
        schema = json.load(f)
    bad = json.loads(json.dumps(result))
    bad["cells"][0]["status"] = ""
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = json.loads(json.dumps(result))
    ok = next(c for c in bad["cells"] if c["status"] == "ok")
    ok["latency_ms"] = None
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_every_cell_is_filled(quick):
    _, result = quick
    cells = {(c["model"], c["backend"], c["seq_len"]): c for c in result["cells"]}
    want = {(m, b, n) for m in bench.QUICK["models"] for b in bench.BACKENDS for n in SEQ_LENS}
    assert set(cells) == want and len(result["cells"]) == len(want)
    for key, c in cells.items():
        if c["status"] == "ok":
            lat = c["latency_ms"]
            assert 0 < lat["min"] <= lat["median"] <= lat["max"] and lat["repeats"] == 2, key
            assert c["compile_s"] > 0 and c["peak_mib"] is not None and c["peak_mib"] >= 0, key
            assert math.isfinite(c["rel_error"]) and c["speedup_vs_eager"] > 0, key
        else:
            assert c["status"].startswith(("unavailable: ", "error: ")), key
    for backend in ("danon-exact", *SPARSE):   # the first length compiles afresh: every site runs the family
        sites = cells[("danon-dense", backend, SEQ_LENS[0])]["attention_sites"]
        assert sites["sites"] >= 1 and sites["families"] == {backend.split("-")[1]: sites["sites"]}, (backend, sites)
    for n in SEQ_LENS:
        eager = cells[("danon-dense", "eager", n)]
        assert eager["status"] == "ok" and eager["speedup_vs_eager"] == 1.0
        trt = cells[("danon-dense", "tensorrt", n)]
        if not torch.cuda.is_available():
            assert trt["status"].startswith("unavailable: ") and "CUDA" in trt["status"]


def test_errors_against_float64_eager_are_within_tolerance(quick):
    _, result = quick
    for c in result["cells"]:
        if c["backend"] in ("eager", "inductor", "danon-exact", "danon-onnxrt"):
            # the same function as eager: must run here (onnxruntime is a test dependency) and agree
            assert c["status"] == "ok", c
            assert c["rel_error"] < 1e-4, c
        elif c["backend"] in SPARSE:
            assert c["status"] == "ok", c
            assert c["rel_error"] < 0.5, c    # an approximation (DALA adds an ALiBi decay), but not noise


def test_markdown_and_plots(quick):
    out, result = quick
    import matplotlib.image

    text = (out / "bench.md").read_text()
    assert text.startswith("`danon bench --quick")
    rows = [line for line in text.splitlines() if line.startswith("| danon-dense |")]
    assert len(rows) == len(result["cells"])
    png = out / "bench_danon-dense.png"
    image = matplotlib.image.imread(str(png))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0      # not a blank picture


def test_a_backend_that_fails_is_an_error_cell_not_a_missing_one(monkeypatch):
    monkeypatch.setitem(bench.BACKENDS, "broken", (dict(backend="danon", options={"attention": "nonsense"}), "bad"))
    result = bench.run_bench(["danon-dense"], ["eager", "broken"], [16], repeats=1, warmup=0, progress=False)
    cells = {c["backend"]: c for c in result["cells"]}
    assert cells["eager"]["status"] == "ok"
    assert cells["broken"]["status"].startswith("error: ") and "nonsense" in cells["broken"]["status"]
    assert cells["broken"]["latency_ms"] is None and cells["broken"]["speedup_vs_eager"] is None
    assert "error: " in bench.format_table(result)


@pytest.mark.parametrize("argv,message", [(["--models", "nomodel"], "invalid choice"),
                                          (["--backends", "tvm"], "invalid choice")])
def test_bad_flags_name_the_choices(argv, message, capsys):
    with pytest.raises(SystemExit):
        _parse(["bench", *argv])
    assert message in capsys.readouterr().err


def test_run_bench_rejects_bad_sizes():
    with pytest.raises(ValueError, match="seq_lens"):
        bench.run_bench(["danon-dense"], ["eager"], [0], progress=False)
    with pytest.raises(ValueError, match="repeats"):
        bench.run_bench(["danon-dense"], ["eager"], [8], repeats=0, progress=False)
