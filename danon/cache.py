"""SparseCache: a transformers KV cache that also keeps each sparse family's plan state (danon/core/stream.py).

With `attn_implementation="danon"` (danon.hf) and this cache, a decode step of MSRA, UCSA or DALA reads the
near keys, the listed blocks or routed tokens and O(N / b) summaries, not all N cached keys, and gives the
numbers of one full-sequence call. Keys and values are kept in buffers that grow by doubling, so a step
appends its key in place instead of copying the whole cache (as DynamicCache's torch.cat does).

    cache = danon.SparseCache()
    model.generate(input_ids, attention_mask=mask, cache=cache, max_new_tokens=64)
    cache.summary_bytes(), cache.kv_bytes()          # the plan state's memory, the keys' and values'

Example:
    >>> import torch, transformers, danon.hf
    >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                   num_attention_heads=4, num_key_value_heads=2)
    >>> config.danon_attention = {"attention": "ucsa", "block_size": 16, "local_window_size": 16, "top_k_blocks": 1}
    >>> model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="danon").eval()
    >>> cache = SparseCache()
    >>> model.generate(torch.randint(0, 64, (1, 40)), max_new_tokens=3, do_sample=False, cache=cache).shape
    torch.Size([1, 43])
    >>> cache.summary_bytes() > 0, cache.local_calls()
    (True, 2)
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from transformers.cache_utils import Cache, DynamicLayer

from danon.core.stream import PlanState, Rows, state_for

__all__ = ["SparseCache", "SparseLayer"]

# the key under which a layer hands itself to the attention function: transformers' attention modules pass
# their keyword dict to cache.update(..., kwargs=kwargs) and then spread the same dict into the attention call
LAYER_KEYWORD = "danon_cache_layer"


class SparseLayer(DynamicLayer):
    """One layer's keys and values (growing buffers) and the plan states of the families attending to them.

    Example:
        >>> layer = SparseLayer()
        >>> keys, values = layer.update(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))
        >>> keys.shape, layer.get_seq_length()
        (torch.Size([1, 2, 5, 8]), 5)
    """

    is_croppable = False     # the plan states follow a sequence that only grows

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
        self.buffers = (Rows(2), Rows(2))
        self.states: Dict[tuple, PlanState] = {}
        self.is_initialized = True

    # Python bookkeeping on growing buffers: compiled models run it eagerly (a graph break), not traced per length
    @torch.compiler.disable
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.buffers is not None and torch.is_grad_enabled() and \
                (key_states.requires_grad or value_states.requires_grad):
            # training through the cache: autograd keeps the returned keys, which a later in-place append into
            # the buffer would invalidate; from here on the layer concatenates, as DynamicLayer does
            self.buffers = None
        if self.buffers is None:
            grown = [new if self.get_seq_length() == 0 else torch.cat([old, new], -2)
                     for old, new in ((self.keys, key_states), (self.values, value_states))]
            self.keys, self.values = grown
        else:
            for rows, new in zip(self.buffers, (key_states, value_states)):
                rows.append(new)
            self.keys, self.values = (rows.view() for rows in self.buffers)
        hand_over = kwargs.get("kwargs")
        if isinstance(hand_over, dict):
            hand_over[LAYER_KEYWORD] = self
        return self.keys, self.values

    def plan_state(self, kind: str, keywords: dict) -> PlanState:
        """The state of family `kind` with `keywords` for this layer (made on first use)."""
        return state_for(self.states, kind, keywords)

    def _select(self, index: torch.Tensor) -> None:
        if self.get_seq_length() == 0:
            return
        for state in self.states.values():
            state.select_batch(index)
        if self.buffers is None:
            self.keys, self.values = (x.index_select(0, index.to(x.device)) for x in (self.keys, self.values))
            return
        for rows in self.buffers:
            rows.select_batch(index)
        self.keys, self.values = (rows.view() for rows in self.buffers)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length():
            self._select(torch.arange(self.keys.shape[0], device=self.device).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("danon.SparseCache cannot be cropped (its plan states follow a sequence that "
                                      "only grows); use a DynamicCache for assisted or speculative decoding")

    def reset(self) -> None:
        self.keys = self.values = None
        self.buffers, self.states = None, {}
        self.is_initialized = False

    def summary_bytes(self) -> int:
        return sum(state.nbytes() for state in getattr(self, "states", {}).values())

    def kv_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        if self.buffers is None:
            return sum(x.numel() * x.element_size() for x in (self.keys, self.values))
        return sum(rows.nbytes() for rows in self.buffers)


class SparseCache(Cache):
    """A transformers `Cache` whose layers keep danon's plan states beside the keys and values.

    Pass it as generate's or forward's `cache` with a model run under `attn_implementation="danon"` (or
    "danon-msra", ...): decode steps of a sparse family then run from the state (danon/core/stream.py).
    Under another attention implementation it is a plain KV cache.

    Example:
        >>> cache = SparseCache()
        >>> keys, _ = cache.update(torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8), 0)
        >>> cache.get_seq_length(), cache.kv_bytes() > 0, cache.summary_bytes()
        (7, True, 0)
    """

    def __init__(self, config: Optional[object] = None):
        # config: taken, and unused, so that code that builds DynamicCache(config=...) builds this one alike; every
        # layer keeps all its keys (a sliding-window layer too: danon.hf runs it as exact banded attention)
        super().__init__(layer_class_to_replicate=SparseLayer)

    def summary_bytes(self) -> int:
        """Bytes of every layer's plan states (block sums, UCSA's queries, DALA's routed lists): the extra memory."""
        return sum(layer.summary_bytes() for layer in self.layers)

    def kv_bytes(self) -> int:
        """Bytes of the key and value buffers (at their capacity)."""
        return sum(layer.kv_bytes() for layer in self.layers)

    def local_calls(self) -> int:
        """Attention calls run from a plan state (decode steps that did not read every key), over all layers."""
        return sum(state.local_calls for layer in self.layers for state in getattr(layer, "states", {}).values())
