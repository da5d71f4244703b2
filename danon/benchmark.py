"""`danon bench`: compare torch.compile backends on the same models and inputs.

For every (model, sequence length) the runner compiles the model once per backend (the first call's
time is the compile time), then runs the backends round-robin, `repeats` rounds after `warmup`
rounds, so that drift of the machine (frequency, other load) hits every backend alike. Per cell it
records compile time, median / min / max latency, the peak memory of one call and the relative
error against eager in float64 (the same weights, `model.double()`). A backend that cannot run
here is a cell with a status ("unavailable: ..." or "error: ..."), never a missing row.

Files: JSON (every number, machine, versions, command; schema in bench/schema/bench_result.schema.json),
a Markdown table and one PNG per model (latency and memory against N, log scales).

Example:
    >>> result = run_bench(["danon-dense"], ["eager", "danon-exact"], [32], repeats=1, warmup=0,
    ...                    model_size="tiny", progress=False)
    >>> sorted((c["backend"], c["status"]) for c in result["cells"])
    [('danon-exact', 'ok'), ('eager', 'ok')]
"""
from __future__ import annotations

import copy
import ctypes
import datetime
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from danon.core.torch_internals import dynamo_config_patch, dynamo_reset

__all__ = ["MODELS", "BACKENDS", "QUICK", "available_models", "build_model", "backend_compiler", "run_bench",
           "format_table", "markdown_table", "write_json", "write_markdown", "write_plots", "machine_info",
           "versions", "SCHEMA_PATH"]

SCHEMA_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "schema",
                           "bench_result.schema.json")
SCHEMA_ID = "danon-bench/1"

# ----------------------------------------------------------------------------------------------- models
# Widths of the benchmark models; "tiny" is for tests and --quick, "small" for the README run.
SIZES = {"tiny": dict(hidden=32, heads=2, kv_heads=1, layers=1, vocab=256),
         "small": dict(hidden=256, heads=4, kv_heads=2, layers=2, vocab=4096)}


class InputIdsOnly(torch.nn.Module):
    """Wraps a language model so the call is `model(input_ids) -> logits` (one tensor in, one out).

    Example:
        >>> import danon
        >>> m = InputIdsOnly(danon.create_dense_model(hidden_size=8, num_heads=2, num_layers=1, vocab_size=10))
        >>> m(torch.randint(0, 10, (1, 5))).shape
        torch.Size([1, 5, 10])
    """

    def __init__(self, model: torch.nn.Module, hf: bool = False):
        super().__init__()
        self.model, self.hf = model, hf

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.hf:     # transformers models return a ModelOutput; no KV cache in a benchmark of one forward
            return self.model(input_ids=input_ids, use_cache=False).logits
        return self.model(input_ids)


def _danon_model(factory_name: str):
    def build(size: dict, max_len: int) -> torch.nn.Module:
        import danon
        return getattr(danon, factory_name)(hidden_size=size["hidden"], num_heads=size["heads"],
                                            num_kv_heads=size["kv_heads"], num_layers=size["layers"],
                                            vocab_size=size["vocab"], max_sequence_length=max_len)
    return build


