"""Block-level building pieces shared by the plan builders (ordinary, vectorised torch ops).

Everything here is O(N/b) work per query block and free of data-dependent shapes, so that
Inductor and the ONNX exporter can compile plan building together with the model.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .dtypes import accumulation_dtype


def num_blocks(n: int, b: int) -> int:
    # (n + b - 1) // b, not -(-n // b): Inductor's value ranges of the negated floor division of a
    # symbolic size come out empty ([0:-1]) and its codegen fails under dynamic shapes.
    return (n + b - 1) // b


def window_blocks(window: int, b: int) -> int:
    """A window of w tokens rounded up to W = ceil(w / b) blocks."""
    return -(-window // b)


def summary_dtype(x: Tensor) -> torch.dtype:
    """Means and scores are accumulated in fp32 (fp64 for fp64 inputs)."""
    return accumulation_dtype(x.dtype)


def query_layout(nq: int, nk: int, b: int) -> tuple:
    """(pad, first, count) of a call's query rows: row i sits at absolute position Nk - Nq + i (causal masking
    aligned bottom-right, as FlashAttention and transformers' caches align it: queries after a cache). Laid out
    in whole blocks with `pad` rows before row 0, local query block t is absolute block `first` + t, and there
    are `count` of them. Self-attention (Nq = Nk) is (0, 0, ceil(N / b)). The one definition: the builders,
    the plan's sizes and every executor read it.

    Example:
        >>> query_layout(64, 64, 16), query_layout(1, 70, 16), query_layout(20, 70, 16)
        ((0, 0, 4), (5, 4, 1), (2, 3, 2))
    """
    offset = nk - nq
    pad, first = offset % b, offset // b
    return pad, first, num_blocks(nq + pad, b)


def causal_visible(nq: int, nk: int, device) -> Tensor:
    """Bool [Nq, Nk]: key j is visible to query row i under causal masking aligned bottom-right (j <= Nk - Nq + i).

    Example:
        >>> causal_visible(2, 3, "cpu").int().tolist()
        [[1, 1, 0], [1, 1, 1]]
    """
    return torch.arange(nk, device=device)[None, :] <= torch.arange(nq, device=device)[:, None] + (nk - nq)


def key_visibility(kpm: Optional[Tensor], batch: int, nk: int, b: int, device) -> Tensor:
    """Float [B, Tk*b]: 1 for a real, visible key, 0 for padding or positions past Nk."""
    tk = num_blocks(nk, b)
    if kpm is None:
        vis = torch.ones(batch, nk, device=device)
    else:
        vis = kpm.to(torch.float32)
    return F.pad(vis, (0, tk * b - nk))


def rows_without_keys(q: Tensor, k: Tensor, key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor],
                      causal: bool) -> Optional[Tensor]:
    """Bool [B, H|1, Nq]: the query rows of a dense attention call that see no key (their output is 0, their lse
    -inf), or None when the masks cannot hide a whole row. No size comparison: exports trace it with symbolic
    lengths. Key padding alone costs O(B * N) (a running count), a general mask O(B * H * Nq * Nk) like the
    attention itself.

    Example:
        >>> import torch
        >>> q = torch.randn(1, 1, 3, 4)
        >>> rows_without_keys(q, q, torch.tensor([[False, True, True]]), None, causal=True)
        tensor([[[ True, False, False]]])
    """
    B, H, nq = q.shape[:3]
    nk = k.shape[2]
    if attn_mask is not None:
        ok = attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf")
        ok = ok.expand(B, H, nq, nk)
        if key_padding_mask is not None:
            ok = ok & key_padding_mask.bool()[:, None, None, :]
        if causal:
            ok = ok & causal_visible(nq, nk, q.device)
        return ~ok.any(-1)
    if key_padding_mask is None:   # causal with Nq > Nk: the first Nq - Nk rows come before every key
        if not causal or (isinstance(nq, int) and isinstance(nk, int) and nq <= nk):
            return None
        return (torch.arange(nq, device=q.device) < nq - nk)[None, None]
    kpm = key_padding_mask.bool()
    if causal:   # row i sees keys j <= Nk - Nq + i: dead while no visible key has been seen yet
        seen = F.pad(kpm.to(torch.int32).cumsum(-1), (1, 0))      # seen[:, m]: visible keys among the first m
        last = (torch.arange(nq, device=q.device) + (nk - nq + 1)).clamp(min=0, max=nk)
        return (seen[:, last] == 0)[:, None, :]
    return (~kpm.any(-1))[:, None, None].expand(B, 1, nq)


def block_counts(visible: Tensor, b: int) -> Tensor:
    """Visible keys per block: [B, Tk*b] -> [B, Tk]."""
    return visible.view(visible.shape[0], -1, b).sum(-1)


def pad_rows(x: Tensor, rows: int) -> Tensor:
    """x [..., N, D] zero-padded to `rows` rows along dim -2.

    Pads (by 0 too) under symbolic sizes: a branch on N would guard dynamic shapes to one length. A concrete N
    that already is `rows` skips the copy, which costs as much as a pass over x (fresh pages at N = 16k).
    """
    n = x.shape[-2]
    return x if isinstance(n, int) and n == rows else F.pad(x, (0, 0, 0, rows - n))


def block_sums(x: Tensor, visible: Tensor, b: int, masked: bool = True) -> Tensor:
    """Sum of the visible rows of x per block: x [B, Hkv, N, D] -> [B, Hkv, Tk, D] in fp32/fp64.

    masked=False skips the padding multiply when every key is visible (positions past N are zero-padded).
    """
    B, Hkv, n, D = x.shape
    tk = visible.shape[-1] // b
    xs = pad_rows(x.to(summary_dtype(x)), tk * b)
    if masked:
        xs = xs * visible[:, None, :, None].to(xs.dtype)
    return xs.reshape(B, Hkv, tk, b, D).sum(-2)


def block_sums_backward(grad: Tensor, visible: Tensor, b: int, n: int) -> Tensor:
    """The adjoint of `block_sums`: per-block gradients [B, Hkv, Tk, D] -> [B, Hkv, N, D], each block's row
    times its keys' visibility [B, Tk*b]; one fresh tensor (what the closed-form summary backwards build on).

    Example:
        >>> import torch
        >>> block_sums_backward(torch.ones(1, 1, 2, 1), torch.tensor([[1.0, 0.0, 1.0, 1.0]]), 2, 3).flatten().tolist()
        [1.0, 0.0, 1.0]
    """
    B, Hkv, tk, D = grad.shape
    spread = grad[:, :, :, None, :] * visible.to(grad.dtype).view(visible.shape[0], 1, tk, b, 1)
    return spread.view(B, Hkv, tk * b, D)[:, :, :n]


def near_blocks(tq: int, tk: int, w_blocks: int, causal: bool, device, first: int = 0) -> Tensor:
    """Bool [Tq, Tk]: key block t is near query block t_q (|t - t_q| <= W; causal t_q - W <= t <= t_q), for the
    absolute query blocks first .. first + Tq - 1 (`query_layout`)."""
    return near_spans(torch.arange(tq, device=device) + first, tk, w_blocks, causal)


def near_block_table(tq: int, tk: int, window: int, causal: bool, batch: int, kv_heads: int, device, *,
                     clamp: bool = True, first: int = 0) -> Tensor:
    """Int32 [B, Hkv, Tq, width]: the near key blocks of each query block as an explicit list, -1 where out of
    range (what executors without a strided window view gather). width is W + 1 causal, 2W + 1 otherwise, with
    W = min(window, Tk) when `clamp`, else the window itself (exports: no comparison of a symbolic Tk). Query
    block t is absolute block first + t (`query_layout`).

    Example:
        >>> near_block_table(3, 3, 1, True, 1, 1, "cpu")[0, 0]
        tensor([[-1,  0],
                [ 0,  1],
                [ 1,  2]], dtype=torch.int32)
    """
    w = min(window, tk) if clamp else window
    offsets = torch.arange(-w, 1 if causal else w + 1, device=device)
    near = (torch.arange(tq, device=device) + first)[:, None] + offsets          # [Tq, width]
    near = torch.where((near >= 0) & (near < tk), near, -1).to(torch.int32)
    return near.expand(batch, kv_heads, near.shape[0], near.shape[1])


def near_spans(uq: Tensor, num_spans: int, w_blocks: int, causal: bool) -> Tensor:
    """Bool [len(uq), num_spans]: span u is near the query's span uq at one level."""
    u = torch.arange(num_spans, device=uq.device)
    d = uq[:, None] - u[None, :]
    if causal:
        return (d >= 0) & (d <= w_blocks)
    return d.abs() <= w_blocks


