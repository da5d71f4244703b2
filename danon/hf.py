"""danon inside transformers: `attn_implementation="danon"` for prefill and decode with a KV cache.

Importing this module registers, with transformers' `AttentionInterface` and `AttentionMaskInterface`:

- "danon": the family and keywords in `model.config.danon_attention` (a dict such as
  {"attention": "msra", "window": 256}; exact attention when the config has none);
- "danon-msra", "danon-ucsa", "danon-dala": that family with its default keywords (the config's
  `danon_attention` keywords still apply).

A family put into a pretrained model adds no positional bias it was not trained with: DALA runs with
decay="none" unless the keywords ask for "alibi" (danon.core.families.substitution_options).

`register(name, attention=..., **keywords)` adds more. The mask function hands the attention function
the key-padding mask only ([B, Nk] bool, or None without padding); causal masking comes from the layer,
aligned bottom-right (query i is position Nk - Nq + i), which is what a cache needs: the prefill, a
chunked prefill and each decode step give the rows a full-sequence call gives, in every family. Layers
that transformers makes sliding-window (Mistral, Gemma2's local layers) run the exact family's banded
plan; layers with a logit softcap (Gemma2) run exact attention, which the sparse plans cannot express;
below `min_seq_len` keys (default 0 here) a layer runs exact.

Example:
    >>> import torch, transformers, danon.hf
    >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                   num_attention_heads=4, num_key_value_heads=2)
    >>> config.danon_attention = {"attention": "msra", "block_size": 16, "window": 16}
    >>> model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="danon").eval()
    >>> model.generate(torch.randint(0, 64, (1, 40)), max_new_tokens=3, do_sample=False).shape
    torch.Size([1, 43])
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function

from danon.core.families import FAMILIES, family, substitution_options
from danon.cache import LAYER_KEYWORD, SparseCache
from danon import parallel
from danon.core.run import attention_site

__all__ = ["register", "attention_forward", "padding_mask", "REGISTERED", "SparseCache"]

# {registered name: (family or None for the config's, keywords)}
REGISTERED: Dict[str, tuple] = {}
# attention keywords some transformers models pass that change the logits or the softmax
_UNSUPPORTED = {"s_aux": "attention sinks", "sinks": "attention sinks", "position_bias": "additive position bias"}
_PROBE = 96   # positions on which a mask function is checked to be causal or a causal sliding window


def _layer_options(module: torch.nn.Module, name: str) -> Dict[str, Any]:
    """{"attention": family, "min_seq_len": int, **family keywords} for this layer under registered `name`."""
    fixed, keywords = REGISTERED[name]
    config = getattr(module, "config", None)
    options = dict(keywords)
    options.update(getattr(config, "danon_attention", None) or {})
    kind = options.pop("attention", None) if fixed is None else fixed
    if fixed is not None:
        options.pop("attention", None)
    return {"attention": kind or "exact", **options}


def _check_options(options: Dict[str, Any]) -> tuple:
    """(family, min_seq_len, family keywords), checked by the family's spec (its error names a bad keyword)."""
    options = dict(options)
    kind = options.pop("attention")
    min_seq_len = options.pop("min_seq_len", 0)
    if not isinstance(min_seq_len, int) or isinstance(min_seq_len, bool) or min_seq_len < 0:
        raise ValueError(f"danon_attention['min_seq_len'] must be an integer >= 0, got {min_seq_len!r}")
    spec = family(kind)
    unknown = set(options) - set(spec.names())
    if unknown:
        raise ValueError(f"danon_attention has keywords {sorted(unknown)} that {kind} does not take; its keywords "
                         f"are {', '.join(spec.names())}")
    spec(**options)
    # a family put into a pretrained model adds no positional bias it was not trained with
    return kind, min_seq_len, substitution_options(kind, options) if spec.sparse else options


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, sliding_window: Optional[int] = None,
                      softcap: Optional[float] = None, *, danon_name: str = "danon", **kwargs):
    """transformers' attention-function contract: q [B, H, Nq, D], k, v [B, Hkv, Nk, D] (after the cache update),
    attention_mask from `padding_mask`; returns (out [B, Nq, H, D], None).

    Example:
        >>> import torch, danon.hf
        >>> layer = torch.nn.Module()
        >>> q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 30, 8)      # a decode step after 29 cached tokens
        >>> attention_forward(layer, q, k, k, None, scaling=8 ** -0.5)[0].shape
        torch.Size([1, 1, 4, 8])
    """
    if dropout:
        raise ValueError(f"danon attention has no dropout inside attention (got dropout={dropout}); set the model's "
                         f"attention_dropout to 0 or call model.eval()")
    if kwargs.get("output_attentions"):
        raise ValueError("danon attention does not return attention weights (output_attentions=True); use "
                         "attn_implementation='eager' for them")
    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:   # terms the op has no argument for: refused, not dropped
            raise NotImplementedError(f"danon attention has no {_UNSUPPORTED[name]} ({name}=...); use "
                                      f"attn_implementation='sdpa' or 'eager' for this model")
    kind, min_seq_len, keywords = _check_options(_layer_options(module, danon_name))
    causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    if sliding_window is not None or softcap is not None:
        kind = "exact"          # a sliding-window layer is already local; a softcap no sparse plan expresses
    cp = parallel.active()
    if cp is not None:          # inside `with danon.context_parallel(...)`: this rank's tokens of one sequence
        return _context_parallel(cp, kind, min_seq_len, keywords, query, key, value, attention_mask, causal,
                                 scaling, sliding_window, softcap, kwargs), None
    layer_cache = kwargs.get(LAYER_KEYWORD)        # a danon.SparseCache's layer hands itself over
    if layer_cache is not None and kind != "exact" and causal:
        state = layer_cache.plan_state(kind, keywords)
        if key.shape[2] >= min_seq_len:
            out = state.attention(query, key, value, key_padding_mask=attention_mask, scale=scaling)
            return out.transpose(1, 2).contiguous(), None
        state.observe(query, key.shape[2])         # exact below min_seq_len; UCSA still needs the queries
    if kind == "ucsa" and query.shape[2] < key.shape[2] and key.shape[2] >= min_seq_len:
        raise NotImplementedError("ucsa after a cache selects with the queries before each call, which transformers' "
                                  "DynamicCache does not keep; pass cache=danon.SparseCache() (generate's or the "
                                  "model's `cache` argument), or use msra or dala")
    if kind == "exact":
        keywords = {}           # the exact path of attention_site takes no family keywords
    out = attention_site(query, key, value, family=kind, causal=causal, key_padding_mask=attention_mask,
                         sliding_window=sliding_window, scale=scaling, softcap=softcap, min_seq_len=min_seq_len,
                         **keywords)
    return out.transpose(1, 2).contiguous(), None


