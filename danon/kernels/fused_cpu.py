"""Sparse plans through danon's own CPU kernel (native_cpu.py): one tile per query block and head.

`fused_forward(a)` lays a plan's call out for the kernel (keys padded to whole blocks, one additive key bias
for padding, summaries' log n_s and positions per kv head) and returns (out, lse) as `gathered_forward`
does; `fused_backward(a, grad_out, out, lse)` returns the gradients as `gathered_backward` does. Each
returns None when the kernel does not take the call (not built, float64, a band, softcap, a dense plan, more
queries than keys, more than MAX_KEYS_PER_BLOCK keys per query block), and the caller then runs the aten path (danon/kernels/gather.py).

Example:
    >>> import torch, danon
    >>> from danon.core.attention_args import attention_args
    >>> from danon.kernels.fused_cpu import fused_forward
    >>> q = torch.randn(1, 2, 256, 16)
    >>> plan = danon.attention_plan(q, q, kind="msra", causal=True, block_size=32, window=64)
    >>> out, lse = fused_forward(attention_args(q, q, q, plan, scale=0.25))
    >>> out.shape, lse.shape
    (torch.Size([1, 2, 256, 16]), torch.Size([1, 2, 256]))
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from danon.core.attention_args import AttentionArgs
from danon.core.blocks import query_layout
from danon.core.dtypes import accumulation_dtype
from danon.core.plan import is_dense_plan

from . import native_cpu

__all__ = ["fused_forward", "fused_backward", "tokens_in_own_block", "MAX_KEYS_PER_BLOCK"]

# keys one query block may see in one tile: its logits [b, keys] stay in a core's L2 cache (64 x 4096 fp32 = 1 MiB)
MAX_KEYS_PER_BLOCK = 4096


def tokens_in_own_block(a: AttentionArgs) -> bool:
    """Whether a causal plan lists tokens at or after its query block's start (hand-made plans only): the
    reference executor masks those token by token, the block-wise fast paths do not."""
    if not a.causal or a.token_idx is None or a.token_idx.numel() == 0:
        return False
    first = query_layout(a.q.shape[2], a.k.shape[2], a.block_size)[1]
    starts = (torch.arange(a.token_idx.shape[2], device=a.q.device) + first) * a.block_size
    return bool((a.token_idx.long() >= starts.view(1, 1, -1, 1)).any())


def _whole_blocks(x: Tensor, n: int) -> Tensor:
    """[B, Hkv, nk, D] -> contiguous [B, Hkv, n, D], zero rows after nk; no copy when it already is one."""
    if x.shape[2] == n and x.is_contiguous():
        return x
    return F.pad(x, (0, 0, 0, n - x.shape[2])).contiguous()


def _keys_per_block(a: AttentionArgs, tk: int) -> int:
    keys = 0
    if a.window >= 0:
        w = min(a.window, tk)
        keys += ((1 if a.causal else 2) * w + 1) * a.block_size
    elif a.causal and a.block_idx is not None:
        keys += a.block_size
    for idx, width in ((a.block_idx, a.block_size), (a.token_idx, 1), (a.summary_idx, 1)):
        if idx is not None:
            keys += idx.shape[-1] * width
    return keys


def _layout(a: AttentionArgs):
    """(the kernel's plan arguments, (pad, Nq)) or None when the kernel does not take this call."""
    q, k, v = a.q, a.k, a.v
    b = a.block_size
    if (q.device.type != "cpu" or accumulation_dtype(q.dtype) != torch.float32 or a.band >= 0 or a.softcap is not None
            or a.attn_mask is not None or not 1 <= b <= 1024 or q.shape[2] > k.shape[2]
            or is_dense_plan(a.block_idx, a.token_idx, a.summary_idx, a.window) or tokens_in_own_block(a)):
        return None
    B, H, nq, D = q.shape
    Hkv, nk = k.shape[1], k.shape[2]
    pad, first, tq = query_layout(nq, nk, b)
    tk = -(-nk // b)
    if _keys_per_block(a, tk) > MAX_KEYS_PER_BLOCK or tk * b > 1 << 24:   # fp32 key positions: exact to 2^24
        return None
    if native_cpu.load() is None:
        return None
    f32 = torch.float32
    n = tk * b
    kp, vp = _whole_blocks(k.to(f32), n), _whole_blocks(v.to(f32), n)
    key_bias = None   # every key real and kept: the kernel skips the bias pass
    if a.key_padding_mask is not None or n != nk:
        key_bias = torch.zeros(B, n, dtype=f32)
        if a.key_padding_mask is not None:
            key_bias[:, :nk].masked_fill_(~a.key_padding_mask.bool().expand(B, nk), float("-inf"))
        key_bias[:, nk:] = float("-inf")

    def index(x):
        return None if x is None or x.shape[-1] == 0 else x.to(torch.int32).expand(B, Hkv, tq, x.shape[-1]).contiguous()

    block_idx, token_idx, summary_idx = index(a.block_idx), index(a.token_idx), index(a.summary_idx)
    sk = sv = s_bias = s_pos = None
    if summary_idx is not None:
        S = a.summary_k.shape[2]
        sk = a.summary_k.to(f32).expand(B, Hkv, S, D).contiguous()
        sv = a.summary_v.to(f32).expand(B, Hkv, S, v.shape[3]).contiguous()
        s_bias = torch.log(a.summary_count.to(f32).clamp(min=1)).expand(B, Hkv, S).contiguous()
        if a.slopes is not None:
            s_pos = (a.summary_pos.to(f32).expand(B, Hkv, S).contiguous() if a.summary_pos is not None
                     else torch.zeros(B, Hkv, S, dtype=f32))
    slopes = None if a.slopes is None else a.slopes.to(f32).contiguous()
    plan_args = (_rows(q, pad, tq * b), kp, vp, key_bias, block_idx, token_idx, summary_idx, sk, sv, s_bias, s_pos,
                 slopes, a.scale, a.causal, b, a.window, first)
    return plan_args, (pad, nq)


def _rows(x: Tensor, pad: int, rows: int) -> Tensor:
    """[B, H, Nq, X] -> fp32 [B, H, rows, X] with `pad` zero rows first, rows the kernel's gemm can read.

    The row stride is BLAS's leading dimension, which must be at least X: a broadcast gradient (the backward of
    `out.sum(2)` has row stride 0) or an overlapping view is copied (MKL would otherwise refuse the call and
    leave its output as it was).
    """
    x = x.to(torch.float32)
    if pad or rows != x.shape[2]:
        return F.pad(x, (0, 0, pad, rows - x.shape[2] - pad))
    return x if x.stride(-1) == 1 and x.stride(-2) >= x.shape[-1] else x.contiguous()


# what the backward's split may spend on extra copies of dk and dv (beyond the one every call has): at N = 16k
# and one kv head a copy is 8 MiB, so any thread count is served; at a million tokens, 512 MiB: two parts at most
SPLIT_COPY_BYTES = 1 << 30


def _first_rows(x: Tensor, start: int, count: int) -> Tensor:
    """x[:, :, start:start + count], and x itself (not a view of it) when that is all of x."""
    return x if start == 0 and count == x.shape[2] else x[:, :, start:start + count]


def fused_forward(a: AttentionArgs) -> Optional[Tuple[Tensor, Tensor]]:
    """out [B, H, Nq, Dv] (fp32) and lse [B, H, Nq], or None when the kernel does not take this call."""
    layout = _layout(a)
    if layout is None:
        return None
    plan_args, (pad, nq) = layout
    out, lse = native_cpu.load().sparse_forward(*plan_args)
    return out[:, :, pad:pad + nq], lse[:, :, pad:pad + nq]


def fused_backward(a: AttentionArgs, grad_out: Tensor, out: Tensor, lse: Tensor):
    """(dq, dk, dv, d_summary_k, d_summary_v, d_slopes) in fp32 (the summaries' None without a summary list,
    the slopes' None without slopes), or None when the kernel does not take this call.

    The kernel's work items are (batch, kv head) pairs, each thread owning its keys' gradients; with fewer pairs
    than threads each pair's query blocks are split into runs too, each run adding into its own copy of the key
    gradients, summed at the end (`splits` copies of dk and dv: memory for threads that would idle otherwise, at
    most SPLIT_COPY_BYTES of it).
    """
    layout = _layout(a)
    if layout is None:
        return None
    plan_args, (pad, nq) = layout
    rows = plan_args[0].shape[2]
    # rows with lse -inf (no key seen, or the padding rows before the first query) get p = 0 and dS = 0
    lse_rows = lse.new_full((*lse.shape[:2], rows), float("-inf"), dtype=torch.float32)
    lse_rows[:, :, pad:pad + nq] = lse
    pairs = a.q.shape[0] * a.k.shape[1]
    copy_bytes = pairs * a.k.shape[2] * (a.k.shape[3] + a.v.shape[3]) * 4
    splits = max(1, min(-(-torch.get_num_threads() // pairs),   # ceil: enough work items for every thread
                        1 + SPLIT_COPY_BYTES // copy_bytes))
    dq, dk, dv, dsk, dsv, dslopes = native_cpu.load().sparse_backward(
        _rows(grad_out, pad, rows), _rows(out, pad, rows), lse_rows, *plan_args, splits)
    nk = a.k.shape[2]
    has_summaries = plan_args[6] is not None
    # whole tensors where no row was added: a view keeps its base alive, which rules out autograd adding another
    # gradient of the same input (the plan's, through the summaries) in place
    return (_first_rows(dq, pad, nq), _first_rows(dk, 0, nk), _first_rows(dv, 0, nk),
            dsk.sum_to_size(a.summary_k.shape) if has_summaries else None,
            dsv.sum_to_size(a.summary_v.shape) if has_summaries else None,
            dslopes.sum(0).float() if a.slopes is not None else None)
