"""danon's own CPU kernel (csrc/sparse_attention_cpu.cpp, forward and backward) and DALA's routing scan
(csrc/routing_cpu.cpp): one C++ extension, built on first use, loaded as torch ops.

The kernel runs one query block and one head against all its keys in one tile (the window read in place,
listed blocks, tokens and summaries gathered beside it, one softmax), instead of one aten flash call per
part merged by log-sum-exp. It is compiled by `torch.utils.cpp_extension` with the vector ISA flags that
Inductor picks for this machine (`torch._inductor.cpu_vec_isa`), once per machine and torch version (cached
under torch's extension directory); the first build takes about a minute and is announced on stderr.

Without a C++ compiler or ninja, or with ``DANON_CPU_KERNEL=0`` in the environment, `load()` returns None
and the executor keeps the aten path (danon/kernels/gather.py), which gives the same results.

Example:
    >>> from danon.kernels import native_cpu
    >>> ops = native_cpu.load()   # None where no C++ compiler is installed
    >>> ops.sparse_forward
    <OpOverloadPacket(op='danon_cpu.sparse_forward')>
"""
from __future__ import annotations

import functools
import os
import re
import sys
import warnings
from pathlib import Path

import torch

from danon.core.torch_internals import cpu_vector_isa_flags

__all__ = ["load", "available", "compile_sources", "recycled_bytes", "release_recycled"]

SOURCE = Path(__file__).with_name("csrc") / "sparse_attention_cpu.cpp"
# DALA's routed tokens (core/dala.py's eager CPU path), built into the same extension
ROUTING_SOURCE = SOURCE.with_name("routing_cpu.cpp")


def _isa_flags():
    """The vector ISA compile flags and macros Inductor uses on this CPU (at::vec picks its width from them)."""
    isa = cpu_vector_isa_flags()
    if isa is None:   # no vector ISA Inductor knows: at::vec's scalar fallback
        return "scalar", [], []
    name, flags, macros = isa
    return re.sub(r"\W+", "_", name), flags, [f"-D{m}" for m in macros]


def compile_sources(name: str, sources: list, extra_cflags: tuple = ()) -> None:
    """Compile and load C++ `sources` as extension `name` + this CPU's ISA suffix, with the flags the kernel needs:
    the ISA Inductor picks (at::vec's width), -O3 and OpenMP (without it at::parallel_for runs serially).

    bench/kernel_ab_cpu.py builds other versions of the kernel with it, so that both builds match load()'s.
    Example (builds the kernel the first time, about 15 s):
        >>> from danon.kernels.native_cpu import SOURCE, ROUTING_SOURCE, compile_sources
        >>> compile_sources("danon_cpu", [str(SOURCE), str(ROUTING_SOURCE)])
    """
    from torch.utils import cpp_extension

    isa, arch, macros = _isa_flags()
    cpp_extension.load(name=f"{name}_{isa}", sources=sources, is_python_module=False,
                       extra_cflags=["-O3", "-fopenmp", *arch, *macros, *extra_cflags],
                       extra_ldflags=["-fopenmp"], verbose=False)


@functools.lru_cache(maxsize=None)
def load(profile: bool = False):
    """Build (first time on this machine) and load the kernel; returns ``torch.ops.danon_cpu`` or None.

    ``profile=True``: a separate build with per-phase timers (``torch.ops.danon_cpu_profile``, whose
    ``phase_seconds()`` returns and resets the seconds spent gathering, in gemm, in the softmax and in the
    gradients' scatter, summed over the threads); bench/profile_cpu.py --kernel-phases uses it.
    """
    if os.environ.get("DANON_CPU_KERNEL", "1") == "0":
        return None
    try:
        from torch.utils import cpp_extension

        if not cpp_extension.is_ninja_available():
            raise RuntimeError("ninja is not installed")
        print("danon: loading the CPU sparse-attention kernel (compiled once per machine: about 15 s the first time)",
              file=sys.stderr, flush=True)
        suffix, extra = ("_profile", ("-DDANON_PROFILE",)) if profile else ("", ())
        compile_sources(f"danon_cpu{suffix}", [str(SOURCE), str(ROUTING_SOURCE)], extra)
        return torch.ops.danon_cpu_profile if profile else torch.ops.danon_cpu
    except Exception as e:  # no compiler, ninja or BLAS symbol: the aten path gives the same results
        warnings.warn(f"danon: the CPU sparse-attention kernel is unavailable ({type(e).__name__}: {e}); "
                      f"using the aten flash path (and for DALA's routing the torch tree) instead", RuntimeWarning,
                      stacklevel=2)
        return None


def available() -> bool:
    """Whether the kernel is loaded (building it if needed)."""
    return load() is not None


def _loaded_ops():
    """torch.ops.danon_cpu when the kernel is loaded in this process (without building or loading it), else None."""
    ops = torch.ops.danon_cpu
    try:
        ops.recycled_bytes
    except AttributeError:  # not registered: the kernel was never loaded here, so it keeps nothing
        return None
    return ops


def recycled_bytes() -> int:
    """Bytes of freed kernel outputs (out; dq, dk, dv) the kernel keeps, pages mapped, for its next calls' outputs of
    the same sizes: at most 256 MiB, or ``DANON_CPU_KEEP_MIB`` from the environment (read once; 0 keeps nothing).
    0 where the kernel is not loaded. torch's CPU allocator keeps nothing, and a fresh 32 MiB buffer costs several ms
    of page faults on first touch (docs/executors.md).

    Example:
        >>> from danon.kernels import native_cpu
        >>> native_cpu.recycled_bytes() >= 0
        True
    """
    ops = _loaded_ops()
    return 0 if ops is None else int(ops.recycled_bytes())


def release_recycled() -> None:
    """Give the memory `recycled_bytes` counts back to the system (as ``torch.cuda.empty_cache`` does for CUDA's
    caching allocator); nothing to do where the kernel is not loaded.

    Example:
        >>> from danon.kernels import native_cpu
        >>> native_cpu.release_recycled(); native_cpu.recycled_bytes()
        0
    """
    ops = _loaded_ops()
    if ops is not None:
        ops.release_recycled()
