"""Attention layers (``torch.nn.Module``) built on danon's attention op.

Every layer takes hidden states ``[B, N, hidden_size]`` and an optional
``attention_mask [B, N]`` (1 / True = a real token that may be attended, 0 /
False = padding), projects them with ``q_proj``, ``k_proj``, ``v_proj`` (grouped
query attention: ``num_kv_heads`` key/value heads shared by
``num_heads // num_kv_heads`` query heads each), runs one attention family, and
projects back with ``o_proj``. ``attention_dropout`` is dropout on the layer's
output: the attention op has no dropout inside the softmax.

==================  =======================================================
``SelfAttention``   dense exact attention (``F.scaled_dot_product_attention``)
``MSRAAttention``   Multi-Scale Recursive Attention
``DALAAttention``   Dynamic Adaptive Long-range Attention (router + ALiBi)
``UCSAAttention``   Unified Compressed Sparse Attention
``HybridAttention`` per-head softmax gate over MSRA, DALA and UCSA
==================  =======================================================

Each layer can be built from keywords or from its config
(``MSRAAttention.from_config(MSRAConfig(...))``).

Example:
    >>> import torch
    >>> from danon.nn import MSRAAttention
    >>> layer = MSRAAttention(64, 4, num_kv_heads=2, window=32, block_size=16, causal=True)
    >>> x = torch.randn(2, 100, 64)
    >>> layer(x).shape
    torch.Size([2, 100, 64])
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, ClassVar, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from danon.config import (
    BaseConfig,
    DALAConfig,
    DenseConfig,
    MSRAConfig,
    SuperHybridConfig,
    UCSAConfig,
)
from danon.core.families import FAMILIES

__all__ = [
    "SelfAttention",
    "MSRAAttention",
    "DALAAttention",
    "UCSAAttention",
    "HybridAttention",
    "alibi_slopes",
    "attention_class_for",
]

def _functional():
    # Imported lazily so that danon.config / danon.nn import even while the op is being built.
    import danon.functional as fn

    return fn


from danon.core.dala import alibi_slopes  # noqa: E402  (one definition of the default slopes)


def _validated(owner: str, config_cls: type, **fields) -> BaseConfig:
    """Check layer keywords with the config's rules; re-word the message for the layer."""
    try:
        return config_cls(**fields)
    except ValueError as err:
        msg = str(err).replace(f"{config_cls.__name__}.", f"{owner}: ")
        raise ValueError(msg) from None


