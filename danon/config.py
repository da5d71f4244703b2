"""Validated configuration dataclasses for danon's attention modules and models.

One dataclass per attention family, plus the dense baseline:

=====================  ==========================================================
``DenseConfig``        exact attention (``F.scaled_dot_product_attention``)
``MSRAConfig``         Multi-Scale Recursive Attention
``DALAConfig``         Dynamic Adaptive Long-range Attention
``UCSAConfig``         Unified Compressed Sparse Attention
``SuperHybridConfig``  per-head softmax gate over MSRA, DALA and UCSA
=====================  ==========================================================

All of them share the transformer fields (``vocab_size``, ``hidden_size``,
``num_heads``, ``num_kv_heads``, ``num_layers``, ``intermediate_size``, ...) and
add the parameters of their family, named as in DESIGN.md section 3.

Configs are keyword-only and checked when they are built: an unknown field, a
field of another family, a field of the original DANON README that has no
meaning in danon (``calibration_factor``, ``enable_cache``, ...) or a bad value
raises a :class:`ValueError` that names the field and says what is allowed.

Example:
    >>> from danon.config import MSRAConfig
    >>> cfg = MSRAConfig(hidden_size=768, num_levels=3, num_layers=6)
    >>> cfg.head_dim
    96
    >>> MSRAConfig(hidden_size=768, num_heads=5)
    Traceback (most recent call last):
        ...
    ValueError: MSRAConfig.hidden_size (768) must be divisible by num_heads (5)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Tuple, Union  # noqa: F401  (Union: in the specs' annotations)

from danon.core import families
from danon.core.checks import Rule

__all__ = [
    "BaseConfig",
    "DenseConfig",
    "MSRAConfig",
    "DALAConfig",
    "UCSAConfig",
    "SuperHybridConfig",
    "config_class_for",
]

# Fields of the original DANON README (seed) that describe features danon does not have.
# Each maps to the reason shown in the error message.
_SEED_FIELDS_WITHOUT_MEANING: Dict[str, str] = {
    "calibration_factor": "MSRA's summaries are plain count-weighted means, there is no calibration",
    "bidirectional_flow": "use causal=False for an encoder that attends both ways",
    "feature_fusion": "MSRA mixes its levels inside one softmax, there is no separate fusion",
    "stability_factor": "the attention op accumulates in fp32 and never returns NaN",
    "memory_efficient": "every sparse family already runs in O(N * keys per query) memory",
    "use_adaptive_router": "the DALA module always has its router MLP",
    "importance_threshold": "DALA routes a fixed number of tokens (memory_size), not a threshold",
    "state_update_frequency": "DALA has no separately updated recurrent state",
    "compression_ratio": "use compression_factor (MSRA) or compress (UCSA)",
    "enable_cache": "there is no attention cache",
    "max_cache_size": "there is no attention cache",
    "cache_strategy": "there is no attention cache",
    "error_tolerance": "every family computes its plan exactly; there is no error control",
    "enable_all_optimizations": "optimisations are chosen by torch.compile(backend='danon')",
    "advanced_features": "there are no optional features to switch on",
    "use_jit": "use torch.compile(model, backend='danon')",
    "use_amp": "use torch.autocast around the forward pass",
    "fusion_level": "use torch.compile(model, backend='danon')",
    "use_checkpoint": "use gradient_checkpointing=True",
    "optimize_attention": "use torch.compile(model, backend='danon')",
    "minimize_memory": "use gradient_checkpointing=True",
}

def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# The rules of the layers' own fields (the families' are in their specs); only the configs word them.
_ROUTER_HIDDEN_SIZE = Rule(lambda v: v is None or (_is_int(v) and v >= 1), "an int >= 1 or None",
                           "an int >= 1 or None")
_ROUTER_TEMPERATURE = Rule(lambda v: _is_number(v) and v > 0 and math.isfinite(v), "a finite number > 0",
                           "a finite number > 0")


@functools.lru_cache(maxsize=None)
def _owners(name: str) -> tuple:
    """Names of the config classes that have a field called ``name``."""
    return tuple(c.__name__ for c in _ALL_CONFIGS if name in {f.name for f in dataclasses.fields(c)})


def _unknown_field_message(cls: type, name: str) -> str:
    allowed = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
    if name in _SEED_FIELDS_WITHOUT_MEANING:
        return (
            f"{cls.__name__} got {name}=...: the field {name!r} from the original DANON README "
            f"has no meaning in danon ({_SEED_FIELDS_WITHOUT_MEANING[name]}). Allowed fields: {allowed}"
        )
    owners = _owners(name)
    if owners:
        return (
            f"{cls.__name__} has no field {name!r}: it belongs to {', '.join(owners)}. "
            f"Allowed fields: {allowed}"
        )
    return f"{cls.__name__} has no field {name!r}. Allowed fields: {allowed}"


def _compose(cls) -> None:
    """Put the fields of ``cls.composes`` (family specs, or configs: their fields beyond BaseConfig's)
    before ``cls``'s own, with their defaults and rules, so that no config restates a family's fields."""
    fields: Dict[str, dataclasses.Field] = {}
    types: Dict[str, Any] = {}
    for source in cls.__dict__.get("composes", ()):
        shared = {f.name for f in dataclasses.fields(BaseConfig)}
        for f in dataclasses.fields(source):
            if f.name in shared:
                continue
            # a field two sources have (the hybrid's block_size, window) is one field: they must agree on it
            if f.name in fields and fields[f.name].default != f.default:
                raise TypeError(f"{cls.__name__}: the composed field {f.name!r} has two defaults, "
                                f"{fields[f.name].default!r} and {f.default!r}")
            fields[f.name] = dataclasses.field(default=f.default, metadata=f.metadata)
            types[f.name] = f.type
    own = dict(cls.__dict__.get("__annotations__", {}))
    for name, f in fields.items():
        setattr(cls, name, f)
    cls.__annotations__ = {**types, **own}


def _config(cls):
    """Turn ``cls`` into a keyword-only dataclass whose ``__init__`` rejects unknown
    fields with a ValueError (instead of the dataclass TypeError). Its fields are the
    ones it declares after those of the family specs or configs it ``composes``."""
    _compose(cls)
    cls = dataclass(kw_only=True)(cls)
    generated_init = cls.__init__
    names = frozenset(f.name for f in dataclasses.fields(cls) if f.init)

    @functools.wraps(generated_init)
    def __init__(self, *args, **kwargs):
        if args:
            raise TypeError(
                f"{type(self).__name__} takes keyword arguments only, e.g. "
                f"{type(self).__name__}(hidden_size=768); got {len(args)} positional argument(s)"
            )
        for key in kwargs:
            if key not in names:
                raise ValueError(_unknown_field_message(type(self), key))
        generated_init(self, **kwargs)

    cls.__init__ = __init__
    return cls


@_config
class BaseConfig:
    """Fields shared by every danon model config (the transformer around the attention).

    Attributes:
        vocab_size: number of token ids (>= 1).
        hidden_size: model width (>= 1, divisible by ``num_heads``).
        num_heads: query heads per attention layer (>= 1).
        num_kv_heads: key/value heads (grouped-query attention); ``None`` means
            ``num_heads``. ``num_heads`` must be divisible by it.
        num_layers: transformer layers (>= 1).
        intermediate_size: width of the MLP; ``None`` means ``4 * hidden_size``.
        max_sequence_length: longest input the model accepts (>= 1). Positions use the
            sinusoidal encoding computed on the fly, so this is a check, not a buffer size.
        causal: ``True`` (default) builds a decoder / language model, ``False`` an encoder.
        attention_dropout: dropout probability in [0, 1) applied to the attention
            block's *output* (after the output projection). The attention op itself
            has no dropout inside the softmax.
        hidden_dropout: dropout probability in [0, 1) on the embeddings and the MLP output.
        bias: whether the q/k/v/o projections have a bias.
        layer_norm_eps: epsilon of the LayerNorms (> 0).
        initializer_range: standard deviation of the normal weight initialisation (> 0).
        tie_word_embeddings: share the token embedding with the language-model head.
        gradient_checkpointing: recompute each layer in the backward pass
            (``torch.utils.checkpoint``) while training, to save activation memory.

    Example:
        >>> from danon.config import DenseConfig
        >>> DenseConfig(hidden_size=64, num_heads=4, num_kv_heads=2).kv_heads
        2
    """

    family: ClassVar[str] = "base"
    # the family specs (danon.core.families) or configs whose fields this config has, before its own
    composes: ClassVar[Tuple[type, ...]] = ()

    vocab_size: int = 32000
    hidden_size: int = 512
    num_heads: int = 8
    num_kv_heads: Optional[int] = None
    num_layers: int = 6
    intermediate_size: Optional[int] = None
    max_sequence_length: int = 1 << 20
    causal: bool = True
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    bias: bool = False
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    gradient_checkpointing: bool = False

    # -- derived values -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """Width of one attention head: ``hidden_size // num_heads``."""
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        """The number of key/value heads actually used (``num_kv_heads`` or ``num_heads``)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def mlp_size(self) -> int:
        """The MLP width actually used (``intermediate_size`` or ``4 * hidden_size``)."""
        return 4 * self.hidden_size if self.intermediate_size is None else self.intermediate_size

    # -- construction helpers -------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Dict[str, Any]):
        """Build the config from a mapping, with the same checks as the constructor.

        Example:
            >>> from danon.config import UCSAConfig
            >>> UCSAConfig.from_dict({"hidden_size": 64, "num_heads": 4}).num_heads
            4
        """
        if not isinstance(values, dict):
            raise TypeError(f"{cls.__name__}.from_dict: values must be a dict, got {type(values).__name__}")
        return cls(**values)

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a plain dict (``from_dict(cfg.to_dict()) == cfg``).

        Example:
            >>> from danon.config import DenseConfig
            >>> DenseConfig(num_layers=2).to_dict()["num_layers"]
            2
        """
        return dataclasses.asdict(self)

    def replace(self, **changes):
        """A copy with some fields changed, validated like a new config.

        Example:
            >>> from danon.config import MSRAConfig
            >>> MSRAConfig().replace(window=64).window
            64
        """
        return dataclasses.replace(self, **changes)

    # -- validation -----------------------------------------------------------------
    def _fail(self, name: str, value: Any, allowed: str):
        raise ValueError(f"{type(self).__name__}.{name} must be {allowed}, got {value!r}")

    def _check_int(self, name: str, minimum: int, optional: bool = False):
        value = getattr(self, name)
        if optional and value is None:
            return
        if not _is_int(value) or value < minimum:
            self._fail(name, value, f"an int >= {minimum}" + (" or None" if optional else ""))

    def _check_bool(self, name: str):
        value = getattr(self, name)
        if not isinstance(value, bool):
            self._fail(name, value, "True or False")

    def _check_prob(self, name: str):
        value = getattr(self, name)
        if not _is_number(value) or not (0.0 <= value < 1.0):
            self._fail(name, value, "a float in [0, 1)")

    def _check_positive(self, name: str):
        value = getattr(self, name)
        if not _is_number(value) or not (value > 0) or not math.isfinite(value):
            self._fail(name, value, "a finite number > 0")

    def validate(self) -> None:
        """Check every field; raise ValueError naming the first bad field.

        Called automatically when the config is built. Call it again after
        assigning to a field directly.

        Example:
            >>> from danon.config import DenseConfig
            >>> cfg = DenseConfig()
            >>> cfg.num_heads = 7
            >>> cfg.validate()
            Traceback (most recent call last):
                ...
            ValueError: DenseConfig.hidden_size (512) must be divisible by num_heads (7)
        """
        for name in ("vocab_size", "hidden_size", "num_heads", "num_layers", "max_sequence_length"):
            self._check_int(name, 1)
        self._check_int("num_kv_heads", 1, optional=True)
        self._check_int("intermediate_size", 1, optional=True)
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"{type(self).__name__}.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"{type(self).__name__}.num_kv_heads ({self.num_kv_heads}) must divide "
                f"num_heads ({self.num_heads})"
            )
        for name in ("causal", "bias", "tie_word_embeddings", "gradient_checkpointing"):
            self._check_bool(name)
        self._check_prob("attention_dropout")
        self._check_prob("hidden_dropout")
        self._check_positive("layer_norm_eps")
        self._check_positive("initializer_range")
        for f in dataclasses.fields(self):        # the family fields, by the rules of their specs
            rule = f.metadata.get("rule")
            message = rule and rule.config_message(f"{type(self).__name__}.{f.name}", getattr(self, f.name))
            if message:
                raise ValueError(message)

    def __post_init__(self):
        self.validate()