def strictly_past(uq: Tensor, num_spans: int) -> Tensor:
    """Bool [len(uq), num_spans]: span u lies strictly before the query's span."""
    u = torch.arange(num_spans, device=uq.device)
    return u[None, :] < uq[:, None]


def compact(mask: Tensor, capacity: int) -> Tensor:
    """Indices of the True entries along the last dim, ascending, padded with -1 to `capacity`.

    `capacity` is a static bound on the number of True entries (the caller proves it), so the
    result's shape never depends on the data.
    """
    n = mask.shape[-1]
    capacity = torch.sym_min(capacity, n)      # symbolic, not a guard on which is smaller (no recompile at that length)
    if _eager_on_cpu(mask):
        return _compact_nonzero(mask, capacity)
    pos = torch.arange(n, device=mask.device)
    key = torch.where(mask, pos, pos + n)
    key = torch.topk(key, capacity, dim=-1, largest=False, sorted=True).values
    return torch.where(key < n, key, torch.full_like(key, -1)).to(torch.int32)


def eager_tensor(x: Tensor) -> bool:
    """A plain tensor outside any trace (no fake or functional tensor, no Dynamo, no export, no torch.jit.trace):
    what eager-only fast paths (data-dependent shapes, C++ helpers) check.

    Example:
        >>> eager_tensor(torch.ones(2))
        True
    """
    return (type(x) is torch.Tensor and not torch.compiler.is_compiling() and not torch.compiler.is_exporting()
            and not torch.jit.is_tracing())