def _context_parallel(cp, kind, min_seq_len, keywords, query, key, value, key_padding_mask, causal, scaling,
                      sliding_window, softcap, kwargs):
    """One layer's attention with the sequence split across `cp`'s ranks: [B, n, H, D] of this rank's rows."""
    if kwargs.get(LAYER_KEYWORD) is not None or softcap is not None:
        raise NotImplementedError("danon.context_parallel runs one training or prefill sequence split across ranks: "
                                  "without a KV cache (use_cache=False) and without a logit softcap")
    if kind == "exact" or cp.layout.seq_len < min_seq_len:   # the choice by length is the whole sequence's
        kind, keywords = "exact", {"sliding_window": sliding_window}
    out = cp.attention(query, key, value, kind, causal=causal, key_padding_mask=key_padding_mask, scale=scaling,
                       **keywords)
    return out.transpose(1, 2).contiguous()


def _probe_mask_function(mask_function) -> Optional[int]:
    """None for causal masking; w for a causal sliding window of w; an error for anything else (packed sequences,
    bidirectional or chunked overlays), which the key-padding form cannot carry."""
    if mask_function is causal_mask_function:
        return None
    i = torch.arange(_PROBE)[:, None]
    j = torch.arange(_PROBE)[None, :]
    got = mask_function(torch.tensor(0), torch.tensor(0), i, j)
    got = torch.as_tensor(got, dtype=torch.bool).expand(_PROBE, _PROBE)
    window = int(got.sum(-1).max())
    if torch.equal(got, (j <= i) & (i - j < window)):
        return window if window < _PROBE else None
    raise NotImplementedError("danon attention takes causal or causal sliding-window masks with key padding; this "
                              "model's mask adds another pattern (packed sequences, a bidirectional or chunked "
                              "overlay). Use attn_implementation='sdpa' for it")


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function=causal_mask_function, attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """transformers' mask-function contract for "danon": the key-padding mask [B, kv_length] (True = attend) or None.

    The queries must be the last q_length of the kv_length keys (a dynamic cache: causal masking aligned
    bottom-right); a static cache's unfilled slots are refused, not silently attended.

    Example:
        >>> import torch
        >>> padding_mask(1, 1, 5, q_offset=4, attention_mask=torch.tensor([[0, 1, 1, 1, 1]])).tolist()
        [[False, True, True, True, True]]
    """
    if isinstance(q_offset, int) and isinstance(kv_offset, int) and isinstance(kv_length, int) \
            and q_offset + q_length != kv_offset + kv_length:
        raise NotImplementedError(f"danon attention needs the queries to be the last keys (a DynamicCache); this cache "
                                  f"holds {kv_length} key slots from position {kv_offset} for queries at "
                                  f"{q_offset}..{q_offset + q_length - 1} (a StaticCache?)")
    if not torch.compiler.is_compiling():   # an eager check of the pattern (under compile: taken as given)
        _probe_mask_function(mask_function)
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:].to(torch.bool)


def register(name: str, attention: Optional[str] = None, **keywords) -> str:
    """Register `name` as a transformers attention implementation running danon's family `attention` with
    `keywords` (None: the family in `model.config.danon_attention`, exact without one). Returns `name`.

    Example:
        >>> import danon.hf
        >>> danon.hf.register("danon-msra-wide", attention="msra", window=1024)
        'danon-msra-wide'
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if attention is not None:
        _check_options({"attention": attention, **keywords})
    REGISTERED[name] = (attention, dict(keywords))

    def forward(*args, **kwargs):
        return attention_forward(*args, danon_name=name, **kwargs)

    forward.__name__ = f"danon_attention_forward[{name}]"
    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, padding_mask)
    return name


register("danon")
for _kind in FAMILIES:
    if _kind != "exact":
        register(f"danon-{_kind}", attention=_kind)