def _key_padding_mask(attention_mask: Optional[torch.Tensor], batch: int, seq: int, device) -> Optional[torch.Tensor]:
    """[B, N] mask (1 / True = attend) -> bool key-padding mask on ``device``."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"attention_mask must be a torch.Tensor of shape [B, N] or None, got {type(attention_mask).__name__}"
        )
    if tuple(attention_mask.shape) != (batch, seq):
        raise ValueError(
            f"attention_mask must have shape [B, N] = [{batch}, {seq}] (1/True = attend), "
            f"got {list(attention_mask.shape)}"
        )
    mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
    return mask.to(device)


class _AttentionBase(nn.Module):
    """Projections, mask handling, monitoring hook; subclasses supply the attention.

    A layer's keywords are the shared ones of ``_shared_keywords`` and the family fields of its
    ``layer_config`` (the config's fields beyond :class:`BaseConfig`'s, from the family specs), checked by
    that config's rules and kept as attributes of the same names.
    """

    kind: ClassVar[str] = "base"
    config_class: ClassVar[type] = BaseConfig       # what from_config accepts
    layer_config: ClassVar[type] = BaseConfig       # whose family fields are the layer's keywords
    # Marks danon attention layers for danon.monitoring.
    _danon_attention: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # the signature __init__ binds its arguments to, and inspect / help() show
        family = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
                  for f in cls._family_fields()]
        shared = inspect.signature(_shared_keywords).parameters.values()
        cls.__signature__ = inspect.Signature([*shared, *family])

    @classmethod
    def _family_fields(cls) -> Tuple[dataclasses.Field, ...]:
        """The layer's keywords beyond the shared ones: its config's fields beyond BaseConfig's."""
        base = {f.name for f in dataclasses.fields(BaseConfig)}
        return tuple(f for f in dataclasses.fields(cls.layer_config) if f.name not in base)

    def __init__(self, *args, **kwargs):
        try:
            bound = type(self).__signature__.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(f"{type(self).__name__}: {err}") from None
        bound.apply_defaults()
        cfg = _validated(type(self).__name__, self.layer_config, **bound.arguments)
        super().__init__()
        self.hidden_size = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        self.causal = cfg.causal
        d, h, hkv = self.head_dim, self.num_heads, self.num_kv_heads
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=cfg.bias)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.attention_dropout)
        # Set by danon.monitoring while a performance monitor is active; only then is the
        # plan coverage of the forward pass computed (no overhead otherwise).
        self.record_coverage = False
        self.last_coverage: Optional[Dict[str, Any]] = None
        for f in self._family_fields():
            setattr(self, f.name, getattr(cfg, f.name))
        self._build(cfg)

    def _build(self, cfg: BaseConfig) -> None:
        """The layer's own modules and parameters beyond the projections (none by default)."""

    # -- construction -------------------------------------------------------------
    @classmethod
    def _config_kwargs(cls, config: BaseConfig) -> Dict[str, Any]:
        return {name: getattr(config, name) for name in cls.__signature__.parameters}

    @classmethod
    def from_config(cls, config: BaseConfig):
        """Build the layer from its config (``cls.config_class``).

        Example:
            >>> from danon.config import MSRAConfig
            >>> from danon.nn import MSRAAttention
            >>> layer = MSRAAttention.from_config(MSRAConfig(hidden_size=64, num_heads=4, window=32, block_size=16))
            >>> (layer.num_heads, layer.causal)
            (4, True)
        """
        if not isinstance(config, cls.config_class):
            raise TypeError(
                f"{cls.__name__}.from_config: config must be a {cls.config_class.__name__}, "
                f"got {type(config).__name__}"
            )
        config.validate()
        return cls(**cls._config_kwargs(config))

    # -- forward ------------------------------------------------------------------
    def _project(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor]):
        if not isinstance(hidden_states, torch.Tensor):
            raise TypeError(f"hidden_states must be a torch.Tensor [B, N, {self.hidden_size}], got {type(hidden_states).__name__}")
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states must have shape [B, N, hidden_size={self.hidden_size}], "
                f"got {list(hidden_states.shape)}"
            )
        b, n, _ = hidden_states.shape
        kpm = _key_padding_mask(attention_mask, b, n, hidden_states.device)
        q = self.q_proj(hidden_states).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v, kpm

    def _attend(self, q, k, v, kpm, hidden_states) -> torch.Tensor:  # [B, H, N, D]
        raise NotImplementedError

    def _coverage(self, q, k, kpm, hidden_states) -> Dict[str, Any]:
        raise NotImplementedError

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                cache=None) -> torch.Tensor:
        """Attend over ``hidden_states`` [B, N, hidden_size]; ``attention_mask`` [B, N]
        (1 / True = attend, 0 / False = padding) masks keys. Returns [B, N, hidden_size].

        ``cache``: a ``danon.decode_cache.LayerCache`` (causal layers, inference): the new tokens' keys and
        values are appended to it and the queries attend to every token so far (they are the last ones)."""
        q, k, v, kpm = self._project(hidden_states, attention_mask)
        if cache is not None:
            if not self.causal:
                raise ValueError(f"{type(self).__name__}: a cache needs a causal layer (causal=True); this one "
                                 f"attends both ways")
            k, v, kpm = cache.append(k, v, kpm)
            out = self._attend_cached(q, k, v, kpm, hidden_states, cache)
        else:
            out = self._attend(q, k, v, kpm, hidden_states)
            if self.record_coverage:
                with torch.no_grad():
                    self.last_coverage = self._coverage(q.detach(), k.detach(), kpm, hidden_states.detach())
        b, _, n, _ = out.shape
        out = out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.dropout(self.o_proj(out))

    def _family_kwargs(self, kind: Optional[str] = None, hidden_states: Optional[torch.Tensor] = None) -> Dict[str, Any]:
        """The functional API's keywords for family ``kind`` (default: the layer's): its parameters as this
        layer holds them (and, given ``hidden_states``, the family's per-call inputs)."""
        return {name: getattr(self, name) for name in FAMILIES[kind or self.kind].names()}

    def _attend_cached(self, q, k, v, kpm, hidden_states, cache) -> torch.Tensor:
        """The queries of the call (the last ones) on every cached key: exact attention by default."""
        return _functional().attention(q, k, v, kind="exact", causal=True, key_padding_mask=kpm)

    def _run_family_cached(self, kind: str, q, k, v, kpm, hidden_states, cache) -> torch.Tensor:
        """Family `kind` for the call's queries from the cache's plan state (decode steps read the near keys and
        the summaries only); DALA's router scores of the new tokens join the cached ones."""
        keywords = self._family_kwargs(kind, hidden_states)
        names = FAMILIES[kind].names()
        inputs = {name: value for name, value in keywords.items() if name not in names}
        if "importance" in inputs:
            inputs["importance"] = cache.append_importance(inputs["importance"])
        state = cache.plan_state(kind, {name: keywords[name] for name in names})
        return state.attention(q, k, v, key_padding_mask=kpm, **inputs)

    def _run_family(self, kind: str, q, k, v, kpm, hidden_states) -> torch.Tensor:
        return _functional().attention(
            q, k, v, kind=kind, causal=self.causal, key_padding_mask=kpm, **self._family_kwargs(kind, hidden_states)
        )

    def _plan_coverage(self, kind: str, q, k, kpm, hidden_states) -> Dict[str, float]:
        fn = _functional()
        plan = fn.attention_plan(
            q, k, kind=kind, causal=self.causal, key_padding_mask=kpm, **self._family_kwargs(kind, hidden_states)
        )
        return fn.plan_coverage(plan)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, causal={self.causal}"
        )