@_config
class DenseConfig(BaseConfig):
    """Config of the dense baseline: exact attention through ``F.scaled_dot_product_attention``.

    Only the shared transformer fields (see :class:`BaseConfig`).

    Example:
        >>> from danon.config import DenseConfig
        >>> cfg = DenseConfig(hidden_size=64, num_heads=4, num_layers=2, vocab_size=100)
        >>> cfg.mlp_size
        256
    """

    family: ClassVar[str] = "dense"


@_config
class MSRAConfig(BaseConfig):
    """Config of a Multi-Scale Recursive Attention (MSRA) model (DESIGN.md section 3).

    Attributes (besides :class:`BaseConfig`'s):
        block_size: keys per block, a power of two >= 16 (default 64).
        window: near window in tokens (>= 0), rounded up to whole blocks; keys
            within it are attended exactly.
        num_levels: summary levels L (int >= 1) or ``"auto"`` (smallest L whose
            top level has at most 2W + 1 spans).
        compression_factor: blocks per span grow by this factor per level (int >= 2).

    Example:
        >>> from danon.config import MSRAConfig
        >>> cfg = MSRAConfig(hidden_size=768, num_levels=3, num_layers=6, compression_factor=4)
        >>> (cfg.window, cfg.num_levels, cfg.block_size)
        (256, 3, 64)
        >>> MSRAConfig(num_levels=0)
        Traceback (most recent call last):
            ...
        ValueError: MSRAConfig.num_levels must be an int >= 1 or "auto", got 0
    """

    family: ClassVar[str] = "msra"
    composes: ClassVar[Tuple[type, ...]] = (families.MSRA,)


