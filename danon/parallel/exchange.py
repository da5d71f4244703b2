"""The collectives context parallelism runs, each counted in bytes sent per rank.

Only torch.distributed collectives: the functional collectives with autograd (all-gather, all-to-all), whose
backward sends the matching gradients back (a reduce-scatter, the reverse all-to-all), and plain
`all_to_all_single` for the integer requests. No hand-written transport.
"""
from __future__ import annotations

import collections
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from danon.core.torch_internals import all_gather_autograd, all_to_all_autograd

__all__ = ["Exchange"]


class Exchange:
    """Collectives over one process group, with the bytes each call sends to other ranks.

    `sent` holds, per purpose, the bytes this rank sent in the forward; `sent_backward` what the backward of
    the differentiable ones will send, counted when the forward runs: an all-gather's backward (a
    reduce-scatter) sends as much as its forward, a fetch's backward sends the gradients of the rows this rank
    received, back to their owners.

    Example (a group of one rank: every row comes from this rank, nothing is sent):
        >>> import torch
        >>> from danon.parallel import one_rank_group
        >>> with one_rank_group():
        ...     ex = Exchange(None)
        ...     rows = ex.fetch(torch.tensor([2, 0]), torch.tensor([0, 0]), lambda ids: torch.arange(4.0)[ids, None],
        ...                     "demo")
        >>> rows.flatten().tolist(), dict(ex.sent)
        ([2.0, 0.0], {'demo requests': 0, 'demo': 0})
    """

    def __init__(self, group: Optional[dist.ProcessGroup]):
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.sent: Dict[str, int] = collections.Counter()
        self.sent_backward: Dict[str, int] = collections.Counter()

    def _count(self, purpose: str, nbytes: int, differentiable: bool) -> None:
        self.sent[purpose] += int(nbytes)
        if differentiable:
            self.sent_backward[purpose] += int(nbytes)

    def all_gather(self, x: Tensor, purpose: str) -> List[Tensor]:
        """Every rank's `x` (same shape on every rank), differentiable when x requires grad."""
        differentiable = x.requires_grad
        self._count(purpose, x.numel() * x.element_size() * (self.world_size - 1), differentiable)
        if differentiable:
            full = all_gather_autograd(x, self.group)
            return list(full.chunk(self.world_size, 0))
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return parts

    def any_rank(self, flag: bool, device=None) -> bool:
        """Whether `flag` holds on any rank of the group (an all-reduce of one integer on `device`)."""
        x = torch.tensor([int(bool(flag))], device=device)
        if self.world_size > 1:
            self._count("flags", x.element_size() * (self.world_size - 1), False)
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return bool(x.item())

    def _all_to_all_ints(self, x: Tensor, send_counts: List[int], recv_counts: List[int]) -> Tensor:
        out = x.new_empty(sum(recv_counts))
        dist.all_to_all_single(out, x, recv_counts, send_counts, group=self.group)
        return out

    def fetch(self, want: Tensor, owner: Tensor, serve, purpose: str) -> Tensor:
        """Rows from other ranks: `want` int64 [M] request ids, `owner` [M] the rank that holds each; `serve(ids)`
        returns the rows [len(ids), W] this rank holds for the ids other ranks ask it for (differentiable).
        Returns [M, W] in `want`'s order; the rows' gradients go back to their owners in the backward.
        """
        order = torch.argsort(owner, stable=True)
        send_ids = want[order]
        counts = torch.bincount(owner, minlength=self.world_size)
        recv_counts_t = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts_t, counts, group=self.group)
        asked, answered = counts.tolist(), recv_counts_t.tolist()      # asked of each rank, asked by each rank
        ids_for_me = self._all_to_all_ints(send_ids, asked, answered)
        rows = serve(ids_for_me)
        others = sum(n for r, n in enumerate(asked) if r != self.rank)
        self._count(purpose + " requests", others * send_ids.element_size(), False)
        row_bytes = rows.shape[-1] * rows.element_size()
        self._count(purpose, sum(n for r, n in enumerate(answered) if r != self.rank) * row_bytes, False)
        if rows.requires_grad:   # the backward sends the gradients of the rows this rank received to their owners
            self.sent_backward[purpose] += sum(n for r, n in enumerate(asked) if r != self.rank) * row_bytes
        got = all_to_all_autograd(rows, asked, answered, self.group)
        return got.index_select(0, torch.argsort(order))     # got[i] answers want[order[i]]