def _shared_keywords(hidden_size: int, num_heads: int, num_kv_heads: Optional[int] = None, *, causal: bool = False,
                     bias: bool = False, attention_dropout: float = 0.0):
    """The keywords every layer takes, with the layer's defaults (a signature, never called)."""


class _FamilyAttention(_AttentionBase):
    """A layer that runs one family, ``kind``, with the family's parameters as its attributes."""

    def _attend(self, q, k, v, kpm, hidden_states):
        return self._run_family(self.kind, q, k, v, kpm, hidden_states)

    def _attend_cached(self, q, k, v, kpm, hidden_states, cache):
        return self._run_family_cached(self.kind, q, k, v, kpm, hidden_states, cache)

    def _coverage(self, q, k, kpm, hidden_states):
        return _coverage_dict(self.kind, self._plan_coverage(self.kind, q, k, kpm, hidden_states))

    def extra_repr(self) -> str:
        # the family's parameters, block_size last (as the layers have always printed them)
        names = [n for n in FAMILIES[self.kind].names() if n != "block_size"] + ["block_size"]
        return super().extra_repr() + "".join(f", {name}={getattr(self, name)!r}" for name in names)


def _coverage_dict(kind: str, cov: Dict[str, float]) -> Dict[str, Any]:
    return {
        "kind": kind,
        "exact": float(cov["exact"]),
        "summary": float(cov["summary"]),
        "skipped": float(cov["skipped"]),
    }


class SelfAttention(_AttentionBase):
    """Dense multi-head self-attention on ``F.scaled_dot_product_attention`` (the baseline).

    Grouped-query attention uses SDPA's ``enable_gqa`` (no repeated k/v heads).
    A query with no visible key (all keys padded, or causal with padding before
    it) returns zeros, as danon's op does.

    Args:
        hidden_size: model width (divisible by ``num_heads``).
        num_heads: query heads.
        num_kv_heads: key/value heads (``None``: ``num_heads``); must divide ``num_heads``.
        causal: query i sees keys j <= i only (default ``False``).
        bias: bias in the q/k/v/o projections.
        attention_dropout: dropout probability on the layer's output.

    Example:
        >>> import torch
        >>> from danon.nn import SelfAttention
        >>> layer = SelfAttention(64, 4, num_kv_heads=2, causal=True)
        >>> x = torch.randn(2, 10, 64)
        >>> mask = torch.ones(2, 10, dtype=torch.long); mask[1, 7:] = 0
        >>> layer(x, mask).shape
        torch.Size([2, 10, 64])
    """

    kind = "dense"
    config_class = BaseConfig
    layer_config = DenseConfig

    @classmethod
    def from_config(cls, config: BaseConfig):
        """Build from any danon config (only the shared transformer fields are used).

        Example:
            >>> from danon.config import DenseConfig
            >>> from danon.nn import SelfAttention
            >>> SelfAttention.from_config(DenseConfig(hidden_size=64, num_heads=4)).head_dim
            16
        """
        return super().from_config(config)

    def _attend(self, q, k, v, kpm, hidden_states):
        from danon import parallel
        if parallel.active() is not None:   # inside `with cp:` the tokens are one rank's: danon's exact family
            return _functional().attention(q, k, v, kind="exact", causal=self.causal, key_padding_mask=kpm)
        gqa = self.num_kv_heads != self.num_heads
        if kpm is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=gqa)
        n = q.shape[-2]
        mask = kpm[:, None, None, :]  # [B, 1, 1, N]
        if self.causal:
            mask = mask & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        has_key = mask.any(dim=-1, keepdim=True)  # [B, 1, N or 1, 1]
        # Rows without a visible key: attend to everything, then zero them (never NaN).
        mask = mask | ~has_key
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return out * has_key.to(out.dtype)

    def _coverage(self, q, k, kpm, hidden_states):
        return {"kind": self.kind, "exact": 1.0, "summary": 0.0, "skipped": 0.0}


