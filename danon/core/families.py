"""The attention families, one spec each (DESIGN.md section 3), and FAMILIES, the one list of them.

A spec is a frozen dataclass of one family's keyword parameters: their defaults, and the rule each value
obeys (danon/core/checks.py). Building one checks every parameter, with the functional API's messages. The
spec then checks the per-call inputs (q, k, v, masks, DALA's importance and slopes) and builds the plan.
Everything else that names a family's parameters reads them from here: danon.functional's wrappers,
danon.config's configs, danon.nn's layers and the backend's options (danon/passes/options.py), so a new
parameter is written in its spec (and used by its builder).

Example:
    >>> import torch
    >>> list(FAMILIES)
    ['exact', 'ucsa', 'msra', 'dala']
    >>> MSRA.names()
    ('block_size', 'window', 'num_levels', 'compression_factor')
    >>> MSRA(window=-1)
    Traceback (most recent call last):
    ...
    ValueError: window must be an integer >= 0, got -1
    >>> q = torch.randn(1, 2, 256, 16)
    >>> MSRA(block_size=16, window=32).plan(q, q, q, causal=True).window
    2
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, ClassVar, Dict, Optional, Tuple, Union

from torch import Tensor

from . import checks
from .checks import (BLOCK_SIZE, BOOL, COMPRESSION_FACTOR, GAMMA, NONNEG_INT, NUM_LEVELS, SLIDING_WINDOW, SPARSITY_FACTOR,
                     Rule, one_of)
from .dala import dala_plan
from .exact import exact_plan
from .msra import msra_plan
from .plan import Plan
from .ucsa import ucsa_plan

__all__ = ["FAMILIES", "Family", "Exact", "UCSA", "MSRA", "DALA", "family", "param", "substitution_options"]


def param(default, rule: Rule):
    """A family parameter: its default and the rule its values obey.

    Example:
        >>> param(256, NONNEG_INT).metadata["rule"].allowed
        'an integer >= 0'
    """
    return dataclasses.field(default=default, metadata={"rule": rule})


def _spec(cls):
    """Make `cls` a spec: a frozen keyword-only dataclass, with its (name, rule) pairs fixed once, so
    that checking walks a tuple (cheap, and traced by Dynamo without dataclasses.fields)."""
    cls = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
    cls.RULES = tuple((f.name, f.metadata["rule"]) for f in dataclasses.fields(cls))
    cls.inputs = tuple(inspect.signature(cls.check_inputs).parameters)[3:]     # after self, q, k
    return cls


class Family:
    """What every spec does. Subclasses declare `name`, their parameters (with `param`) and `build`.

    Example:
        >>> spec = FAMILIES["ucsa"](top_k_blocks=2)
        >>> spec.keywords()["top_k_blocks"], spec.sparse, FAMILIES["exact"].sparse
        (2, True, False)
    """

    name: ClassVar[str]
    # sparse: self-attention or causal queries after a cache, chosen by the backend's `attention` option, its plan built in danon::plan
    sparse: ClassVar[bool] = True
    window_option: ClassVar[Optional[str]] = "window"   # the parameter holding the near window, in tokens
    RULES: ClassVar[Tuple[Tuple[str, Rule], ...]] = ()
    inputs: ClassVar[Tuple[str, ...]] = ()      # the keywords of check_inputs: per-call tensors, not parameters

    def __post_init__(self):
        for name, rule in self.RULES:
            object.__setattr__(self, name, rule.check(name, getattr(self, name)))   # frozen: set the normal form

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        """The family's parameters, in declaration order."""
        return tuple(name for name, _ in cls.RULES)

    @classmethod
    def parameters(cls) -> Tuple[dataclasses.Field, ...]:
        """The parameters as dataclass fields (type, default, metadata["rule"]), for classes that compose them."""
        return dataclasses.fields(cls)

    def keywords(self) -> Dict[str, Any]:
        """{parameter: value}."""
        return {name: getattr(self, name) for name, _ in self.RULES}

    def check_inputs(self, q: Tensor, k: Tensor) -> Dict[str, Any]:
        """The family's per-call tensors beyond q, k, v and the key-padding mask, checked (none by default)."""
        return {}

    def options(self, q: Tensor, k: Tensor, v: Tensor, *, causal=False, key_padding_mask=None,
                **inputs) -> Dict[str, Any]:
        """Every keyword of the family's builder, checked against q, k, v (what danon/core/plan_op.build_plan takes)."""
        causal = checks.check_bool("causal", causal)
        checks.check_qkv(q, k, v, sparse=self.sparse, causal=causal)
        kpm = checks.check_key_padding_mask(key_padding_mask, q, k)
        return dict(self.keywords(), causal=causal, key_padding_mask=kpm, **self.check_inputs(q, k, **inputs))

    def plan(self, q: Tensor, k: Tensor, v: Tensor, *, causal=False, key_padding_mask=None, **inputs) -> Plan:
        """The family's plan, built by its builder's own ops (for inspection; the op path is danon/core/run.py)."""
        return self.build(q, k, v, **self.options(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                                                  **inputs))


@_spec
class Exact(Family):
    """Exact attention: every visible key, or a band of them (sliding_window w: |i - j| < w).

    Example:
        >>> import torch
        >>> q = torch.randn(1, 2, 100, 8)
        >>> Exact(block_size=16, sliding_window=20).plan(q, q, q).window
        2
    """

    name: ClassVar[str] = "exact"
    sparse: ClassVar[bool] = False
    window_option: ClassVar[Optional[str]] = None   # its band is a sliding window, not near blocks
    block_size: int = param(64, BLOCK_SIZE)
    sliding_window: Optional[int] = param(None, SLIDING_WINDOW)

    @staticmethod
    def build(q, k, v, **options) -> Plan:
        return exact_plan(q, k, **options)          # the dense plan holds no summaries: v is not read


