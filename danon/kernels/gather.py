"""Fast CPU executor for sparse plans: PyTorch's fused CPU flash kernel over each query block's key set.

Every query block of b rows is one small attention problem. Batched as [Tq, B*H, b, D] (a strided
view of q: no copy unless q needs padding to whole blocks or upcasting), its keys come in up to
four parts, each one flash call, merged by log-sum-exp (exactly, as ring attention merges):

- the near window: the plan's `window` blocks around the query block. Consecutive query blocks'
  windows overlap, so they are one overlapping strided view of the keys: nothing is copied (a chunk
  whose windows reach past either end reads a zero-padded copy of just its rows);
- the own block under causal masking: the only keys that need a per-row (triangular) mask;
- the listed part: exact blocks, routed tokens and summaries, gathered by index_select from the
  keys and from the summary table (no concatenated copy of the keys);
- the summary table, when most of it is in use (UCSA): attended whole, masked, without a gather.

Every bias that depends on the key alone (padding, -1 slots, log n_s, ALiBi measured from the
query block's start) is an additive mask [Tq, B*H, 1, keys] broadcast over the block's rows, so
no [rows x keys] mask is built except for ALiBi without causal masking. The backward runs the
flash backward of each part with the merged out and lse, and adds the key gradients back.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from danon.core.attention_args import AttentionArgs
from danon.core.blocks import query_layout
from danon.core.dtypes import accumulation_dtype

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

# Elements of gathered keys (plus window keys) one chunk may touch: bounds the working memory, and keeps
# what a chunk gathers in cache for the kernel that reads it (measured at N = 16k: 1 << 22 beats 1 << 23).
GATHER_BUDGET = 1 << 22
NEG_INF = float("-inf")


def _pad_rows(x: Tensor, before: int, after: int) -> Tensor:
    if before == 0 and after == 0:   # the fused kernel misreads a last dim that is not contiguous
        return x if x.stride(-1) == 1 else x.contiguous()
    return F.pad(x, (0, 0, before, after))


def _add_blocks(target: Tensor, first_block: int, src: Tensor) -> None:
    """Head-major target [B*Hkv, rows, X]: rows of blocks first_block .. + C += src [C, B*Hkv, b, X].

    Written block by block in place: the flash backward lays its key gradients out [C, b, B*Hkv, X] in memory,
    and adding them in runs of X values costs less than a transposed copy of the whole gradient at the end.
    """
    C, heads, b, X = src.shape
    target[:, first_block * b:(first_block + C) * b].view(heads, C, b, X).transpose(0, 1).add_(src)


class _Part:
    """One key set shared by the rows of each query block.

    keys, values: (t0, t1) -> [C, B*Hkv, L, D]; mask: (t0, t1) -> (additive mask [C, B*H, b, L] or None,
    per-row lse offset or None); dead: (t0, t1) -> bool [C, B*H, b|1] marking rows that see no key of
    this part, or None when every row sees one (read off key-level flags: testing the float mask costs
    more than the attention); causal: the kernel's own triangular mask applies; scatter: (t0, t1, dk,
    dv) adds the key gradients back where the keys came from; rel: (t0, t1) -> float [C|1, B*Hkv|1, L],
    each key's position minus its query block's start (what the causal ALiBi bias is linear in), or
    None for a part that ALiBi does not reach.
    """

    def __init__(self, keys, values, mask, scatter, dead, causal: bool = False, rel=None):
        self.keys, self.values, self.mask, self.scatter = keys, values, mask, scatter
        self.dead, self.causal, self.rel = dead, causal, rel


class GatheredPlan:
    """A plan laid out for the flash kernel: queries [Tq, B*H, b, D] and its key parts."""

    def __init__(self, a: AttentionArgs):
        q, k, v, slopes, causal, block_size = a.q, a.k, a.v, a.slopes, a.causal, a.block_size
        key_padding_mask, summary_k = a.key_padding_mask, a.summary_k
        window = None if a.window < 0 else a.window
        band = None if a.band < 0 else a.band
        dt = accumulation_dtype(q.dtype)
        self.dtype, self.scale, self.causal, self.b = dt, a.scale, causal, block_size
        self.band = band
        B, H, nq, D = q.shape
        Hkv, nk = k.shape[1], k.shape[2]
        b = block_size
        self.B, self.H, self.Hkv, self.G, self.nq, self.nk, self.D, self.Dv = B, H, Hkv, H // Hkv, nq, nk, D, v.shape[3]
        # row i is position Nk - Nq + i: `pad` rows before it make whole blocks, local block t is absolute first + t
        self.pad, self.first, self.tq = query_layout(nq, nk, b)
        self.tk = -(-nk // b)
        dev = q.device
        self.q = _pad_rows(q.to(dt), self.pad, self.tq * b - nq - self.pad)
        self.q_blocks = self.q.reshape(B * H, self.tq, b, D).transpose(0, 1)              # [Tq, B*H, b, D]
        key_ok = torch.ones(B, nk, dtype=torch.bool, device=dev) if key_padding_mask is None else key_padding_mask.bool()
        self.key_ok = key_ok
        self.all_keys_ok = key_padding_mask is None or bool(key_ok.all())
        self.block_start = (torch.arange(self.tq, device=dev) + self.first) * b            # [Tq] absolute
        self.slopes = None if slopes is None else slopes.to(dt)                            # [H]
        # contiguous: the own-block part reads blocks through as_strided, which ignores a view's strides
        self.k_pad = _pad_rows(k.to(dt), 0, self.tk * b - nk).reshape(B * Hkv, self.tk * b, D).contiguous()
        self.v_pad = _pad_rows(v.to(dt), 0, self.tk * b - nk).reshape(B * Hkv, self.tk * b, self.Dv).contiguous()
        # gradient buffers, filled by the parts' scatter functions during the backward
        self.grad_k = self.grad_v = None
        self.summary_grad = None
        # an empty list (capacity 0) is no part at all: the flash kernel cannot take zero keys
        block_idx, token_idx, summary_idx = (None if x is None or x.shape[-1] == 0 else x
                                             for x in (a.block_idx, a.token_idx, a.summary_idx))
        self.parts = []
        self.keys_per_block = 0
        if window is not None and (window > 0 or not causal):   # causal with W = 0: the own block is all
            self.parts.append(self._window_part(k, v, window))
        if causal and (window is not None or block_idx is not None):
            self.parts.append(self._own_part(block_idx, window))
        if summary_idx is not None and slopes is None and summary_idx.shape[-1] * 2 >= summary_k.shape[2]:
            # most of the summary table is in use: attend to all of it, masked, rather than gather it
            self.parts.append(self._summary_table_part(summary_idx, summary_k, a.summary_v, a.summary_count))
            summary_idx = None
        if block_idx is not None:   # whole blocks: gathered block by block (b * D contiguous values each)
            self.parts.append(self._block_list_part(block_idx))
            block_idx = None
        if token_idx is not None or summary_idx is not None:
            self.parts.append(self._list_part(token_idx, summary_idx, summary_k, a.summary_v,
                                              a.summary_count, a.summary_pos))

    # --- helpers ---------------------------------------------------------------------------------
    def _per_head(self, x: Tensor) -> Tensor:
        """[Tq, B, Hkv, ...] -> [Tq, B*H, ...]: the same keys' mask for every query head of a kv group."""
        x = x.unsqueeze(3).expand(*x.shape[:3], self.G, *x.shape[3:])
        return x.reshape(x.shape[0], self.B * self.H, *x.shape[4:])

    def _dead_per_head(self, dead: Tensor) -> Tensor:
        """[C, B, Hkv|1, b|1] -> [C, B*H, b|1]."""
        dead = dead.expand(dead.shape[0], self.B, self.Hkv, dead.shape[-1])
        return self._per_head(dead)

    def _row_offset(self, t0, t1):
        """The per-row constant -slope*(i - start) that the causal per-key ALiBi bias leaves out: [C, B*H, b]."""
        r = torch.arange(self.b, device=self.q.device, dtype=self.dtype)
        off = -self.slopes.view(1, 1, self.H, 1) * r
        return off.expand(t1 - t0, self.B, self.H, self.b).reshape(t1 - t0, self.B * self.H, self.b)

    def _full_alibi(self, mask: Tensor, key_pos: Tensor, t0, t1) -> Tensor:
        """Non-causal ALiBi needs |i - j| per row: mask [C, B, Hkv|1, L] + key_pos [C, B|1, Hkv|1, L] -> [C, B*H, b, L]."""
        i = (self.block_start[t0:t1].view(-1, 1, 1, 1, 1) + torch.arange(self.b, device=mask.device).view(1, 1, 1, -1, 1))
        dist = (i.to(self.dtype) - key_pos.to(self.dtype).unsqueeze(3)).abs()             # [C, B|1, Hkv|1, b, L]
        dist = dist.unsqueeze(3).expand(*dist.shape[:3], self.G, *dist.shape[3:])
        dist = dist.expand(t1 - t0, self.B, self.Hkv, self.G, self.b, dist.shape[-1])
        bias = mask.unsqueeze(3).unsqueeze(4).expand(t1 - t0, self.B, self.Hkv, self.G, self.b, mask.shape[-1])
        slopes = self.slopes.view(1, 1, self.Hkv, self.G, 1, 1)
        return (bias - slopes * dist).reshape(t1 - t0, self.B * self.H, self.b, mask.shape[-1])

    def _finish_mask(self, mask: Tensor, key_pos: Tensor, t0, t1):
        """mask [C, B, Hkv|1, L] (0 / -inf and log-counts) -> the flash mask [C, B*H, b|1, L] and row offset."""
        if self.slopes is not None and not self.causal:
            return self._full_alibi(mask, key_pos, t0, t1), None
        if self.slopes is not None:
            m = self._alibi_from_start_chunk(mask, key_pos, t0, t1)
            m = m.reshape(t1 - t0, self.B * self.H, 1, m.shape[-1])
            return m.expand(-1, -1, self.b, -1), self._row_offset(t0, t1)
        m = self._per_head(mask.expand(t1 - t0, self.B, self.Hkv, mask.shape[-1])).unsqueeze(2)
        return m.expand(-1, -1, self.b, -1), None

    def _alibi_from_start_chunk(self, mask, key_pos, t0, t1):
        rel = key_pos.to(self.dtype) - self.block_start[t0:t1].to(self.dtype).view(-1, 1, 1, 1)   # [C, B|1, Hkv|1, L]
        rel = rel.unsqueeze(3)                                                                       # [C, B|1, Hkv|1, 1, L]
        slopes = self.slopes.view(1, 1, self.Hkv, self.G, 1)
        return mask.unsqueeze(3) + slopes * rel                                                     # [C, B, Hkv, G, L]

    # --- the near window: an overlapping strided view, no copy ----------------------------------------
    def _window_part(self, k, v, window: int) -> _Part:
        b, B, Hkv = self.b, self.B, self.Hkv
        w = min(window, self.tk)
        width = w if self.causal else 2 * w + 1                       # causal: the own block is its own part
        n = self.tk * b

        def strided(x):
            def chunk(t0, t1):
                lo, hi = (t0 + self.first - w) * b, (t1 - 1 + self.first - w + width) * b   # the rows it reads
                if lo < 0 or hi > n:   # a window that reaches past either end: a zero-padded copy of its rows
                    src = x.new_zeros(B * Hkv, hi - lo, x.shape[-1])
                    src[:, max(0, -lo):min(hi, n) - lo] = x[:, max(lo, 0):min(hi, n)]
                    lo = 0
                else:                   # inside the keys: a view, nothing copied
                    src = x
                return src.as_strided((t1 - t0, B * Hkv, width * b, x.shape[-1]),
                                      (b * x.shape[-1], src.shape[1] * x.shape[-1], x.shape[-1], 1),
                                      lo * x.shape[-1] + src.storage_offset())
            return chunk

        def inside(t0, t1) -> bool:
            """No key of the chunk's windows is padding or out of range, and no band: every query block's window
            mask is the same (none at all without ALiBi, whose bias depends on the key's slot alone)."""
            lo, hi = (t0 + self.first - w) * b, (t1 - 1 + self.first - w + width) * b
            return self.all_keys_ok and self.band is None and lo >= 0 and hi <= self.nk

        shared = {}   # the mask of one query block inside the keys, built once

        def plain(t0, t1) -> bool:
            return self.slopes is None and inside(t0, t1)

        # key j of query block t's window sits at position (t - w) * b + j
        def key_ok(t0, t1):
            pos = (self.block_start[t0:t1, None] - w * b) + torch.arange(width * b, device=self.q.device)   # [C, L]
            inside = (pos >= 0) & (pos < self.nk)
            ok = torch.gather(self.key_ok, 1, pos.clamp(0, self.nk - 1).reshape(1, -1).expand(B, -1))
            return ok.view(B, t1 - t0, -1).transpose(0, 1) & inside[:, None, :], pos                       # [C, B, L]

        def mask(t0, t1):
            if plain(t0, t1):
                return None, None
            if inside(t0, t1) and t1 - t0 > 1:
                if not shared:
                    shared["mask"] = mask(t0, t0 + 1)
                m, offset = shared["mask"]
                return m.expand(t1 - t0, -1, -1, -1), None if offset is None else offset.expand(t1 - t0, -1, -1)
            ok, pos = key_ok(t0, t1)
            m = torch.zeros(ok.shape, dtype=self.dtype, device=ok.device).masked_fill(~ok, NEG_INF)[:, :, None]
            m, offset = self._finish_mask(m, pos[:, None, None, :], t0, t1)
            if self.band is not None:   # a sliding window of tokens: the one per-row mask of this part
                i = self.block_start[t0:t1, None, None] + torch.arange(b, device=pos.device)[None, :, None]
                d = i - pos[:, None, :]                                                   # [C, b, L]: i - j
                outside = (d >= self.band) | (-d >= self.band)
                m = m.masked_fill(outside[:, None], NEG_INF)
            return m, offset

        def dead(t0, t1):
            if inside(t0, t1):
                return None
            if self.band is not None:   # which rows the band leaves empty: read the per-row mask
                return _dead_rows(mask(t0, t1)[0])
            return self._dead_per_head(~key_ok(t0, t1)[0].any(-1)[:, :, None, None])

        def scatter(t0, t1, dk, dv):
            # slot j of query block t holds key block t + first - w + j: add slot by slot, dropping the padding
            grad_k, grad_v = self.grads()
            for j in range(width):
                first = t0 + self.first - w + j
                lo, hi = max(first, 0), min(first + t1 - t0, self.tk)
                if lo < hi:
                    _add_blocks(grad_k, lo, dk[lo - first:hi - first, :, j * b:(j + 1) * b])
                    _add_blocks(grad_v, lo, dv[lo - first:hi - first, :, j * b:(j + 1) * b])

        def rel(t0, t1):   # slot s of every query block's window sits s - w * b tokens from the block's start
            return (torch.arange(width * b, device=self.q.device, dtype=self.dtype) - w * b).view(1, 1, -1)

        self.keys_per_block += width * b
        return _Part(strided(self.k_pad), strided(self.v_pad), mask, scatter=scatter, dead=dead, rel=rel)

    # --- the own block under causal masking: per-row triangular mask --------------------------------
    def _own_part(self, block_idx, window) -> _Part:
        b, B, Hkv = self.b, self.B, self.Hkv
        n = self.tk * b

        def blocks(x):
            return lambda t0, t1: x.as_strided((t1 - t0, B * Hkv, b, x.shape[-1]),
                                               (b * x.shape[-1], n * x.shape[-1], x.shape[-1], 1),
                                               (t0 + self.first) * b * x.shape[-1] + x.storage_offset())

        key_ok = F.pad(self.key_ok, (0, n - self.nk), value=False)
        if window is not None:
            listed = None
        else:   # a hand-made plan may leave the own block out
            t = (torch.arange(self.tq, device=self.q.device) + self.first).view(1, 1, -1, 1)
            listed = (block_idx.long() == t).any(-1).permute(2, 0, 1)                   # [Tq, B, Hkv]
        tril = torch.ones(b, b, dtype=torch.bool, device=self.q.device).tril()
        r = torch.arange(b, device=self.q.device)
        band = (r[:, None] - r[None, :]) < (self.band if self.band is not None else b)
        general = listed is not None or self.band is not None or self.slopes is not None
        if not general and self.key_ok.all():   # the plain triangle: the kernel's own causal mask, no mask tensor
            return self._plain_own_part(blocks)
        if not general:                         # triangle + key padding: one mask per batch row, shared by heads
            return self._padded_own_part(blocks, key_ok, tril)

        def mask(t0, t1):
            f = self.first
            ok = key_ok[:, (t0 + f) * b:(t1 + f) * b].view(B, t1 - t0, 1, b).transpose(0, 1)   # [C, B, 1, b]
            ok = ok.expand(t1 - t0, B, Hkv, b)
            if listed is not None:
                ok = ok & listed[t0:t1, :, :, None]
            ok = self._per_head(ok)[:, :, None, :] & tril                                 # [C, B*H, b, b]
            if self.band is not None:
                ok = ok & band
            m = torch.zeros(ok.shape, dtype=self.dtype, device=ok.device).masked_fill(~ok, NEG_INF)
            if self.slopes is not None:
                dist = (torch.arange(b, device=ok.device)[:, None] - torch.arange(b, device=ok.device)).to(self.dtype)
                m = m - self.slopes.repeat(B).view(1, B * self.H, 1, 1) * dist.abs()
            return m, None

        def dead(t0, t1):
            return _dead_rows(mask(t0, t1)[0])

        def rel(t0, t1):
            return torch.arange(b, device=self.q.device, dtype=self.dtype).view(1, 1, -1)

        self.keys_per_block += b
        if listed is None and self.band is None and self.all_keys_ok:
            # ALiBi alone: the same mask for every query block (built once), and every row sees its diagonal
            shared = mask(0, 1)[0]
            return _Part(blocks(self.k_pad), blocks(self.v_pad),
                         lambda t0, t1: (shared.expand(t1 - t0, -1, -1, -1), None),
                         scatter=self._own_scatter, dead=lambda t0, t1: None, rel=rel)
        return _Part(blocks(self.k_pad), blocks(self.v_pad), mask, scatter=self._own_scatter, dead=dead, rel=rel)

    def _own_scatter(self, t0, t1, dk, dv):
        grad_k, grad_v = self.grads()
        _add_blocks(grad_k, t0 + self.first, dk)
        _add_blocks(grad_v, t0 + self.first, dv)

    def _plain_own_part(self, blocks) -> _Part:
        self.keys_per_block += self.b
        return _Part(blocks(self.k_pad), blocks(self.v_pad), lambda t0, t1: (None, None), scatter=self._own_scatter,
                     dead=lambda t0, t1: None, causal=True)

    def _padded_own_part(self, blocks, key_ok: Tensor, tril: Tensor) -> _Part:
        b, B = self.b, self.B

        def ok_keys(t0, t1):
            f = self.first
            return key_ok[:, (t0 + f) * b:(t1 + f) * b].view(B, t1 - t0, b).transpose(0, 1)   # [C, B, b]

        def mask(t0, t1):
            ok = ok_keys(t0, t1)[:, :, None, :] & tril                                       # [C, B, b, b]
            m = torch.zeros(ok.shape, dtype=self.dtype, device=ok.device).masked_fill(~ok, NEG_INF)
            m = m[:, :, None].expand(t1 - t0, B, self.H, b, b)                              # heads share it
            return m.reshape(t1 - t0, B * self.H, b, b), None                               # a view when B = 1

        def dead(t0, t1):   # row i sees key j <= i: dead when no key up to i is kept
            seen = ok_keys(t0, t1).cummax(-1).values                                        # [C, B, b]
            return self._dead_per_head(~seen[:, :, None, :])

        self.keys_per_block += b
        return _Part(blocks(self.k_pad), blocks(self.v_pad), mask, scatter=self._own_scatter, dead=dead)

    # --- summaries against the whole shared table, masked to the listed ones -------------------------
    def _summary_table_part(self, summary_idx, summary_k, summary_v, summary_count) -> _Part:
        B, Hkv, dt = self.B, self.Hkv, self.dtype
        S = summary_k.shape[2]
        sk = summary_k.to(dt).reshape(B * Hkv, S, self.D)
        sv = summary_v.to(dt).reshape(B * Hkv, S, self.Dv)
        sidx = summary_idx.long()
        log_n = torch.log(summary_count.to(dt).clamp(min=1)).expand(B, Hkv, S)

        def used(t0, t1) -> int:
            """Only the table's rows up to the chunk's largest listed index take part (causal: the past)."""
            return int(sidx[:, :, t0:t1].max()) + 1 if sidx.numel() else 1

        def shared(x):
            return lambda t0, t1: x[:, :max(used(t0, t1), 1)].unsqueeze(0).expand(t1 - t0, -1, -1, -1)

        def mask(t0, t1):
            width = max(used(t0, t1), 1)
            idx = sidx[:, :, t0:t1].permute(2, 0, 1, 3)                                   # [C, B, Hkv, Ks]
            m = torch.full((t1 - t0, B, Hkv, S + 1), NEG_INF, dtype=dt, device=idx.device)
            vals = torch.gather(log_n[None].expand(t1 - t0, B, Hkv, S), 3, idx.clamp(min=0))
            m.scatter_(3, torch.where(idx >= 0, idx, S), vals)                            # -1 slots land in column S
            return self._finish_mask(m[..., :width], None, t0, t1)

        def dead(t0, t1):
            return self._dead_per_head(~(sidx[:, :, t0:t1] >= 0).any(-1).permute(2, 0, 1)[..., None])

        def scatter(t0, t1, dk, dv):
            if self.summary_grad is None:
                self.summary_grad = (torch.zeros_like(sk), torch.zeros_like(sv))
            width = dk.shape[2]
            self.summary_grad[0][:, :width].add_(dk.sum(0))
            self.summary_grad[1][:, :width].add_(dv.sum(0))

        self.keys_per_block += S
        return _Part(shared(sk), shared(sv), mask, scatter=scatter, dead=dead)

    # --- listed blocks: one index_select of whole blocks ------------------------------------------------
    def _block_list_part(self, block_idx: Tensor) -> _Part:
        b, B, Hkv, dt, dev = self.b, self.B, self.Hkv, self.dtype, self.q.device
        n, tk = self.tk * b, self.tk
        bidx = block_idx.long()                                                            # [B, Hkv, Tq, Kb]
        num_blocks = bidx.shape[-1]
        bc = bidx.clamp(min=0)
        key_ok = F.pad(self.key_ok, (0, n - self.nk), value=False)
        pos = (bc[..., None] * b + torch.arange(b, device=dev)).flatten(3)                # [B, Hkv, Tq, Kb*b]
        ok = (bidx >= 0)[..., None].expand(*bidx.shape, b).flatten(3) & self._ok_at(key_ok, pos)
        if self.causal:   # keys of the own block (and later) belong to the own-block part
            ok = ok & (pos < self.block_start.view(1, 1, -1, 1))
        bias = torch.zeros(ok.shape, dtype=dt, device=dev).masked_fill(~ok, NEG_INF).permute(2, 0, 1, 3)
        dead_blocks = ~ok.any(-1).permute(2, 0, 1)                                         # [Tq, B, Hkv]
        key_pos = pos.permute(2, 0, 1, 3) if self.slopes is not None else None
        base = (torch.arange(B * Hkv, device=dev) * tk).view(B, Hkv, 1, 1)
        rows = (bc + base).permute(2, 0, 1, 3)                                             # [Tq, B, Hkv, Kb]
        width = num_blocks * b
        self.keys_per_block += width
        # a plan may list fewer blocks than its capacity (UCSA's gamma): a chunk gathers the slots up to the last
        # one any of its query blocks uses, not the capacity (ALiBi's positions keep the full width)
        last_used = ((bidx >= 0) * torch.arange(1, num_blocks + 1, device=dev)).amax(-1).amax(1).amax(0)   # [Tq]

        def used(t0, t1) -> int:
            return num_blocks if key_pos is not None else max(1, int(last_used[t0:t1].max()))

        def gathered(x):
            flat = x.reshape(B * Hkv * tk, b * x.shape[-1])                                # a view: one row a block

            def chunk(t0, t1):
                w = used(t0, t1)
                return flat.index_select(0, rows[t0:t1, ..., :w].reshape(-1)).view(t1 - t0, B * Hkv, w * b,
                                                                                   x.shape[-1])
            return chunk

        def mask(t0, t1):
            w = used(t0, t1) * b
            return self._finish_mask(bias[t0:t1, ..., :w], None if key_pos is None else key_pos[t0:t1], t0, t1)

        def dead(t0, t1):
            return self._dead_per_head(dead_blocks[t0:t1, :, :, None])

        def scatter(t0, t1, dk, dv):
            grad_k, grad_v = self.grads()
            idx = rows[t0:t1, ..., :used(t0, t1)].reshape(-1)
            grad_k.view(B * Hkv * tk, b * self.D).index_add_(0, idx, dk.reshape(-1, b * self.D))
            grad_v.view(B * Hkv * tk, b * self.Dv).index_add_(0, idx, dv.reshape(-1, b * self.Dv))

        return _Part(gathered(self.k_pad), gathered(self.v_pad), mask, scatter=scatter, dead=dead,
                     rel=None if key_pos is None else self._rel_of(key_pos))

    # --- listed tokens and summaries: gathered from the keys and from the summary table --------------
    def _list_part(self, token_idx, summary_idx, summary_k, summary_v, summary_count, summary_pos):
        b, B, Hkv, dt, dev = self.b, self.B, self.Hkv, self.dtype, self.q.device
        n = self.tk * b
        num_summaries = 0 if summary_idx is None else summary_k.shape[2]
        key_ok = F.pad(self.key_ok, (0, n - self.nk), value=False)
        ok, pos, widths = [], [], []
        token_rows = summary_rows = None
        if token_idx is not None:   # rows of the keys [B*Hkv*n, D] (read in place: no copy of the keys)
            tidx = token_idx.long()
            tc = tidx.clamp(min=0)
            token_ok = (tidx >= 0) & self._ok_at(key_ok, tc)
            if self.causal:   # exact keys of the own block (and later) belong to the own-block part
                token_ok = token_ok & (tc < self.block_start.view(1, 1, -1, 1))
            ok.append(token_ok)
            pos.append(tc.to(dt))
            token_rows = tc.permute(2, 0, 1, 3) + (torch.arange(B * Hkv, device=dev) * n).view(1, B, Hkv, 1)
            widths.append(tidx.shape[-1])
        if num_summaries:           # rows of the summary table [B*Hkv*S, D]
            sidx = summary_idx.long()
            sc = sidx.clamp(min=0)
            ok.append(sidx >= 0)
            if summary_pos is not None:
                pos.append(torch.gather(summary_pos.to(dt).expand(B, Hkv, -1), 2, sc.flatten(2)).view(sc.shape))
            else:
                pos.append(torch.zeros(sc.shape, dtype=dt, device=dev))
            summary_rows = (sc + (torch.arange(B * Hkv, device=dev) * num_summaries).view(B, Hkv, 1, 1))
            summary_rows = summary_rows.permute(2, 0, 1, 3)
            widths.append(sidx.shape[-1])
        ok = torch.cat(ok, -1)
        bias = torch.zeros(ok.shape, dtype=dt, device=dev)
        if num_summaries:   # log n_s: a summary stands for the n_s keys it averages
            count = torch.gather(summary_count.to(dt).expand(B, Hkv, -1), 2, sc.flatten(2)).view(sc.shape)
            bias[..., bias.shape[-1] - widths[-1]:] = torch.log(count.clamp(min=1))
        bias = bias.masked_fill(~ok, NEG_INF).permute(2, 0, 1, 3)                          # [Tq, B, Hkv, L]
        dead_blocks = ~ok.any(-1).permute(2, 0, 1)                                         # [Tq, B, Hkv]
        key_pos = torch.cat(pos, -1).permute(2, 0, 1, 3)
        width = sum(widths)
        self.keys_per_block += width
        key_sources, value_sources = [], []   # (rows [Tq, B, Hkv, L], flat table), in the part's key order
        if token_rows is not None:
            key_sources.append((token_rows, self.k_pad.reshape(-1, self.D)))
            value_sources.append((token_rows, self.v_pad.reshape(-1, self.Dv)))
        if num_summaries:
            key_sources.append((summary_rows, summary_k.to(dt).reshape(-1, self.D)))
            value_sources.append((summary_rows, summary_v.to(dt).reshape(-1, self.Dv)))

        def gathered(sources):
            def chunk(t0, t1):
                pieces = [table.index_select(0, rows[t0:t1].reshape(-1)).view(t1 - t0, B * Hkv, rows.shape[-1], -1)
                          for rows, table in sources]
                return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 2)
            return chunk

        def mask(t0, t1):
            return self._finish_mask(bias[t0:t1], key_pos[t0:t1], t0, t1)

        def dead(t0, t1):
            return self._dead_per_head(dead_blocks[t0:t1, :, :, None])

        def scatter(t0, t1, dk, dv):
            start = 0
            if token_rows is not None:
                grad_k, grad_v = self.grads()
                w = widths[0]
                idx = token_rows[t0:t1].reshape(-1)
                grad_k.view(-1, self.D).index_add_(0, idx, dk[:, :, :w].reshape(-1, self.D))
                grad_v.view(-1, self.Dv).index_add_(0, idx, dv[:, :, :w].reshape(-1, self.Dv))
                start = w
            if num_summaries:
                if self.summary_grad is None:
                    self.summary_grad = (torch.zeros_like(summary_k, dtype=dt).reshape(B * Hkv, -1, self.D),
                                         torch.zeros_like(summary_v, dtype=dt).reshape(B * Hkv, -1, self.Dv))
                idx = summary_rows[t0:t1].reshape(-1)
                self.summary_grad[0].view(-1, self.D).index_add_(0, idx, dk[:, :, start:].reshape(-1, self.D))
                self.summary_grad[1].view(-1, self.Dv).index_add_(0, idx, dv[:, :, start:].reshape(-1, self.Dv))

        return _Part(gathered(key_sources), gathered(value_sources), mask, scatter=scatter, dead=dead,
                     rel=self._rel_of(key_pos) if self.slopes is not None else None)

    def _rel_of(self, key_pos: Tensor):
        """key_pos [Tq, B, Hkv, L] -> rel(t0, t1): [C, B*Hkv, L], positions from each query block's start."""
        def rel(t0, t1):
            r = key_pos[t0:t1].to(self.dtype) - self.block_start[t0:t1].to(self.dtype).view(-1, 1, 1, 1)
            return r.reshape(t1 - t0, self.B * self.Hkv, r.shape[-1])
        return rel

    def _ok_at(self, key_ok: Tensor, rows: Tensor) -> Tensor:
        return torch.gather(key_ok, 1, rows.reshape(self.B, -1)).view(rows.shape)

    def grads(self):
        if self.grad_k is None:
            self.grad_k = torch.zeros_like(self.k_pad)
            self.grad_v = torch.zeros_like(self.v_pad)
        return self.grad_k, self.grad_v

    def chunks(self):
        per_block = self.B * self.H * self.keys_per_block * max(self.D, self.Dv)
        step = max(1, GATHER_BUDGET // max(per_block, 1))
        for t0 in range(0, self.tq, step):
            yield t0, min(self.tq, t0 + step)

    def rows_layout(self, x: Tensor) -> Tensor:
        """[B, H, Nq, X] -> [Tq, B*H, b, X] view (padded rows added)."""
        x = _pad_rows(x.to(self.dtype), self.pad, self.tq * self.b - x.shape[2] - self.pad)
        return x.reshape(self.B * self.H, self.tq, self.b, x.shape[-1]).transpose(0, 1)

    def row_buffer(self, width: int) -> Tensor:
        """An uninitialised [B*H, Tq*b, width] buffer in the output's own layout (every chunk writes its rows)."""
        return self.q.new_empty(self.B * self.H, self.tq * self.b, width)

    def blocks_of(self, buf: Tensor, t0: int, t1: int) -> Tensor:
        """[B*H, Tq*b, X] -> the view [t1 - t0, B*H, b, X] of query blocks t0 .. t1 - 1."""
        return buf.view(buf.shape[0], self.tq, self.b, buf.shape[-1])[:, t0:t1].transpose(0, 1)

    def to_output(self, buf: Tensor) -> Tensor:
        """[B*H, Tq*b, X] -> [B, H, Nq, X]: a view (contiguous when Nq is a whole number of blocks)."""
        return buf.view(self.B, self.H, self.tq * self.b, buf.shape[-1])[:, :, self.pad:self.pad + self.nq]


def _dead_rows(mask: Tensor) -> Tensor:
    """Rows whose additive mask is -inf for every key (the flash kernel reports lse 0 for them): [C, B*H, b|1]."""
    if mask.stride(2) == 0:   # a mask broadcast over the rows: test one row, not b copies of it
        mask = mask[:, :, :1]
    return ~torch.isfinite(mask).any(-1)


def _merge(out_a, lse_a, out_b, lse_b):
    """Combine two softmax parts over disjoint key sets by their log-sum-exp (out_a is overwritten)."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w_a = torch.exp(lse_a - safe).unsqueeze(-1)
    w_b = torch.exp(lse_b - safe).unsqueeze(-1)
    return out_a.mul_(w_a).addcmul_(out_b, w_b), lse


def gathered_forward(gp: GatheredPlan):
    """Returns out [B, H, Nq, Dv] (accumulation dtype) and lse [B, H, Nq]."""
    out, lse = gp.row_buffer(gp.Dv), gp.row_buffer(1)
    for t0, t1 in gp.chunks():
        q = gp.q_blocks[t0:t1]
        o_acc = l_acc = None
        for part in gp.parts:
            mask, offset = part.mask(t0, t1)
            o, l = _flash(q, part.keys(t0, t1), part.values(t0, t1), 0.0, part.causal, attn_mask=mask,
                          scale=gp.scale)
            dead = part.dead(t0, t1)
            if dead is not None and bool(dead.any()):
                l = l.masked_fill(dead, NEG_INF)
                o = o.masked_fill(dead[..., None], 0.0)
            if offset is not None:
                l = l + offset
            o_acc, l_acc = (o, l) if o_acc is None else _merge(o_acc, l_acc, o, l)
        if o_acc is None:   # a plan that lists no key at all
            gp.blocks_of(out, t0, t1).fill_(0.0)
            gp.blocks_of(lse, t0, t1).fill_(NEG_INF)
            continue
        gp.blocks_of(out, t0, t1).copy_(o_acc)
        gp.blocks_of(lse, t0, t1)[..., 0] = l_acc
    return gp.to_output(out), gp.to_output(lse)[..., 0]


def gathered_backward(gp: GatheredPlan, grad_out: Tensor, out: Tensor, lse: Tensor, need_slopes_grad: bool = False):
    """Returns dq [B, H, Nq, D], dk, dv [B, Hkv, Nk, D], d_summary_k, d_summary_v (or None), d_slopes [H] (or None).

    ``need_slopes_grad`` (causal ALiBi only, see ``slopes_grad_supported``): the bias of query row r of a
    block and a key rel positions from the block's start is slope * (rel - r), so d loss / d slope =
    sum over (row, key) of dS * (rel - r); the r term vanishes, since each row's dS sums to 0 over all
    its keys (softmax; no lse gradient on this path). The flash backward returns
    dq = scale * sum_j dS_ij k_j: keys extended by a column rel_j and queries by a 0 leave the logits
    unchanged and make dq's extra column scale * sum_j dS_ij rel_j.
    """
    extra = 1 if need_slopes_grad else 0
    if extra and not slopes_grad_supported(gp):
        raise ValueError("the gathered executor computes the ALiBi slopes' gradient under causal masking only")
    go_all = gp.rows_layout(grad_out)
    o_all = gp.rows_layout(out)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))      # dead rows: every p is 0
    l_all = gp.rows_layout(lse[..., None])[..., 0]
    dq_rows = gp.row_buffer(gp.D + extra)
    for t0, t1 in gp.chunks():
        q = gp.q_blocks[t0:t1]
        go, o, l = go_all[t0:t1].contiguous(), o_all[t0:t1].contiguous(), l_all[t0:t1].contiguous()
        if extra:
            q, go, o = (F.pad(x, (0, extra)) for x in (q, go, o))
        dq_chunk = gp.blocks_of(dq_rows, t0, t1)
        if not gp.parts:
            dq_chunk.zero_()
        for i, part in enumerate(gp.parts):
            mask, offset = part.mask(t0, t1)
            l_part = l if offset is None else (l - offset).contiguous()
            keys, values = part.keys(t0, t1), part.values(t0, t1)
            if extra:
                keys, values = _with_position_column(keys, part.rel(t0, t1)), F.pad(values, (0, extra))
            dq_p, dk_p, dv_p = _flash_backward(go, q, keys, values, o, l_part, 0.0, part.causal, attn_mask=mask,
                                               scale=gp.scale)
            if i == 0:   # the first part's dq is copied in: no zero-filled buffer to add to
                dq_chunk.copy_(dq_p)
            else:
                dq_chunk.add_(dq_p)
            part.scatter(t0, t1, dk_p[..., :gp.D], dv_p[..., :gp.Dv])
    dslopes = None
    if extra:
        dslopes = (dq_rows[..., gp.D] / gp.scale).view(gp.B, gp.H, -1).sum((0, 2))
    dq = gp.to_output(dq_rows)[..., :gp.D]
    grad_k, grad_v = gp.grads()
    dsk = dsv = None
    if gp.summary_grad is not None:
        dsk = gp.summary_grad[0].view(gp.B, gp.Hkv, -1, gp.D)
        dsv = gp.summary_grad[1].view(gp.B, gp.Hkv, -1, gp.Dv)
    dk = grad_k.view(gp.B, gp.Hkv, -1, gp.D)[:, :, :gp.nk]
    dv = grad_v.view(gp.B, gp.Hkv, -1, gp.Dv)[:, :, :gp.nk]
    return dq, dk, dv, dsk, dsv, dslopes


def slopes_grad_supported(gp: GatheredPlan) -> bool:
    """Whether ``gathered_backward`` can return the ALiBi slopes' gradient: causal, every part's key positions known."""
    return gp.causal and gp.slopes is not None and all(part.rel is not None for part in gp.parts)


def _with_position_column(keys: Tensor, rel: Tensor) -> Tensor:
    """keys [C, B*Hkv, L, D] + rel [C|1, B*Hkv|1, L] -> [C, B*Hkv, L, D + 1]: (k, rel)."""
    return torch.cat([keys, rel.to(keys.dtype).expand(*keys.shape[:3])[..., None]], -1)