class MSRAAttention(_FamilyAttention):
    """Multi-Scale Recursive Attention layer (``danon.functional.msra_attention``).

    Keys within ``window`` tokens (rounded up to blocks) are attended exactly;
    farther keys through count-weighted means over spans that grow by
    ``compression_factor`` per level, for ``num_levels`` levels. With
    ``window >= N`` it equals :class:`SelfAttention`.

    Args:
        hidden_size, num_heads, num_kv_heads, causal, bias, attention_dropout:
            as in :class:`SelfAttention`.
        window: near window in tokens (>= 0).
        num_levels: int >= 1 or ``"auto"``.
        compression_factor: int >= 2.
        block_size: power of two >= 16.

    Example:
        >>> import torch
        >>> from danon.nn import MSRAAttention
        >>> layer = MSRAAttention(64, 4, window=16, num_levels=2, block_size=16)
        >>> layer(torch.randn(1, 200, 64)).shape
        torch.Size([1, 200, 64])
    """

    kind = "msra"
    config_class = layer_config = MSRAConfig


class _Router(nn.Module):
    """DALA's router: a position-wise MLP hidden -> router_hidden_size -> num_kv_heads."""

    def __init__(self, hidden_size: int, router_hidden_size: int, num_kv_heads: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, router_hidden_size)
        self.fc2 = nn.Linear(router_hidden_size, num_kv_heads)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # [B, N, hidden] -> [B, Hkv, N]
        return self.fc2(F.gelu(self.fc1(hidden_states))).transpose(1, 2)


