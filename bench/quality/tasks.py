"""Synthetic tasks, generated on the fly: causal-LM inputs plus targets on the answer positions only.

Every generator returns ``(input_ids, targets)``, both int64 ``[B, N]``; ``targets`` is
``IGNORE`` (-100, the ``F.cross_entropy`` default) everywhere except where the next token is an
answer, and there it holds that next token (the usual shifted-by-one LM target).

The vocabulary is shared by all tasks (``VOCAB_SIZE`` ids):

- ``FILLER``: 16 ids of noise between the things that matter;
- ``KEYS``: 32 ids used as keys (MQAR, needle) ;
- ``VALUES``: 32 ids used as values; keys and values never collide with filler.

Example:
    >>> import torch
    >>> from bench.quality.tasks import mqar
    >>> x, y = mqar(2, 64, num_pairs=4, generator=torch.Generator().manual_seed(0))
    >>> x.shape, int((y != IGNORE).sum())
    (torch.Size([2, 64]), 8)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

IGNORE = -100
FILLER = range(1, 17)
KEYS = range(17, 49)
VALUES = range(49, 81)
VOCAB_SIZE = 96  # 81 ids in use, rounded up

__all__ = ["IGNORE", "FILLER", "KEYS", "VALUES", "VOCAB_SIZE", "mqar", "needle", "local_copy", "TASKS", "make_batch"]


def _gen(generator: Optional[torch.Generator]) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(0)


def _filler(batch: int, n: int, g: torch.Generator) -> Tensor:
    return torch.randint(FILLER.start, FILLER.stop, (batch, n), generator=g)


def _check(name: str, n: int, minimum: int) -> None:
    if not isinstance(n, int) or n < minimum:
        raise ValueError(f"{name}: seq_len must be an int >= {minimum}, got {n!r}")


def mqar(batch: int, seq_len: int, *, num_pairs: int = 4, generator: Optional[torch.Generator] = None
         ) -> Tuple[Tensor, Tensor]:
    """Multi-query associative recall (Zoology): ``num_pairs`` key-value pairs at the start, each key
    queried once, in random order, at random positions in the second half of the sequence.

    Layout: ``k1 v1 k2 v2 ... | filler | ... q v ... q v ...``, where a query ``q`` is a key
    from the start and the token after it is that key's value. The target is set at the query
    positions (predict the value). Keys within a sequence are distinct; each is queried
    exactly once, so the only source of the answer is the pair at the start (never an earlier
    query's answer). Queries sit at even offsets in [N/2, N - 1) so that no two overlap.

    Example:
        >>> import torch
        >>> x, y = mqar(1, 32, num_pairs=2, generator=torch.Generator().manual_seed(1))
        >>> pos = (y[0] != IGNORE).nonzero().flatten().tolist()
        >>> [int(x[0, p + 1]) == int(y[0, p]) for p in pos]  # the answer follows the query
        [True, True]
    """
    if not isinstance(num_pairs, int) or not 1 <= num_pairs <= len(KEYS):
        raise ValueError(f"mqar: num_pairs must be an int in [1, {len(KEYS)}], got {num_pairs!r}")
    _check("mqar", seq_len, 8 * num_pairs)
    g = _gen(generator)
    x = _filler(batch, seq_len, g)
    y = torch.full((batch, seq_len), IGNORE, dtype=torch.long)
    half = seq_len // 2
    slots = (seq_len - 1 - half) // 2          # query slots at half, half + 2, ...
    for i in range(batch):
        keys = torch.randperm(len(KEYS), generator=g)[:num_pairs] + KEYS.start
        vals = torch.randint(VALUES.start, VALUES.stop, (num_pairs,), generator=g)
        x[i, 0:2 * num_pairs:2] = keys
        x[i, 1:2 * num_pairs:2] = vals
        order = torch.randperm(num_pairs, generator=g)
        qpos = half + 2 * torch.randperm(slots, generator=g)[:num_pairs]
        x[i, qpos] = keys[order]
        x[i, qpos + 1] = vals[order]
        y[i, qpos] = vals[order]
    return x, y


def needle(batch: int, seq_len: int, *, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """Needle retrieval: one key-value pair at a random depth in filler; the key again at position
    N - 2 asks for the value (target at N - 2).

    The needle's position is uniform in [0, 3N/4 - 2), so it is always at least N/4 tokens before
    the question (outside every local window used in this benchmark).

    Example:
        >>> import torch
        >>> x, y = needle(3, 64, generator=torch.Generator().manual_seed(0))
        >>> bool((x[:, :48] == x[:, -2:-1]).any(-1).all()), bool((y[:, -2] == x[:, -1]).all())
        (True, True)
    """
    _check("needle", seq_len, 16)
    g = _gen(generator)
    x = _filler(batch, seq_len, g)
    y = torch.full((batch, seq_len), IGNORE, dtype=torch.long)
    key = torch.randint(KEYS.start, KEYS.stop, (batch,), generator=g)
    val = torch.randint(VALUES.start, VALUES.stop, (batch,), generator=g)
    depth = torch.randint(0, 3 * seq_len // 4 - 2, (batch,), generator=g)
    rows = torch.arange(batch)
    x[rows, depth] = key
    x[rows, depth + 1] = val
    x[:, -2] = key
    x[:, -1] = val
    y[:, -2] = val
    return x, y


def local_copy(batch: int, seq_len: int, *, span: int = 8, generator: Optional[torch.Generator] = None
               ) -> Tuple[Tensor, Tensor]:
    """Local control: segments of ``span`` random key/value tokens, each followed by a copy of itself.

    ``a1..a8 a1..a8 b1..b8 b1..b8 ...``: every token of a copy is the token ``span`` positions
    back, so a window of ``span`` tokens suffices. Targets: every position whose next token is in
    a copy.

    Example:
        >>> import torch
        >>> x, y = local_copy(1, 32, span=4, generator=torch.Generator().manual_seed(0))
        >>> bool((x[0, 4:8] == x[0, 0:4]).all()), int((y != IGNORE).sum())
        (True, 16)
    """
    if not isinstance(span, int) or span < 1:
        raise ValueError(f"local_copy: span must be an int >= 1, got {span!r}")
    _check("local_copy", seq_len, 2 * span)
    g = _gen(generator)
    pairs = -(-seq_len // (2 * span))
    seg = torch.randint(KEYS.start, VALUES.stop, (batch, pairs, 1, span), generator=g)
    x = seg.expand(-1, -1, 2, -1).reshape(batch, -1)[:, :seq_len].contiguous()
    is_copy = (torch.arange(seq_len) // span) % 2 == 1          # positions inside a copy
    y = torch.full((batch, seq_len), IGNORE, dtype=torch.long)
    answer = is_copy[1:]                                        # the next token is in a copy
    y[:, :-1] = torch.where(answer, x[:, 1:], torch.full_like(x[:, 1:], IGNORE))
    return x, y


TASKS = {"mqar": mqar, "needle": needle, "copy": local_copy}


def make_batch(task: str, batch: int, seq_len: int, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """One batch of the task called ``task`` (``"mqar"``, ``"needle"`` or ``"copy"``).

    Example:
        >>> import torch
        >>> make_batch("copy", 2, 32, torch.Generator().manual_seed(0))[0].shape
        torch.Size([2, 32])
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(map(repr, TASKS))}, got {task!r}")
    return TASKS[task](batch, seq_len, generator=generator)
