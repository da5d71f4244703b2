"""danon: long-sequence attention for PyTorch (exact, MSRA, DALA, UCSA), as a library and a torch.compile backend.

Example:
    >>> import torch, danon
    >>> q = torch.randn(1, 4, 1024, 32)
    >>> danon.msra_attention(q, q, q, causal=True, window=128).shape
    torch.Size([1, 4, 1024, 32])
"""
from danon.core import attention_op  # registers the danon::attention op  # noqa: F401
from danon import kernels  # registers the executors that run it (danon/core/executors.py)  # noqa: F401
from danon.core import Plan, alibi_slopes
from danon.functional import (KINDS, attention, attention_plan, dala_attention, exact_attention, msra_attention,
                              plan_coverage, ucsa_attention)
from danon.passes.options import DanonConfig
from danon.passes.report import CompileReport, SiteReport
from danon.backend import danon_backend, explain
from danon.shard import ShardPlan, shard, shard_plan
from danon.parallel import ContextParallel, context_parallel
from danon.quantize import quantize
from danon.passes.report import CheckpointReport, LinearReport, QuantizeReport
from danon.export import export

__version__ = "0.1.0"

__all__ = ["KINDS", "Plan", "alibi_slopes", "attention", "attention_plan", "dala_attention", "exact_attention",
           "msra_attention", "plan_coverage", "ucsa_attention", "DanonConfig", "CompileReport", "SiteReport",
           "danon_backend", "explain", "ShardPlan", "shard", "shard_plan", "ContextParallel", "context_parallel",
           "quantize", "CheckpointReport", "LinearReport", "QuantizeReport", "export"]

from danon.config import DALAConfig, DenseConfig, MSRAConfig, SuperHybridConfig, UCSAConfig
from danon.models import (DanonLanguageModel, create_dala_model, create_dense_model, create_msra_model,
                          create_super_hybrid_model, create_ucsa_model)
from danon import nn  # noqa: F401
from danon.decode_cache import DecodeCache
from danon.calibrate import Calibration, calibrate

__all__ += ["DALAConfig", "DenseConfig", "MSRAConfig", "SuperHybridConfig", "UCSAConfig", "DanonLanguageModel",
            "create_dala_model", "create_dense_model", "create_msra_model", "create_super_hybrid_model",
            "create_ucsa_model", "nn", "DecodeCache", "calibrate", "Calibration"]


def __getattr__(name):
    # SparseCache subclasses transformers' Cache: imported on first use, so that `import danon` needs no transformers
    if name == "SparseCache":
        from danon.cache import SparseCache
        return SparseCache
    raise AttributeError(f"module 'danon' has no attribute {name!r}")