class _DALAParts:
    """Router and slopes shared by DALAAttention and HybridAttention."""

    def _build(self, cfg) -> None:
        super()._build(cfg)
        self.router_hidden_size = cfg.router_width
        self.router = _Router(cfg.hidden_size, cfg.router_width, self.num_kv_heads)
        # top-k routing sends no gradient back: frozen, so optimisers and DDP do not wait for one
        self.router.requires_grad_(False)
        if cfg.decay == "alibi":
            self.slopes = nn.Parameter(alibi_slopes(self.num_heads))
        else:
            self.register_parameter("slopes", None)

    def importance(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The router's importance scores [B, num_kv_heads, N] (detached: the top-k
        routing is not differentiable, so no gradient reaches the router from the output)."""
        return self.router(hidden_states).detach()

    def _family_kwargs(self, kind=None, hidden_states=None) -> Dict[str, Any]:
        kw = super()._family_kwargs(kind, hidden_states)
        if (kind or self.kind) == "dala" and hidden_states is not None:
            kw["importance"] = self.importance(hidden_states)
            if self.slopes is not None:
                kw["slopes"] = self.slopes
        return kw

    def _dala_kwargs(self, hidden_states) -> Dict[str, Any]:
        # bench/quality/models.py reads the DALA keywords under this name
        return self._family_kwargs("dala", hidden_states)


class DALAAttention(_DALAParts, _FamilyAttention):
    """Dynamic Adaptive Long-range Attention layer (``danon.functional.dala_attention``).

    Keys within ``window`` are attended exactly, plus the ``memory_size`` tokens
    (per query block and kv head) with the highest *importance*; with
    ``compress_rest`` every other visible key is attended through one summary.
    With ``decay="alibi"`` the logits get the bias ``-slope_h * |i - j|``.

    * The router is a position-wise MLP (``router``: hidden -> router_hidden_size
      -> GELU -> num_kv_heads) giving the importance [B, num_kv_heads, N] from
      the hidden states.
    * The slopes (``slopes``, [num_heads]) are learnable and initialised to
      ALiBi's ``2^(-8 (h+1) / H)``.
    * Honest caveat: the top-k routing is a selection, which is not
      differentiable. The router therefore receives **no gradient** from the
      attention output; its parameters are frozen (``requires_grad=False``) so that
      optimisers and DistributedDataParallel do not wait for one. To train it with a
      loss of your own on :meth:`importance`, call ``layer.router.requires_grad_(True)``
      and drop the detach by calling ``layer.router(hidden_states)`` directly.

    With ``window >= N`` and ``decay="none"`` it equals :class:`SelfAttention`.

    Args:
        hidden_size, num_heads, num_kv_heads, causal, bias, attention_dropout:
            as in :class:`SelfAttention`.
        window: near window in tokens (>= 0).
        memory_size: routed tokens per query block (>= 0).
        decay: ``"alibi"`` or ``"none"``.
        compress_rest: summarise the remaining keys (default ``True``).
        router_hidden_size: router width (``None``: ``max(16, hidden_size // 4)``).
        block_size: power of two >= 16.

    Example:
        >>> import torch
        >>> from danon.nn import DALAAttention
        >>> layer = DALAAttention(64, 4, window=16, memory_size=16, block_size=16, causal=True)
        >>> layer.slopes.shape, layer(torch.randn(1, 200, 64)).shape
        (torch.Size([4]), torch.Size([1, 200, 64]))
    """

    kind = "dala"
    config_class = layer_config = DALAConfig


class UCSAAttention(_FamilyAttention):
    """Unified Compressed Sparse Attention layer (``danon.functional.ucsa_attention``).

    Per query block, the near blocks (``local_window_size``), the global blocks
    (first ``global_tokens``) and the ``top_k_blocks`` best-scoring blocks (or
    ``ceil(sparsity_factor * blocks)``) are attended exactly; with ``compress``
    every other visible block through its mean. With
    ``local_window_size >= N`` it equals :class:`SelfAttention`.

    Args:
        hidden_size, num_heads, num_kv_heads, causal, bias, attention_dropout:
            as in :class:`SelfAttention`.
        local_window_size: near window in tokens (>= 0).
        global_tokens: leading tokens every query sees (>= 0).
        top_k_blocks: selected blocks per query block (>= 0).
        sparsity_factor: ``None`` or a fraction in (0, 1] replacing ``top_k_blocks``.
        compress: attend the remaining blocks through their means.
        block_size: power of two >= 16.

    Example:
        >>> import torch
        >>> from danon.nn import UCSAAttention
        >>> layer = UCSAAttention(64, 4, local_window_size=32, global_tokens=16, top_k_blocks=2, block_size=16)
        >>> layer(torch.randn(1, 200, 64)).shape
        torch.Size([1, 200, 64])
    """

    kind = "ucsa"
    config_class = layer_config = UCSAConfig


class HybridAttention(_DALAParts, _AttentionBase):
    """Per-head softmax gate over MSRA, DALA and UCSA (the ``SuperHybridConfig`` layer).

    The three families run on the same q/k/v projections; query head h mixes them
    as ``out_h = sum_m softmax(beta_h / T)_m * attn_m,h`` with ``beta`` a learnable
    [num_heads, 3] parameter (columns: msra, dala, ucsa; initialised to zeros, an
    even mix) and ``T = router_temperature``. The DALA part has its router and
    learnable ALiBi slopes as in :class:`DALAAttention` (the router gets no
    gradient: top-k routing is not differentiable).

    Args:
        hidden_size, num_heads, num_kv_heads, causal, bias, attention_dropout:
            as in :class:`SelfAttention`.
        window: near window of MSRA and DALA (tokens).
        num_levels, compression_factor: MSRA's.
        memory_size, decay, compress_rest, router_hidden_size: DALA's.
        local_window_size, global_tokens, top_k_blocks, sparsity_factor, compress: UCSA's.
        router_temperature: gate temperature T > 0.
        block_size: power of two >= 16, shared by the three families.

    Example:
        >>> import torch
        >>> from danon.nn import HybridAttention
        >>> layer = HybridAttention(64, 4, window=16, local_window_size=16, memory_size=16,
        ...                         global_tokens=16, top_k_blocks=2, block_size=16)
        >>> layer(torch.randn(1, 128, 64)).shape, layer.gate().shape
        (torch.Size([1, 128, 64]), torch.Size([4, 3]))
    """

    kind = "hybrid"
    config_class = layer_config = SuperHybridConfig
    families = tuple(c.family for c in SuperHybridConfig.composes)    # the gate's columns

    def _build(self, cfg) -> None:
        super()._build(cfg)
        self.router_temperature = float(cfg.router_temperature)
        self.beta = nn.Parameter(torch.zeros(self.num_heads, len(self.families)))

    def gate(self) -> torch.Tensor:
        """The per-head mixing weights ``softmax(beta / T)`` [num_heads, 3] (msra, dala, ucsa).

        Example:
            >>> from danon.nn import HybridAttention
            >>> HybridAttention(64, 4, block_size=16).gate()[0]
            tensor([0.3333, 0.3333, 0.3333], grad_fn=<SelectBackward0>)
        """
        return torch.softmax(self.beta / self.router_temperature, dim=-1)

    def _msra_kwargs(self):     # bench/quality/models.py reads the hybrid's family keywords under these names
        return self._family_kwargs("msra")

    def _ucsa_kwargs(self):
        return self._family_kwargs("ucsa")

    def _attend(self, q, k, v, kpm, hidden_states):
        return self._mix([self._run_family(kind, q, k, v, kpm, hidden_states) for kind in self.families], q)

    def _attend_cached(self, q, k, v, kpm, hidden_states, cache):
        return self._mix([self._run_family_cached(kind, q, k, v, kpm, hidden_states, cache)
                          for kind in self.families], q)

    def _mix(self, outs, q):
        g = self.gate().to(q.dtype)  # [H, 3]
        out = outs[0] * g[:, 0].view(1, -1, 1, 1)
        for m in range(1, len(outs)):
            out = out + outs[m] * g[:, m].view(1, -1, 1, 1)
        return out

    def _coverage(self, q, k, kpm, hidden_states):
        per_family = {kind: self._plan_coverage(kind, q, k, kpm, hidden_states) for kind in self.families}
        weights = self.gate().detach().float().mean(dim=0).tolist()  # mean gate over heads
        mixed = {
            key: sum(w * float(per_family[f][key]) for w, f in zip(weights, self.families))
            for key in ("exact", "summary", "skipped")
        }
        out = _coverage_dict(self.kind, mixed)
        out["families"] = {f: _coverage_dict(f, per_family[f]) for f in self.families}
        out["gate"] = dict(zip(self.families, weights))
        return out

    def extra_repr(self) -> str:
        # the three families' parameters would make the line unreadable: the gate's and the shared block size
        return super().extra_repr() + f", router_temperature={self.router_temperature}, block_size={self.block_size}"


_BY_FAMILY = {
    "dense": SelfAttention,
    "msra": MSRAAttention,
    "dala": DALAAttention,
    "ucsa": UCSAAttention,
    "hybrid": HybridAttention,
}


def attention_class_for(config: BaseConfig) -> type:
    """The attention layer class that a config builds (by its family).

    Example:
        >>> from danon.config import UCSAConfig
        >>> from danon.nn import attention_class_for
        >>> attention_class_for(UCSAConfig()).__name__
        'UCSAAttention'
    """
    if not isinstance(config, BaseConfig):
        raise TypeError(
            "config must be a danon config (DenseConfig, MSRAConfig, DALAConfig, UCSAConfig or "
            f"SuperHybridConfig), got {type(config).__name__}"
        )
    try:
        return _BY_FAMILY[config.family]
    except KeyError:
        raise ValueError(
            f"config of family {config.family!r} has no attention layer; use DenseConfig, MSRAConfig, "
            "DALAConfig, UCSAConfig or SuperHybridConfig"
        ) from None
