"""Which tokens of a sequence each rank holds under context parallelism: whole blocks, contiguous or load-balanced.

The sequence's key blocks (b tokens each, the last one possibly shorter) are cut into pieces of whole blocks,
as evenly as possible. Contiguous: R pieces, rank r holds piece r. Balanced (for causal masking, where later
queries see more keys): 2R pieces, rank r holds pieces r and 2R - 1 - r, so every rank holds as many early as
late queries (the order ring-flash-attention calls zigzag). A rank's local tokens are its pieces in order.
"""
from __future__ import annotations

import dataclasses
from typing import List, Tuple

import torch
from torch import Tensor

__all__ = ["SequenceLayout"]


@dataclasses.dataclass(frozen=True)
class SequenceLayout:
    """Token ranges of a sequence of `seq_len` tokens over `world_size` ranks, cut on `block_size` boundaries.

    Example:
        >>> layout = SequenceLayout(200, 2, 16)                  # 13 blocks: 7 on rank 0, 6 on rank 1
        >>> layout.segments(0), layout.segments(1)
        ([(0, 112)], [(112, 200)])
        >>> SequenceLayout(256, 2, 16, balanced=True).segments(0)  # pieces 0 and 3 of 4
        [(0, 64), (192, 256)]
    """

    seq_len: int
    world_size: int
    block_size: int
    balanced: bool = False

    def __post_init__(self):
        for name in ("seq_len", "world_size", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        pieces = self.num_pieces
        if self.num_blocks < pieces:
            raise ValueError(f"seq_len={self.seq_len} has {self.num_blocks} blocks of {self.block_size}, fewer than the "
                             f"{pieces} pieces a {'balanced' if self.balanced else 'contiguous'} split over "
                             f"{self.world_size} ranks needs: use a shorter block_size, fewer ranks or a longer sequence")

    @property
    def num_blocks(self) -> int:
        return -(-self.seq_len // self.block_size)

    @property
    def num_pieces(self) -> int:
        return 2 * self.world_size if self.balanced else self.world_size

    def _piece_blocks(self) -> List[Tuple[int, int]]:
        """[(first block, end block)] of every piece, the first pieces one block longer when they do not divide."""
        per, extra = divmod(self.num_blocks, self.num_pieces)
        bounds, start = [], 0
        for p in range(self.num_pieces):
            end = start + per + (1 if p < extra else 0)
            bounds.append((start, end))
            start = end
        return bounds

    def pieces_of(self, rank: int) -> List[int]:
        """The pieces rank `rank` holds, in local order."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in 0..{self.world_size - 1}, got {rank!r}")
        return [rank, 2 * self.world_size - 1 - rank] if self.balanced else [rank]

    def segments(self, rank: int) -> List[Tuple[int, int]]:
        """[(start, end)] token ranges rank `rank` holds, in local order."""
        bounds = self._piece_blocks()
        b = self.block_size
        return [(bounds[p][0] * b, min(bounds[p][1] * b, self.seq_len)) for p in self.pieces_of(rank)]

    def local_len(self, rank: int) -> int:
        return sum(end - start for start, end in self.segments(rank))

    def positions(self, rank: int, device=None) -> Tensor:
        """int64 [n_local]: the sequence positions of rank `rank`'s tokens, in local order.

        Example:
            >>> SequenceLayout(64, 2, 16, balanced=True).positions(1).tolist()[::8]
            [16, 24, 32, 40]
        """
        return torch.cat([torch.arange(s, e, device=device) for s, e in self.segments(rank)])

    def owners(self, positions: Tensor) -> Tuple[Tensor, Tensor]:
        """(rank, local row) of each position in `positions` (int64, any shape).

        Example:
            >>> layout = SequenceLayout(64, 2, 16, balanced=True)
            >>> [t.tolist() for t in layout.owners(torch.tensor([0, 20, 50]))]
            [[0, 1, 0], [0, 4, 18]]
        """
        starts, ranks, offsets = [], [], []
        for r in range(self.world_size):
            local = 0
            for s, e in self.segments(r):
                starts.append(s)
                ranks.append(r)
                offsets.append(local - s)
                local += e - s
        order = sorted(range(len(starts)), key=starts.__getitem__)
        dev = positions.device
        starts_t = torch.tensor([starts[i] for i in order], device=dev)
        seg = torch.searchsorted(starts_t, positions, right=True) - 1
        rank = torch.tensor([ranks[i] for i in order], device=dev)[seg]
        row = positions + torch.tensor([offsets[i] for i in order], device=dev)[seg]
        return rank, row

    def shard(self, x: Tensor, rank: int, dim: int = 1) -> Tensor:
        """Rank `rank`'s part of a full-sequence tensor `x` along `dim` (its segments, concatenated).

        Example:
            >>> ids = torch.arange(64)[None]
            >>> SequenceLayout(64, 2, 16, balanced=True).shard(ids, 1)[0, ::8].tolist()
            [16, 24, 32, 40]
        """
        if x.shape[dim] != self.seq_len:
            raise ValueError(f"x has {x.shape[dim]} positions along dim {dim}; the layout splits {self.seq_len}")
        return torch.cat([x.narrow(dim, s, e - s) for s, e in self.segments(rank)], dim)

    def unshard(self, parts: List[Tensor], dim: int = 1) -> Tensor:
        """The full-sequence tensor from every rank's part (`parts[r]` is rank r's), the inverse of `shard`.

        Example:
            >>> layout = SequenceLayout(64, 2, 16, balanced=True)
            >>> x = torch.randn(1, 64)
            >>> torch.equal(layout.unshard([layout.shard(x, r) for r in range(2)]), x)
            True
        """
        pieces = []
        for r, part in enumerate(parts):
            local = 0
            for s, e in self.segments(r):
                pieces.append((s, part.narrow(dim, local, e - s)))
                local += e - s
        return torch.cat([p for _, p in sorted(pieces, key=lambda item: item[0])], dim)