@_config
class DALAConfig(BaseConfig):
    """Config of a Dynamic Adaptive Long-range Attention (DALA) model (DESIGN.md section 3).

    Attributes (besides :class:`BaseConfig`'s):
        block_size: keys per block, a power of two >= 16 (default 64).
        window: near window in tokens (>= 0), attended exactly.
        memory_size: routed tokens per query block (>= 0) attended exactly, chosen
            by the router's importance among tokens outside the window.
        decay: ``"alibi"`` (distance bias with learnable per-head slopes,
            initialised to ALiBi's 2^(-8(h+1)/H)) or ``"none"``.
        compress_rest: add one summary per query block holding every remaining
            candidate token, so no visible token is dropped.
        router_hidden_size: width of the router MLP; ``None`` means
            ``max(16, hidden_size // 4)``.

    Example:
        >>> from danon.config import DALAConfig
        >>> cfg = DALAConfig(hidden_size=768, num_heads=8, memory_size=128, attention_dropout=0.1)
        >>> cfg.decay
        'alibi'
        >>> DALAConfig(decay="exp")
        Traceback (most recent call last):
            ...
        ValueError: DALAConfig.decay must be one of "alibi", "none", got 'exp'
    """

    family: ClassVar[str] = "dala"
    composes: ClassVar[Tuple[type, ...]] = (families.DALA,)

    # the layer's router, not the family's: the functional op takes the importance it computes
    router_hidden_size: Optional[int] = dataclasses.field(default=None, metadata={"rule": _ROUTER_HIDDEN_SIZE})

    @property
    def router_width(self) -> int:
        """The router MLP width actually used."""
        return max(16, self.hidden_size // 4) if self.router_hidden_size is None else self.router_hidden_size


@_config
class UCSAConfig(BaseConfig):
    """Config of a Unified Compressed Sparse Attention (UCSA) model (DESIGN.md section 3).

    Attributes (besides :class:`BaseConfig`'s):
        block_size: keys per block, a power of two >= 16 (default 64).
        local_window_size: near window in tokens (>= 0), attended exactly.
        global_tokens: the first ``global_tokens`` tokens (rounded up to blocks) are
            attended exactly by every query (>= 0).
        top_k_blocks: extra key blocks selected per query block (>= 0).
        sparsity_factor: when given, a fraction in (0, 1] of the key blocks to
            select instead of ``top_k_blocks``.
        compress: attend every remaining visible block through its mean.

    Example:
        >>> from danon.config import UCSAConfig
        >>> cfg = UCSAConfig(hidden_size=768, sparsity_factor=0.1, local_window_size=512, global_tokens=64)
        >>> cfg.top_k_blocks
        16
        >>> UCSAConfig(enable_cache=True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: UCSAConfig got enable_cache=...: the field 'enable_cache' from the original DANON README has no meaning in danon ...
    """

    family: ClassVar[str] = "ucsa"
    composes: ClassVar[Tuple[type, ...]] = (families.UCSA,)


@_config
class SuperHybridConfig(BaseConfig):
    """Config of the hybrid model: per-head softmax gate over MSRA, DALA and UCSA.

    Each attention layer computes the three families from the same projections
    and mixes them per query head h: ``out = sum_m softmax(beta_h / T)_m * attn_m``
    with ``beta`` learnable [num_heads, 3] and ``T = router_temperature``.

    Attributes (besides :class:`BaseConfig`'s): the parameters of all three families
    (one ``window`` shared by MSRA and DALA), and
        router_temperature: the gate temperature T (> 0); small values make the
            gate sharper.

    Example:
        >>> from danon.config import SuperHybridConfig
        >>> cfg = SuperHybridConfig(hidden_size=768, num_levels=3, num_layers=6, sparsity_factor=0.1)
        >>> cfg.router_temperature
        1.0
        >>> SuperHybridConfig(router_temperature=0)
        Traceback (most recent call last):
            ...
        ValueError: SuperHybridConfig.router_temperature must be a finite number > 0, got 0
    """

    family: ClassVar[str] = "hybrid"
    # the gate's columns, in this order (HybridAttention's beta and coverage follow it)
    composes: ClassVar[Tuple[type, ...]] = (MSRAConfig, DALAConfig, UCSAConfig)

    router_temperature: float = dataclasses.field(default=1.0, metadata={"rule": _ROUTER_TEMPERATURE})

    router_width = DALAConfig.router_width


_ALL_CONFIGS = (DenseConfig, MSRAConfig, DALAConfig, UCSAConfig, SuperHybridConfig)

_BY_FAMILY = {c.family: c for c in _ALL_CONFIGS}


def config_class_for(family: str) -> type:
    """The config class of an attention family name.

    Args:
        family: one of ``"dense"``, ``"msra"``, ``"dala"``, ``"ucsa"``, ``"hybrid"``.

    Example:
        >>> from danon.config import config_class_for
        >>> config_class_for("msra").__name__
        'MSRAConfig'
    """
    try:
        return _BY_FAMILY[family]
    except (KeyError, TypeError):
        raise ValueError(
            f"family must be one of {', '.join(repr(k) for k in _BY_FAMILY)}, got {family!r}"
        ) from None
