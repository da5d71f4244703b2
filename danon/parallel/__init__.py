"""Context parallelism: one sequence split across the ranks of a process group (docs/context_parallel.md).

`danon.context_parallel(seq_len, group=...)` describes the split and runs danon's attention families on it:
each rank holds whole blocks of the sequence (contiguous pieces, or a load-balanced order for causal masking)
and receives only what its queries attend to from the others: the near window's halo, the block summaries,
and the selected blocks or routed tokens. Inside `with cp:` the danon attention layers run this way, so a
model trains with its sequence split (positions from `cp.positions()`).
"""
from __future__ import annotations

import contextlib
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from danon.core.sequence_split import split_scope

from .attention import context_parallel_attention
from .exchange import Exchange
from .layout import SequenceLayout

__all__ = ["ContextParallel", "context_parallel", "active", "one_rank_group", "SequenceLayout",
           "context_parallel_attention"]

# The `with cp:` scopes of this process. Process-wide, not per thread: autograd runs a CUDA backward (and so a
# checkpointed layer's recompute) on its own threads, and a process belongs to one context-parallel group anyway.
_ACTIVE: List["ContextParallel"] = []


class ContextParallel:
    """A sequence of `seq_len` tokens split over the ranks of `group` (default: the world), in whole blocks of
    `block_size` tokens (a multiple of the attention's block size); balanced=True gives every rank an early and a
    late piece, which evens out causal attention's work.

    Example (one rank; tests/parallel runs 2 and 4):
        >>> import torch, danon
        >>> q = torch.randn(1, 2, 256, 8)
        >>> with one_rank_group():
        ...     cp = danon.context_parallel(256, block_size=16, balanced=True)
        ...     local = cp.shard(q, dim=2)
        ...     out = cp.attention(local, local, local, "dala", causal=True, block_size=16, window=32, memory_size=8)
        >>> out.shape, cp.positions()[:3].tolist()
        (torch.Size([1, 2, 256, 8]), [0, 1, 2])
    """

    def __init__(self, seq_len: int, *, group: Optional[dist.ProcessGroup] = None, block_size: int = 64,
                 balanced: bool = False):
        if not dist.is_initialized():
            raise RuntimeError("danon.context_parallel needs an initialised process group "
                               "(torch.distributed.init_process_group('gloo' on CPU, 'nccl' on CUDA))")
        self.exchange = Exchange(group)
        self.rank, self.world_size = self.exchange.rank, self.exchange.world_size
        self.layout = SequenceLayout(seq_len, self.world_size, block_size, bool(balanced))

    def shard(self, x: Tensor, dim: int = 1) -> Tensor:
        """This rank's tokens of a full-sequence tensor (input ids [B, N]: dim 1; q [B, H, N, D]: dim 2)."""
        return self.layout.shard(x, self.rank, dim)

    def unshard(self, x: Tensor, dim: int = 1) -> Tensor:
        """The full-sequence tensor from every rank's part along `dim` (an all-gather; no gradient)."""
        longest = max(self.layout.local_len(r) for r in range(self.world_size))
        shape = list(x.shape)
        shape[dim] = longest - x.shape[dim]
        padded = torch.cat([x.detach(), x.new_zeros(shape)], dim).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.exchange.group)
        return self.layout.unshard([p.narrow(dim, 0, self.layout.local_len(r)) for r, p in enumerate(parts)], dim)

    def positions(self, device=None) -> Tensor:
        """int64 [n_local]: the sequence positions of this rank's tokens (a model's position ids)."""
        return self.layout.positions(self.rank, device)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, kind: str = "exact", **keywords) -> Tensor:
        """danon.attention on this rank's tokens: `context_parallel_attention`."""
        return context_parallel_attention(self, q, k, v, kind, **keywords)

    def reduce_gradients(self, module: torch.nn.Module) -> None:
        """Sum every parameter's gradient over the ranks (each rank's loss covers its own tokens only); a
        tensor-parallel parameter's (a DTensor, danon.shard) is summed shard by shard over this group."""
        for p in module.parameters():
            if p.grad is not None:
                grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                dist.all_reduce(grad, group=self.exchange.group)

    def bytes_sent(self, backward: bool = True) -> int:
        """Bytes this rank has sent to other ranks so far (with backward: the gradients the backward sends too)."""
        return sum(self.exchange.sent.values()) + (sum(self.exchange.sent_backward.values()) if backward else 0)

    def __enter__(self):
        _ACTIVE.append(self)
        self._scope = split_scope()
        self._scope.__enter__()
        return self

    def __exit__(self, *exc):
        _ACTIVE.pop()
        self._scope.__exit__(*exc)
        return False


def context_parallel(seq_len: int, *, group: Optional[dist.ProcessGroup] = None, block_size: int = 64,
                     balanced: bool = False) -> ContextParallel:
    """Split a sequence of `seq_len` tokens over `group`'s ranks: see `ContextParallel`.

    Example:
        >>> import danon
        >>> with one_rank_group():
        ...     danon.context_parallel(1000, block_size=64).layout.segments(0)
        [(0, 1000)]
    """
    return ContextParallel(seq_len, group=group, block_size=block_size, balanced=balanced)


def active() -> Optional[ContextParallel]:
    """The innermost `with cp:` of this process, or None (danon.attention then runs in one process).

    Example:
        >>> active() is None
        True
    """
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def one_rank_group():
    """A gloo process group of this process alone, destroyed on exit: context parallelism over one rank (examples,
    and code that runs the same way with one rank or several).

    Example:
        >>> import torch.distributed as dist
        >>> with one_rank_group():
        ...     dist.get_world_size()
        1
        >>> dist.is_initialized()
        False
    """
    if dist.is_initialized():
        raise RuntimeError("one_rank_group: a default process group is already initialised; use it instead")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