@_spec
class UCSA(Family):
    """UCSA: near, global and top-k selected blocks exactly; every other visible block through its mean.

    Per call it also takes past_queries [B, H, P, D], the query rows before a causal call with Nq < Nk.

    Example:
        >>> UCSA(sparsity_factor=1).sparsity_factor     # the normal form: a float
        1.0
        >>> UCSA.inputs
        ('past_queries', 'scale')
    """

    name: ClassVar[str] = "ucsa"
    window_option: ClassVar[Optional[str]] = "local_window_size"
    block_size: int = param(64, BLOCK_SIZE)
    local_window_size: int = param(512, NONNEG_INT)
    global_tokens: int = param(64, NONNEG_INT)
    top_k_blocks: int = param(16, NONNEG_INT)
    sparsity_factor: Optional[float] = param(None, SPARSITY_FACTOR)
    compress: bool = param(True, BOOL)
    # selection by attention mass: take blocks until this estimated share is covered (top_k_blocks is the cap)
    gamma: Optional[float] = param(None, GAMMA)
    build = staticmethod(ucsa_plan)

    def check_inputs(self, q: Tensor, k: Tensor, past_queries: Optional[Tensor] = None,
                     scale: Optional[float] = None) -> Dict[str, Any]:
        """past_queries [B, H, P, D]: the query rows before a causal call's first one, which the selection of
        queries after a cache reads (core/ucsa.py, history_rows); scale: the logit scale the `gamma` estimate
        uses (the attention's; default D ** -0.5)."""
        if past_queries is not None:
            if not isinstance(past_queries, Tensor) or past_queries.dim() != 4 or \
                    tuple(past_queries.shape[:2]) != tuple(q.shape[:2]) or past_queries.shape[3] != q.shape[3]:
                raise ValueError(f"past_queries must be a tensor [B, H, P, D] = [{q.shape[0]}, {q.shape[1]}, P, "
                                 f"{q.shape[3]}], got {getattr(past_queries, 'shape', type(past_queries).__name__)}")
            checks.check_same_device(q, past_queries=past_queries)
        return dict(past_queries=past_queries, scale=checks.check_scale(scale, q.shape[-1]))


@_spec
class MSRA(Family):
    """MSRA: near blocks exactly, farther keys through summaries that coarsen by c per level.

    Example:
        >>> MSRA(num_levels="auto").keywords()
        {'block_size': 64, 'window': 256, 'num_levels': 'auto', 'compression_factor': 4}
    """

    name: ClassVar[str] = "msra"
    block_size: int = param(64, BLOCK_SIZE)
    window: int = param(256, NONNEG_INT)
    num_levels: Union[int, str] = param(3, NUM_LEVELS)
    compression_factor: int = param(4, COMPRESSION_FACTOR)
    build = staticmethod(msra_plan)


@_spec
class DALA(Family):
    """DALA: near blocks and the most important routed tokens exactly, the rest as one summary; ALiBi decay.

    Per call it also takes importance [B, Hkv, N] (default ||k_j||) and slopes [H] (default ALiBi's).

    Example:
        >>> DALA.inputs
        ('importance', 'slopes')
        >>> DALA(decay="exp")
        Traceback (most recent call last):
        ...
        ValueError: decay must be one of 'alibi', 'none'; got 'exp'
    """

    name: ClassVar[str] = "dala"
    block_size: int = param(64, BLOCK_SIZE)
    window: int = param(256, NONNEG_INT)
    memory_size: int = param(64, NONNEG_INT)
    decay: str = param("alibi", one_of(("alibi", "none")))
    compress_rest: bool = param(True, BOOL)
    build = staticmethod(dala_plan)

    def check_inputs(self, q: Tensor, k: Tensor, importance: Optional[Tensor] = None,
                     slopes: Optional[Tensor] = None) -> Dict[str, Any]:
        importance = checks.check_per_token("importance", importance, (k.shape[0], k.shape[1], k.shape[2]))
        slopes = checks.check_per_token("slopes", slopes, (q.shape[1],))
        checks.check_same_device(q, importance=importance, slopes=slopes)
        if slopes is not None and self.decay != "alibi":
            raise ValueError(f"slopes are the ALiBi decay's: pass them with decay='alibi', not decay={self.decay!r}")
        return dict(importance=importance, slopes=slopes)


FAMILIES: Dict[str, type] = {spec.name: spec for spec in (Exact, UCSA, MSRA, DALA)}


def substitution_options(kind: Optional[str], options: Dict[str, Any]) -> Dict[str, Any]:
    """The keywords a family runs with when it is substituted into a model someone else trained (the backend,
    danon.hf): DALA adds no ALiBi decay, a bias the model was not trained with, unless `options` asks for it.
    The exact family takes none of a sparse family's keywords.

    Example:
        >>> substitution_options("dala", {"window": 64}), substitution_options("dala", {"decay": "alibi"})
        ({'window': 64, 'decay': 'none'}, {'decay': 'alibi'})
    """
    if kind == "dala" and "decay" not in options:
        return dict(options, decay="none")
    return dict(options) if kind in FAMILIES and FAMILIES[kind].sparse else {}


def family(kind: str) -> type:
    """The spec of family `kind`, or the error naming the families.

    Example:
        >>> family("msra").__name__
        'MSRA'
        >>> family("flash")
        Traceback (most recent call last):
        ...
        ValueError: kind must be one of 'exact', 'ucsa', 'msra', 'dala'; got 'flash'
    """
    checks.check_choice("kind", kind, FAMILIES)
    return FAMILIES[kind]
