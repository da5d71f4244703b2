"""Transformer language models with danon attention, and their factories.

:class:`DanonLanguageModel` is a pre-norm transformer:

    token embedding + sinusoidal position encoding -> dropout
    -> num_layers x [ x + Dropout(Attention(LayerNorm(x))) ;  x + MLP(LayerNorm(x)) ]
    -> LayerNorm -> lm head (tied to the embedding by default)

with ``MLP = Linear -> GELU -> Linear -> Dropout``. The attention layer of
every block comes from the config's family (:mod:`danon.nn`). ``model(input_ids,
attention_mask=None)`` returns logits ``[B, N, vocab_size]``. Models are causal
(language models) by default; ``causal=False`` gives an encoder. Weights are
random (normal, std ``initializer_range``); nothing is downloaded.

Factories take a config object or keywords (or a config plus keyword overrides):

    >>> import torch
    >>> from danon.models import create_msra_model
    >>> model = create_msra_model(hidden_size=64, num_heads=4, num_levels=2, num_layers=2,
    ...                           vocab_size=1000, window=32, block_size=16)
    >>> input_ids = torch.randint(0, 1000, (1, 100))
    >>> model(input_ids, torch.ones_like(input_ids)).shape
    torch.Size([1, 100, 1000])
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from danon.config import (
    BaseConfig,
    DALAConfig,
    DenseConfig,
    MSRAConfig,
    SuperHybridConfig,
    UCSAConfig,
)
from danon.monitoring import PerformanceMonitorMixin
from danon.nn import attention_class_for

__all__ = [
    "DanonLanguageModel",
    "DanonBlock",
    "sinusoidal_position_encoding",
    "create_model",
    "create_msra_model",
    "create_dala_model",
    "create_ucsa_model",
    "create_super_hybrid_model",
    "create_dense_model",
]


def sinusoidal_position_encoding(
    seq_len: int, dim: int, *, device=None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The sinusoidal position encoding ``[seq_len, dim]`` of the DANON README / Transformer paper.

    ``PE[pos, 2i] = sin(pos / 10000^(2i/dim))``, ``PE[pos, 2i+1] = cos(pos / 10000^(2i/dim))``.
    Computed in float64 and cast to ``dtype``.

    Example:
        >>> from danon.models import sinusoidal_position_encoding
        >>> pe = sinusoidal_position_encoding(4, 6)
        >>> pe.shape, pe[0].tolist()
        (torch.Size([4, 6]), [0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    """
    for name, value, minimum in (("seq_len", seq_len, 0), ("dim", dim, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    pos = torch.arange(seq_len, dtype=torch.float64, device=device)[:, None]
    two_i = torch.arange(0, dim, 2, dtype=torch.float64, device=device)
    angle = pos / torch.pow(torch.tensor(10000.0, dtype=torch.float64, device=device), two_i / dim)
    pe = torch.empty(seq_len, dim, dtype=torch.float64, device=device)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : dim // 2])
    return pe.to(dtype)


# float64 elements of the kept position table (64 MiB at most); longer inputs compute theirs
POSITION_TABLE_ELEMENTS = 1 << 23


def _recompute_contexts():
    """(forward, recompute) contexts of a checkpointed layer: the recompute in the backward runs inside the
    forward's `with cp:` (danon.context_parallel), even when backward() is called after that scope closed."""
    from danon import parallel
    cp = parallel.active()
    return contextlib.nullcontext(), contextlib.nullcontext() if cp is None else cp


class DanonBlock(nn.Module):
    """One pre-norm transformer layer: ``x + attn(LN(x))`` then ``x + mlp(LN(x))``.

    Args:
        config: a danon config; its family picks the attention layer.

    Example:
        >>> import torch
        >>> from danon.config import DenseConfig
        >>> from danon.models import DanonBlock
        >>> block = DanonBlock(DenseConfig(hidden_size=32, num_heads=2))
        >>> block(torch.randn(1, 8, 32)).shape
        torch.Size([1, 8, 32])
    """

    def __init__(self, config: BaseConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = attention_class_for(config).from_config(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(config.hidden_size, config.mlp_size),
            nn.GELU(),
            nn.Linear(config.mlp_size, config.hidden_size),
            nn.Dropout(config.hidden_dropout),
        )

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                cache=None) -> torch.Tensor:
        """``hidden_states`` [B, N, hidden] and ``attention_mask`` [B, N] (1/True = attend); ``cache``: the
        layer's ``danon.decode_cache.LayerCache`` (incremental decoding) or None."""
        h = hidden_states + self.attention(self.attention_norm(hidden_states), attention_mask, cache=cache)
        return h + self.mlp(self.mlp_norm(h))


class DanonLanguageModel(nn.Module, PerformanceMonitorMixin):
    """Pre-norm transformer language model (or encoder) with danon attention.

    Build it with a factory (:func:`create_msra_model`, ...) or from a config.
    ``forward(input_ids [B, N], attention_mask [B, N] = None)`` returns logits
    ``[B, N, vocab_size]``. ``attention_mask`` marks real tokens (1/True) and
    padding (0/False); padded tokens are never attended as keys. Position
    encodings are the sinusoidal ones for positions 0..N-1. ``N`` may not
    exceed ``config.max_sequence_length``.

    Monitoring: ``with model.performance_monitor(): ...`` then
    ``model.get_performance_stats()`` (see :mod:`danon.monitoring`).

    Args:
        config: DenseConfig, MSRAConfig, DALAConfig, UCSAConfig or SuperHybridConfig.

    Example:
        >>> import torch
        >>> from danon.config import UCSAConfig
        >>> from danon.models import DanonLanguageModel
        >>> cfg = UCSAConfig(hidden_size=32, num_heads=2, num_layers=1, vocab_size=50, block_size=16,
        ...                  local_window_size=16, global_tokens=16, top_k_blocks=1)
        >>> model = DanonLanguageModel(cfg)
        >>> model(torch.randint(0, 50, (2, 70))).shape
        torch.Size([2, 70, 50])
    """

    def __init__(self, config: BaseConfig):
        super().__init__()
        if not isinstance(config, BaseConfig):
            raise TypeError(
                "config must be a DenseConfig, MSRAConfig, DALAConfig, UCSAConfig or SuperHybridConfig, "
                f"got {type(config).__name__}"
            )
        config.validate()
        attention_class_for(config)  # fails early for a config without an attention family
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_dropout = nn.Dropout(config.hidden_dropout)
        # the encodings of the first positions, kept rather than recomputed: compiled, the float64 sin/cos
        # would be inlined into every consumer of the residual stream (measured: ~9% of a 16k-token forward)
        positions = min(config.max_sequence_length, max(1, POSITION_TABLE_ELEMENTS // config.hidden_size))
        self.register_buffer("position_table", sinusoidal_position_encoding(positions, config.hidden_size,
                                                                            dtype=torch.float64), persistent=False)
        self.layers = nn.ModuleList(DanonBlock(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def family(self) -> str:
        """The attention family: ``"dense"``, ``"msra"``, ``"dala"``, ``"ucsa"`` or ``"hybrid"``."""
        return self.config.family

    def num_parameters(self) -> int:
        """Number of distinct parameters (tied weights counted once).

        Example:
            >>> from danon.models import create_dense_model
            >>> create_dense_model(hidden_size=8, num_heads=2, num_layers=1, vocab_size=10).num_parameters()
            936
        """
        return sum(p.numel() for p in self.parameters())

    def _positions(self, position_ids: torch.Tensor, n: int, cache) -> torch.Tensor:
        """The encodings [N, hidden] of explicit positions (checked: int64 [N], within max_sequence_length)."""
        if cache is not None:
            raise ValueError("position_ids and cache are exclusive: a cache continues at position cache.length")
        if not isinstance(position_ids, torch.Tensor) or position_ids.dtype != torch.int64 or \
                tuple(position_ids.shape) != (n,):
            got = (f"{position_ids.dtype} {list(position_ids.shape)}" if isinstance(position_ids, torch.Tensor)
                   else type(position_ids).__name__)
            raise ValueError(f"position_ids must be an int64 tensor [N] = [{n}], got {got}")
        if torch.compiler.is_compiling():   # no data-dependent check in a graph: the table's bounds check stands
            return self.position_table[position_ids]
        top = int(position_ids.max()) + 1 if n else 0
        if top > self.config.max_sequence_length or (n and int(position_ids.min()) < 0):
            raise ValueError(f"position_ids must lie in 0..max_sequence_length - 1 = "
                             f"{self.config.max_sequence_length - 1}")
        table = self.position_table if top <= self.position_table.shape[0] else \
            sinusoidal_position_encoding(top, self.config.hidden_size, device=position_ids.device)
        return table[position_ids.to(table.device)]

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                cache=None, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[B, N, vocab_size]`` for ``input_ids`` [B, N] (int64) and an optional
        ``attention_mask`` [B, N] (1/True = real token, 0/False = padding).

        ``cache``: a :class:`danon.DecodeCache` (causal models, under torch.no_grad()): the tokens continue
        the cached ones (positions from ``cache.length``), and a prefill, chunks and single-token steps give
        the logits of one forward over the whole sequence.

        ``position_ids``: int64 [N], the positions of the tokens (default 0..N-1): a rank's tokens under
        context parallelism are the positions ``cp.positions()`` of the whole sequence (danon.context_parallel)."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor [B, N] of token ids, got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [B, N], got {list(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor (int64), got {input_ids.dtype}")
        b, n = input_ids.shape
        start = 0 if cache is None else cache.length
        if start + n > self.config.max_sequence_length:
            cached = f" after {start} cached ones" if start else ""
            raise ValueError(
                f"input_ids has {n} tokens{cached}; at most max_sequence_length={self.config.max_sequence_length} "
                f"are allowed"
            )
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (b, n):
                shape = list(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
                raise ValueError(
                    f"attention_mask must be a tensor of shape [B, N] = [{b}, {n}] (1/True = attend) or None, got {shape}"
                )
            attention_mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
        x = self.embed_tokens(input_ids)
        if position_ids is not None:
            x = x + self._positions(position_ids, n, cache).to(x.dtype)
        elif start + n <= self.position_table.shape[0]:
            x = x + self.position_table[start:start + n].to(x.dtype)
        else:
            x = x + sinusoidal_position_encoding(start + n, self.config.hidden_size, device=x.device,
                                                 dtype=x.dtype)[start:]
        x = self.embed_dropout(x)
        use_checkpoint = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for index, layer in enumerate(self.layers):
            if cache is not None:
                x = layer(x, attention_mask, cache=cache.layer(index))
            elif use_checkpoint:
                x = checkpoint(layer, x, attention_mask, use_reentrant=False, context_fn=_recompute_contexts)
            else:
                x = layer(x, attention_mask)
        return self.lm_head(self.final_norm(x))


def create_model(config: BaseConfig, **overrides) -> DanonLanguageModel:
    """Build a :class:`DanonLanguageModel` from any danon config (keyword overrides allowed).

    Example:
        >>> from danon.config import DALAConfig
        >>> from danon.models import create_model
        >>> m = create_model(DALAConfig(hidden_size=32, num_heads=2, num_layers=1, vocab_size=50), block_size=16)
        >>> m.family, m.config.block_size
        ('dala', 16)
    """
    if not isinstance(config, BaseConfig):
        raise TypeError(
            "config must be a DenseConfig, MSRAConfig, DALAConfig, UCSAConfig or SuperHybridConfig, "
            f"got {type(config).__name__}"
        )
    if overrides:
        config = config.replace(**overrides)
    return DanonLanguageModel(config)


def _factory(config_cls: type, fname: str, config, overrides) -> DanonLanguageModel:
    if config is None:
        config = config_cls(**overrides)
    elif isinstance(config, dict):
        config = config_cls.from_dict({**config, **overrides})
    elif type(config) is config_cls:
        if overrides:
            config = config.replace(**overrides)
    else:
        raise TypeError(
            f"{fname}: config must be a {config_cls.__name__}, a dict of its fields, or None "
            f"(with keyword arguments), got {type(config).__name__}"
        )
    return DanonLanguageModel(config)


def create_msra_model(config: Optional[MSRAConfig] = None, **kwargs) -> DanonLanguageModel:
    """A language model with MSRA attention, from an :class:`~danon.config.MSRAConfig` or keywords.

    Keywords are MSRAConfig fields; given with a config they override its fields.

    Example:
        >>> import torch
        >>> from danon.models import create_msra_model
        >>> model = create_msra_model(hidden_size=64, num_heads=4, num_levels=3, num_layers=2,
        ...                           vocab_size=100, window=16, block_size=16)
        >>> model(torch.randint(0, 100, (1, 50))).shape
        torch.Size([1, 50, 100])
    """
    return _factory(MSRAConfig, "create_msra_model", config, kwargs)


def create_dala_model(config: Optional[DALAConfig] = None, **kwargs) -> DanonLanguageModel:
    """A language model with DALA attention, from a :class:`~danon.config.DALAConfig` or keywords.

    The DALA router receives no gradient (top-k routing is not differentiable);
    see :class:`danon.nn.DALAAttention`.

    Example:
        >>> import torch
        >>> from danon.config import DALAConfig
        >>> from danon.models import create_dala_model
        >>> cfg = DALAConfig(hidden_size=64, num_heads=4, num_layers=2, vocab_size=100,
        ...                  window=16, memory_size=16, block_size=16)
        >>> create_dala_model(cfg)(torch.randint(0, 100, (1, 50))).shape
        torch.Size([1, 50, 100])
    """
    return _factory(DALAConfig, "create_dala_model", config, kwargs)


def create_ucsa_model(config: Optional[UCSAConfig] = None, **kwargs) -> DanonLanguageModel:
    """A language model with UCSA attention, from a :class:`~danon.config.UCSAConfig` or keywords.

    Example:
        >>> import torch
        >>> from danon.models import create_ucsa_model
        >>> model = create_ucsa_model(hidden_size=64, num_heads=4, num_layers=2, vocab_size=100,
        ...                           local_window_size=16, global_tokens=16, sparsity_factor=0.25, block_size=16)
        >>> model(torch.randint(0, 100, (1, 50))).shape
        torch.Size([1, 50, 100])
    """
    return _factory(UCSAConfig, "create_ucsa_model", config, kwargs)


def create_super_hybrid_model(config: Optional[SuperHybridConfig] = None, **kwargs) -> DanonLanguageModel:
    """A language model whose layers gate MSRA, DALA and UCSA per head
    (:class:`danon.nn.HybridAttention`), from a :class:`~danon.config.SuperHybridConfig` or keywords.

    Example:
        >>> import torch
        >>> from danon.config import SuperHybridConfig
        >>> from danon.models import create_super_hybrid_model
        >>> cfg = SuperHybridConfig(hidden_size=64, num_heads=4, num_layers=1, vocab_size=100, block_size=16,
        ...                         window=16, memory_size=16, local_window_size=16, global_tokens=16,
        ...                         sparsity_factor=0.1)
        >>> model = create_super_hybrid_model(cfg)
        >>> with model.performance_monitor():
        ...     logits = model(torch.randint(0, 100, (1, 64)))
        >>> logits.shape, sorted(model.get_performance_stats())[:2]
        (torch.Size([1, 64, 100]), ['attention_distribution', 'computation_time'])
    """
    return _factory(SuperHybridConfig, "create_super_hybrid_model", config, kwargs)


def create_dense_model(config: Optional[DenseConfig] = None, **kwargs) -> DanonLanguageModel:
    """The dense baseline: the same transformer with exact attention
    (``F.scaled_dot_product_attention``), from a :class:`~danon.config.DenseConfig` or keywords.

    Example:
        >>> import torch
        >>> from danon.models import create_dense_model
        >>> model = create_dense_model(hidden_size=64, num_heads=4, num_kv_heads=2, num_layers=2, vocab_size=100)
        >>> model(torch.randint(0, 100, (2, 30))).shape
        torch.Size([2, 30, 100])
    """
    return _factory(DenseConfig, "create_dense_model", config, kwargs)