def _eager_on_cpu(x: Tensor) -> bool:
    """A plain CPU tensor outside any trace: data-dependent shapes (nonzero) are fine."""
    return x.device.type == "cpu" and eager_tensor(x)


def _compact_nonzero(mask: Tensor, capacity: int) -> Tensor:
    """`compact` through nonzero and masked_scatter: one pass each, where topk sorts every row (UCSA's rest
    summaries at N = 64k, a [1, 8, 1024, 1024] mask: 51 ms against 165)."""
    n = mask.shape[-1]
    rows = mask.reshape(-1, n)
    found = rows.nonzero()                                   # [nnz, 2], row-major: each row's columns ascending
    count = torch.bincount(found[:, 0], minlength=rows.shape[0]).view(*mask.shape[:-1], 1)
    if bool((count > capacity).any()):                       # the caller's bound does not hold: keep the first ones
        starts = count.view(-1).cumsum(0) - count.view(-1)
        rank = torch.arange(found.shape[0], device=mask.device) - starts[found[:, 0]]   # within its row
        found, count = found[rank < capacity], count.clamp(max=capacity)
    slots = torch.arange(capacity, device=mask.device) < count
    return torch.full(slots.shape, -1, dtype=torch.int32, device=mask.device).masked_scatter_(
        slots, found[:, 1].to(torch.int32))


def compact_values(mask: Tensor, values: Tensor, capacity: int) -> Tensor:
    """The entries of `values` where `mask` holds, in their order along the last dim, padded with -1 to
    `capacity` (int32): `compact` for a table whose columns are not the indices themselves.

    Example:
        >>> compact_values(torch.tensor([[True, False, True]]), torch.tensor([[7, 8, 9]]), 3)
        tensor([[ 7,  9, -1]], dtype=torch.int32)
    """
    pos = compact(mask, capacity).long()
    picked = torch.gather(values, -1, pos.clamp(min=0))
    return torch.where(pos >= 0, picked, torch.full_like(picked, -1)).to(torch.int32)


def means(sums: Tensor, counts: Tensor) -> Tensor:
    """Count-weighted means; a span with no visible token gets 0 (it is never referenced)."""
    return sums / counts.clamp(min=1).unsqueeze(-1).to(sums.dtype)