def _gpt2(size: dict, max_len: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel   # random weights from a config: nothing downloaded
    cfg = GPT2Config(n_embd=size["hidden"], n_head=size["heads"], n_layer=size["layers"], vocab_size=size["vocab"],
                     n_positions=max_len, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    cfg._attn_implementation = "sdpa"
    return GPT2LMHeadModel(cfg)


def _llama(size: dict, max_len: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=size["hidden"], intermediate_size=2 * size["hidden"],
                      num_attention_heads=size["heads"],
                      num_key_value_heads=size["kv_heads"], num_hidden_layers=size["layers"], vocab_size=size["vocab"],
                      max_position_embeddings=max_len)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


# name -> (builder(size, max_len), is a transformers model)
MODELS: Dict[str, tuple] = {
    "danon-dense": (_danon_model("create_dense_model"), False),
    "danon-msra": (_danon_model("create_msra_model"), False),
    "danon-ucsa": (_danon_model("create_ucsa_model"), False),
    "danon-dala": (_danon_model("create_dala_model"), False),
    "gpt2": (_gpt2, True),
    "llama": (_llama, True),
}


def available_models() -> List[str]:
    """The model names runnable here (GPT-2 and Llama need transformers).

    Example:
        >>> "danon-dense" in available_models()
        True
    """
    has_hf = importlib.util.find_spec("transformers") is not None
    return [name for name, (_, hf) in MODELS.items() if has_hf or not hf]


def build_model(name: str, size: str = "tiny", max_len: int = 4096, seed: int = 0) -> torch.nn.Module:
    """A benchmark model in eval mode, wrapped to take input_ids only; the same seed gives the same weights.

    Example:
        >>> build_model("danon-dense", "tiny", 64)(torch.randint(0, 256, (1, 16))).shape
        torch.Size([1, 16, 256])
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; allowed: {', '.join(SIZES)}")
    builder, hf = MODELS[name]
    if hf and importlib.util.find_spec("transformers") is None:
        raise ValueError(f"model {name!r} needs transformers (pip install transformers)")
    torch.manual_seed(seed)
    return InputIdsOnly(builder(SIZES[size], max_len), hf).eval()


# --------------------------------------------------------------------------------------------- backends
_DANON = {"min_seq_len": 0}     # families apply at every N, so that small --quick sizes exercise them

# name -> (torch.compile keywords or None for eager, short description)
BACKENDS: Dict[str, tuple] = {
    "eager": (None, "the model as it is"),
    "inductor": (dict(backend="inductor"), 'torch.compile(backend="inductor")'),
    "danon-exact": (dict(backend="danon", options={**_DANON, "attention": "exact"}), "danon, exact attention"),
    "danon-msra": (dict(backend="danon", options={**_DANON, "attention": "msra"}), "danon, MSRA"),
    "danon-dala": (dict(backend="danon", options={**_DANON, "attention": "dala"}), "danon, DALA"),
    "danon-ucsa": (dict(backend="danon", options={**_DANON, "attention": "ucsa"}), "danon, UCSA"),
    "danon-onnxrt": (dict(backend="danon", options={**_DANON, "attention": "exact", "target": "onnxrt"}),
                     'danon, exact attention, target="onnxrt"'),
    "tensorrt": (dict(backend="danon", dynamic=False, options={**_DANON, "attention": "exact", "target": "tensorrt"}),
                 'danon, exact attention, target="tensorrt"'),
}
EXACT_BACKENDS = ("eager", "inductor", "danon-exact", "danon-onnxrt", "tensorrt")   # same function as eager


def _unavailable(backend: str) -> Optional[str]:
    """Why `backend` cannot run on this machine, or None."""
    if backend == "tensorrt":
        from danon.backends.tensorrt import missing_requirements
        missing = missing_requirements()
        return f"unavailable: needs {' and '.join(missing)}" if missing else None
    if backend == "danon-onnxrt" and importlib.util.find_spec("onnxruntime") is None:
        return "unavailable: needs onnxruntime"
    return None


def backend_compiler(name: str) -> Callable[[torch.nn.Module], Callable]:
    """model -> the callable that runs it with backend `name`.

    Example:
        >>> backend_compiler("eager")(torch.nn.Identity())(torch.ones(2)).tolist()
        [1.0, 1.0]
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; allowed: {', '.join(BACKENDS)}")
    kwargs = BACKENDS[name][0]
    if kwargs is None:
        return lambda model: model
    return lambda model: torch.compile(model, **copy.deepcopy(kwargs))


# ---------------------------------------------------------------------------------------------- metrics
def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (Linux; VmRSS: resident now, VmHWM: peak resident).

    Example:
        >>> status_kib("VmRSS") > 0
        True
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_free_memory() -> None:
    """Hand freed heap pages back to the OS, so the next call's peak is not hidden in memory malloc kept."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)   # glibc only; no library call does this from Python
    except (OSError, AttributeError):
        pass


def measure_peak_mib(fn: Callable, device: torch.device) -> Optional[float]:
    """Memory one call of `fn` needs above what was resident before it, in MiB (None where unmeasurable).

    CUDA: torch.cuda.max_memory_allocated; CPU on Linux: peak resident size (VmHWM after resetting it
    through /proc/self/clear_refs).

    Example:
        >>> measure_peak_mib(lambda: torch.ones(64, 1024, 1024).sum(), torch.device("cpu")) > 100
        True
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    _release_free_memory()
    before = status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")          # resets VmHWM to the current resident size
    except OSError:
        return None
    fn()
    return max(0, status_kib("VmHWM") - before) / 1024


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64.

    Example:
        >>> relative_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0], dtype=torch.float64))
        0.0
    """
    ref = ref.detach().to("cpu", torch.float64)
    diff = out.detach().to("cpu", torch.float64) - ref
    return float(diff.norm() / ref.norm().clamp(min=1e-300))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _error_status(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"error: {type(err).__name__}: {text[:300]}"


# ----------------------------------------------------------------------------------------------- runner
QUICK = dict(models=["danon-dense"], seq_lens=[256, 512], batch=1, repeats=3, warmup=1, model_size="tiny")


def _fresh_dynamo() -> None:
    dynamo_reset()


def run_bench(models: Sequence[str], backends: Sequence[str], seq_lens: Sequence[int], *, batch: int = 1,
              repeats: int = 5, warmup: int = 1, model_size: str = "tiny", device: str = "cpu", seed: int = 0,
              progress: bool = True, command: str = "") -> dict:
    """Run every (model, N, backend) cell; returns the result dict (see bench/schema/bench_result.schema.json).

    Example: see the module docstring.
    """
    for name, allowed in (("models", MODELS), ("backends", BACKENDS)):
        bad = [x for x in (models if name == "models" else backends) if x not in allowed]
        if bad:
            raise ValueError(f"unknown {name} {bad}; allowed: {', '.join(allowed)}")
    if not seq_lens or any(int(n) < 1 for n in seq_lens):
        raise ValueError(f"seq_lens must be integers >= 1, got {list(seq_lens)}")
    if batch < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"batch and repeats must be >= 1 and warmup >= 0, got {batch}, {repeats}, {warmup}")
    from danon.backend import collect_reports

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available; use device='cpu'")
    try:
        from tqdm import tqdm
    except ImportError:   # the progress bar comes with the `bench` extra
        tqdm = None
    total = len(models) * len(seq_lens) * len(backends) * (1 + warmup + repeats)
    bar = tqdm(total=total, desc="danon bench", unit="run", disable=not progress, file=sys.stderr) if tqdm else None
    cells = []
    max_len = max(seq_lens)
    # every backend on every N: more recompiles of one forward than Dynamo's default limit of 8 allows
    limits = dict.fromkeys(("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                            "accumulated_cache_size_limit"), 1024)
    try:
        with dynamo_config_patch(**limits), torch.no_grad():
            for model_name in models:
                model = build_model(model_name, model_size, max_len, seed).to(dev)
                reference = copy.deepcopy(model).to(dev, torch.float64)
                _fresh_dynamo()
                runners = {b: backend_compiler(b)(model) for b in backends}
                for n in seq_lens:
                    gen = torch.Generator().manual_seed(seed + n)
                    vocab = SIZES[model_size]["vocab"]
                    ids = torch.randint(0, vocab, (batch, n), generator=gen).to(dev)
                    ref = reference(ids)
                    row = {b: {"model": model_name, "backend": b, "seq_len": n, "batch": batch, "status": "ok",
                               "compile_s": None, "latency_ms": None, "peak_mib": None, "rel_error": None,
                               "speedup_vs_eager": None, "attention_sites": None} for b in backends}
                    times: Dict[str, List[float]] = {b: [] for b in backends}
                    for b in backends:      # first call: compile (and the error check on its output)
                        why = _unavailable(b)
                        if why:
                            row[b]["status"] = why
                        else:
                            try:
                                with collect_reports() as report:   # what the danon backend did to the sites
                                    t0 = time.perf_counter()
                                    out = runners[b](ids)
                                    _sync(dev)
                                    row[b]["compile_s"] = time.perf_counter() - t0
                                if b.startswith("danon-") or b == "tensorrt":
                                    fams: Dict[str, int] = {}
                                    for site in report.sites:
                                        key = site.family if site.replaced else "kept"
                                        fams[key] = fams.get(key, 0) + 1
                                    row[b]["attention_sites"] = {"sites": len(report.sites), "replaced": report.replaced,
                                                                 "graphs": report.graphs, "families": fams}
                                row[b]["rel_error"] = relative_error(out, ref)
                                del out
                            except Exception as err:   # a backend that fails is a cell with its error
                                row[b]["status"] = _error_status(err)
                        if bar:
                            bar.update(1)
                    live = [b for b in backends if row[b]["status"] == "ok"]
                    for r in range(warmup + repeats):
                        # round-robin, starting one later each round, so drift and cache effects spread evenly
                        order = live[r % len(live):] + live[:r % len(live)] if live else []
                        for b in order:
                            if row[b]["status"] != "ok":
                                continue
                            try:
                                t0 = time.perf_counter()
                                runners[b](ids)
                                _sync(dev)
                                if r >= warmup:
                                    times[b].append(time.perf_counter() - t0)
                            except Exception as err:
                                row[b]["status"] = _error_status(err)
                        if bar:
                            bar.update(len(backends))
                    for b in live:
                        if row[b]["status"] != "ok":
                            continue
                        ms = [t * 1e3 for t in times[b]]
                        row[b]["latency_ms"] = {"median": statistics.median(ms), "min": min(ms), "max": max(ms),
                                                "repeats": len(ms)}
                        try:
                            run = runners[b]
                            row[b]["peak_mib"] = measure_peak_mib(lambda: run(ids), dev)
                        except Exception as err:
                            row[b]["status"] = _error_status(err)
                    anchor = row.get("eager", {}).get("latency_ms")
                    for b in backends:
                        lat = row[b]["latency_ms"]
                        if anchor and lat and row[b]["status"] == "ok":
                            row[b]["speedup_vs_eager"] = anchor["median"] / lat["median"]
                        cells.append(row[b])
                del runners, model, reference
                _fresh_dynamo()
    finally:
        if bar:
            bar.close()
    return {"schema": SCHEMA_ID, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command or " ".join(sys.argv), "machine": machine_info(dev), "versions": versions(),
            "settings": {"models": list(models), "backends": list(backends), "seq_lens": [int(n) for n in seq_lens],
                         "batch": batch, "repeats": repeats, "warmup": warmup, "model_size": model_size,
                         "model_widths": SIZES[model_size], "device": str(dev), "seed": seed,
                         "backend_descriptions": {b: BACKENDS[b][1] for b in backends}},
            "cells": cells}


# ------------------------------------------------------------------------------------- machine, versions
def machine_info(device: torch.device = torch.device("cpu")) -> dict:
    """The hardware the numbers come from.

    Example:
        >>> sorted(machine_info())
        ['cpu', 'cpu_count', 'gpu', 'platform', 'torch_threads']
    """
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "platform": platform.platform()}


def versions() -> dict:
    """Versions of Python and of the packages that matter to the numbers (None: not installed).

    Example:
        >>> versions()["torch"] == torch.__version__
        True
    """
    from importlib import metadata
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("danon", "transformers", "onnx", "onnxruntime", "onnxscript", "triton", "torch_tensorrt"):
        try:
            out[pkg] = metadata.version(pkg.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


# ------------------------------------------------------------------------------------------------ output
def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _sites(sites: Optional[dict]) -> str:
    # sites compiled anew in this cell (0 of 0 when Dynamo reused the graph of an earlier length)
    if not sites:
        return "-"
    fams = ",".join(f"{n} {f}" for f, n in sorted(sites.get("families", {}).items()))
    return f"{sites['replaced']}/{sites['sites']}" + (f" ({fams})" if fams else "")


def _rows(result: dict) -> List[list]:
    rows = []
    for c in result["cells"]:
        lat = c["latency_ms"]
        ok = c["status"] == "ok"
        rows.append([c["model"], str(c["seq_len"]), c["backend"],
                     _fmt(c["compile_s"], ".2f") if ok else "-",
                     f"{lat['median']:.2f} ({lat['min']:.2f}-{lat['max']:.2f})" if ok and lat else "-",
                     _fmt(c["speedup_vs_eager"], ".2f") if ok else "-",
                     _fmt(c["peak_mib"], ".1f") if ok else "-",
                     _fmt(c["rel_error"], ".1e") if ok else "-",
                     _sites(c.get("attention_sites")),
                     c["status"] if len(c["status"]) <= 90 else c["status"][:87] + "..."])   # JSON keeps it whole
    return rows


HEAD = ["model", "N", "backend", "compile s", "latency ms median (min-max)", "x eager", "peak MiB",
        "rel. error vs fp64", "sites replaced", "status"]


# what a reader of the Markdown table needs to know to read the columns right
LEGEND = [
    "- compile s: the first call at this N. Each backend compiles one model for all lengths, so at the second"
    " and later N this is Dynamo's recompile with a dynamic length (the first compile and the recompile against"
    " Inductor's, per model: bench/results/compile_cpu.md).",
    "- peak MiB: resident memory one call needs above what was resident before it. ONNX Runtime keeps its"
    " buffers in an arena between calls, so danon-onnxrt reads near 0 after the warm-up calls.",
    "- rel. error vs fp64: against the eager model in float64. The exact backends must be at float32 rounding;"
    " for the sparse families it is their approximation error on random weights, and DALA also adds its"
    " ALiBi decay, a different function by design.",
]


def format_table(result: dict) -> str:
    """The readable table printed at the end of a run.

    Example:
        >>> r = {"cells": [{"model": "m", "seq_len": 8, "backend": "eager", "status": "ok", "compile_s": 0.1,
        ...       "latency_ms": {"median": 1.0, "min": 0.9, "max": 1.2}, "speedup_vs_eager": 1.0,
        ...       "peak_mib": 2.0, "rel_error": 1e-8}]}
        >>> print(format_table(r).splitlines()[2])
        m      8  eager    0.10       1.00 (0.90-1.20)             1.00     2.0       1.0e-08             -               ok
    """
    rows = [HEAD] + _rows(result)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEAD))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()   # noqa: E731
    return "\n".join([line(HEAD), line(["-" * w for w in widths])] + [line(r) for r in rows[1:]])


def markdown_table(result: dict) -> str:
    """The results as a Markdown table with the command, date and machine above it.

    Example:
        >>> r = {"cells": [], "command": "danon bench --quick", "date": "2026-01-01", "machine": {"cpu": "x",
        ...      "cpu_count": 2, "torch_threads": 2, "gpu": None}, "versions": {"torch": "2"}}
        >>> markdown_table(r).splitlines()[0]
        '`danon bench --quick` (2026-01-01; x, 2 cores, 2 torch threads; torch 2)'
    """
    m = result["machine"]
    hw = f"{m['cpu']}, {m['cpu_count']} cores, {m['torch_threads']} torch threads"
    hw += f", {m['gpu']}" if m.get("gpu") else ""
    out = [f"`{result['command']}` ({result['date']}; {hw}; torch {result['versions']['torch']})", "",
           "| " + " | ".join(HEAD) + " |", "|" + "|".join("---" for _ in HEAD) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in _rows(result)]
    return "\n".join(out + ["", *LEGEND]) + "\n"


def write_json(result: dict, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return path


def write_markdown(result: dict, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(markdown_table(result))
    return path


def write_plots(result: dict, out_dir: str, prefix: str = "bench") -> List[str]:
    """One PNG per model: latency and peak memory against N, one line per backend, log-log; returns the paths."""
    import matplotlib
    matplotlib.use("Agg")   # files only, no display
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for model in dict.fromkeys(c["model"] for c in result["cells"]):
        cells = [c for c in result["cells"] if c["model"] == model]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for backend in dict.fromkeys(c["backend"] for c in cells):
            ok = sorted((c for c in cells if c["backend"] == backend and c["status"] == "ok" and c["latency_ms"]),
                        key=lambda c: c["seq_len"])
            if not ok:
                continue
            ns = [c["seq_len"] for c in ok]
            axes[0].plot(ns, [c["latency_ms"]["median"] for c in ok], marker="o", label=backend)
            mem = [(c["seq_len"], c["peak_mib"]) for c in ok if c["peak_mib"]]
            if mem:
                axes[1].plot(*zip(*mem), marker="o", label=backend)
        for ax, title, unit in ((axes[0], "latency (median)", "ms"), (axes[1], "peak memory of one call", "MiB")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length N")
            ax.set_ylabel(unit)
            ax.set_title(f"{model}: {title}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{prefix}_{model}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_all(result: dict, out_dir: str, prefix: str = "bench") -> Dict[str, object]:
    """JSON, Markdown and PNGs under `out_dir`; returns {"json": path, "markdown": path, "plots": [paths]}."""
    return {"json": write_json(result, os.path.join(out_dir, prefix + ".json")),
            "markdown": write_markdown(result, os.path.join(out_dir, prefix + ".md")),
            "plots": write_plots(result, out_dir, prefix)}
