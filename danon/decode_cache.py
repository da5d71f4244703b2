"""DecodeCache: incremental decoding for danon's own models (the factories' DanonLanguageModel).

`model(input_ids, cache=cache)` appends the new tokens' keys and values to each layer's cache and attends the
new queries to everything so far (causal, aligned bottom-right): a prefill, chunks and single-token steps give
the logits of one full forward. Decode steps of a sparse family run from the plan state kept per layer
(danon/core/stream.py), reading the near keys and the summaries, not every key; the dense layer runs exact
attention over the cache. transformers models use `danon.SparseCache` instead (danon/cache.py).

Example:
    >>> import torch, danon
    >>> model = danon.create_msra_model(hidden_size=32, num_heads=2, num_layers=1, vocab_size=50, block_size=16,
    ...                                 window=16).eval()
    >>> ids = torch.randint(0, 50, (1, 40))
    >>> cache = danon.DecodeCache()
    >>> with torch.no_grad():
    ...     steps = [model(ids[:, :30], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(30, 40)]
    ...     full = model(ids)
    >>> bool((torch.cat(steps, 1) - full).abs().max() < 1e-5), cache.length, cache.local_calls()
    (True, 40, 10)
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

from danon.core.stream import PlanState, Rows, state_for

__all__ = ["DecodeCache", "LayerCache"]


class LayerCache:
    """One attention layer's keys, values, key mask and (DALA) importance so far, and its plan states.

    Example:
        >>> layer = LayerCache()
        >>> k, v, mask = layer.append(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), None)
        >>> k.shape, mask.shape
        (torch.Size([1, 2, 5, 8]), torch.Size([1, 5]))
    """

    def __init__(self):
        self.keys, self.values, self.mask, self.importance = Rows(2), Rows(2), Rows(1), Rows(2)
        self.states: Dict[tuple, PlanState] = {}

    @property
    def length(self) -> int:
        return self.keys.length

    def append(self, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor]) -> tuple:
        """Append the new tokens' k, v [B, Hkv, N, D] and mask [B, N] (None: all real); returns everything so far."""
        if self.length and self.keys.view().shape[0] != k.shape[0]:
            raise ValueError(f"this cache holds a batch of {self.keys.view().shape[0]} sequences; the call has "
                             f"{k.shape[0]} (start a new DecodeCache for a new batch)")
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # the buffers are written in place by later calls, which autograd's saved tensors cannot survive
            raise NotImplementedError("DecodeCache is for inference: run the model under torch.no_grad(); to train "
                                      "on a sequence, run the model on the whole of it")
        mask = key_padding_mask if key_padding_mask is not None else \
            torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
        for rows, new in ((self.keys, k), (self.values, v), (self.mask, mask)):
            rows.append(new)
        return self.keys.view(), self.values.view(), self.mask.view()

    def append_importance(self, importance: Tensor) -> Tensor:
        """DALA's router scores of the new tokens [B, Hkv, N]; returns those of every token so far."""
        self.importance.append(importance)
        return self.importance.view()

    def plan_state(self, kind: str, params: dict) -> PlanState:
        """The plan state of family `kind` with `params` in this layer (made on first use)."""
        return state_for(self.states, kind, params)


class DecodeCache:
    """A DanonLanguageModel's cache: one LayerCache per attention layer, filled by `model(ids, cache=cache)`.

    `attention_mask` passed with each call marks that call's tokens (1 = real, 0 = padding); the cache keeps
    the mask of every token so far. Positions continue from `length`.

    Example:
        >>> cache = DecodeCache()
        >>> cache.length, cache.kv_bytes(), cache.summary_bytes()
        (0, 0, 0)
    """

    def __init__(self):
        self.layers: List[LayerCache] = []

    def layer(self, index: int) -> LayerCache:
        while len(self.layers) <= index:
            self.layers.append(LayerCache())
        return self.layers[index]

    @property
    def length(self) -> int:
        """Tokens cached so far (the next token's position)."""
        return self.layers[0].length if self.layers else 0

    def kv_bytes(self) -> int:
        """Bytes of the key and value buffers (at their capacity)."""
        return sum(layer.keys.nbytes() + layer.values.nbytes() for layer in self.layers)

    def summary_bytes(self) -> int:
        """Bytes of the plan states: the memory kept beyond keys and values."""
        return sum(state.nbytes() for layer in self.layers for state in layer.states.values())

    def local_calls(self) -> int:
        """Attention calls run from a plan state (decode steps that did not read every key), over all layers."""
        return sum(state.local_calls for layer in self.layers for state in layer.states.values())
