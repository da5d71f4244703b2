"""danon.kernels: executors of an attention plan (the CPU executor; the Triton executor, GPU and interpreted).

`triton_attention` and `triton_attention_backward` load on first use (module __getattr__), so that
`import danon` does not import Triton.
"""

__all__ = ["triton_attention", "triton_attention_backward"]


def __getattr__(name):
    if name in __all__:
        from . import triton as _triton_executor
        return getattr(_triton_executor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
