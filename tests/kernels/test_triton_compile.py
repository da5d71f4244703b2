"""The Triton kernels compile for CUDA GPUs (sm_80, sm_90) on a machine without one.

Triton compiles ahead of time for a named target with its bundled LLVM and ptxas, so the compiled
path's front end (types, loop-carried values, dot shapes) is checked even where only the interpreter
can run. Slow (tens of seconds per kernel the first time; Triton caches the result).
"""
import pytest
import torch

import danon
from danon.core.attention_args import AttentionArgs, BackwardArgs
from danon.kernels import triton as triton_executor

CASES = [   # (dtype, kind, causal, D, padding, softcap)
    (torch.float32, "exact", False, 64, False, None),
    (torch.bfloat16, "exact", True, 128, True, None),
    (torch.float16, "ucsa", True, 64, True, None),
    (torch.bfloat16, "msra", False, 64, False, None),
    (torch.bfloat16, "dala", True, 128, True, 30.0),
]


def _captured_launches(monkeypatch, dtype, kind, causal, D, padding, softcap):
    """Run the executor on CPU tensors with a stand-in kernel module that records each launch's arguments."""
    launches = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, args, kwargs))

    class Kernels:
        _forward, _backward_dq, _backward_dkdv_near = (Recorder(n) for n in
                                                       ("_forward", "_backward_dq", "_backward_dkdv_near"))

    monkeypatch.setattr(triton_executor, "_kernels", lambda interpret: Kernels())
    monkeypatch.setattr(triton_executor, "_compiled", lambda x: True)   # the CUDA launch configuration
    q = torch.randn(2, 8, 512, D, dtype=dtype)
    k = torch.randn(2, 2, 512, D, dtype=dtype)
    kpm = (torch.rand(2, 512) > 0.1) if padding else None
    kw = {"exact": {}, "ucsa": dict(local_window_size=128, top_k_blocks=2), "msra": dict(window=128),
          "dala": dict(window=128, memory_size=32)}[kind]
    plan = danon.attention_plan(q, k, k, kind=kind, causal=causal, key_padding_mask=kpm, block_size=64, **kw)
    args = (q, k, k, plan.block_idx, plan.token_idx, plan.summary_idx, plan.summary_k, plan.summary_v,
            plan.summary_count, plan.summary_pos, kpm, None, plan.slopes)
    opts = (D ** -0.5, causal, 64, -1 if plan.window is None else plan.window, -1, softcap)
    a = AttentionArgs(*args, *opts)
    out, lse = triton_executor.attention_forward(a)
    triton_executor.attention_backward(a, BackwardArgs(out, lse, out, lse, True, False, plan.slopes is not None))
    return launches


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{str(c[0])[6:]}-{c[1]}-{'causal' if c[2] else 'full'}-D{c[3]}")
def test_kernels_compile_for_cuda(case, monkeypatch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    module = triton_executor._kernels(interpret=False)
    launches = _captured_launches(monkeypatch, *case)
    assert [name for name, _, _ in launches] == ["_forward", "_backward_dq", "_backward_dkdv_near"]
    for name, args, kwargs in launches:
        fn = getattr(module, name)
        values = list(args) + [kwargs[n] for n in fn.arg_names[len(args):]]
        signature, constants = {}, {}
        for param, value in zip(fn.params, values):
            if param.is_constexpr:
                signature[param.name], constants[param.name] = "constexpr", value
            else:
                signature[param.name] = mangle_type(value)
        for arch in (80, 90):
            kernel = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", arch, 32),
                                    options={"num_warps": kwargs["num_warps"], "num_stages": kwargs["num_stages"]})
            assert kernel.asm["cubin"], (name, arch)
            # shared memory must fit the GPU (opt-in maximum per block: A100 163 KiB, H100 227 KiB)
            assert kernel.metadata.shared <= {80: 166912, 90: 232448}[arch], (name, arch, kernel.metadata.shared)
