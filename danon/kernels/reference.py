"""Reference executor of an attention plan: plain torch ops, chunk by chunk, forward and backward.

Per chunk of query blocks it gathers the blocks, tokens and summaries each block sees into a
dense key set, runs one batched matmul, a masked softmax and one more matmul. Memory is
O(N x keys per query) for sparse plans; no N x N tensor is built for them. Its backward is the
flash backward written out (recompute p from the lse, then dV, dP, dS, dQ, dK), including what
the fast paths lack: softcap, and gradients of ALiBi slopes, of a general mask and of the lse.
It runs on any device and is what the other executors are tested against.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from danon.core.attention_args import AttentionArgs, BackwardArgs
from danon.core.blocks import near_block_table, query_layout
from danon.core.dtypes import accumulation_dtype

# Elements of the logit tensor one chunk may hold: bounds the executor's working memory.
LOGIT_BUDGET = 1 << 22


def _with_window(block_idx, window, tq, tk, causal, B, Hkv, device, first):
    near = near_block_table(tq, tk, window, causal, B, Hkv, device, first=first)
    return near if block_idx is None else torch.cat([near, block_idx.to(torch.int32)], -1)


class Problem:
    """One attention call, padded to whole blocks and upcast to the accumulation dtype."""

    def __init__(self, a: AttentionArgs):
        q, k, v, block_idx, block_size, window, causal = a.q, a.k, a.v, a.block_idx, a.block_size, a.window, a.causal
        token_idx, summary_idx, summary_k, summary_v = a.token_idx, a.summary_idx, a.summary_k, a.summary_v
        self.dtype = accumulation_dtype(q.dtype)
        self.B, self.H, self.nq, self.D = q.shape
        self.Hkv, self.nk = k.shape[1], k.shape[2]
        self.Dv = v.shape[3]
        self.G = self.H // self.Hkv
        self.b = b = block_size
        # row i is position Nk - Nq + i: `pad` rows before it make whole blocks, local block t is absolute first + t
        self.pad, self.first, self.tq = query_layout(self.nq, self.nk, b)
        self.tk = -(-self.nk // b)
        self.scale, self.causal, self.softcap = a.scale, causal, a.softcap
        self.band = a.band if a.band >= 0 else None
        if window >= 0:   # the near window as explicit blocks, ahead of the listed ones
            block_idx = _with_window(block_idx, window, self.tq, self.tk, causal, q.shape[0], k.shape[1], q.device,
                                     self.first)
        self.dense = block_idx is None and token_idx is None and summary_idx is None
        self.block_idx, self.token_idx, self.summary_idx = block_idx, token_idx, summary_idx
        self.summary_count, self.summary_pos = a.summary_count, a.summary_pos
        self.attn_mask = a.attn_mask
        # padded inputs in the accumulation dtype
        self.q = self.query_rows(q)
        self.k = self.pad_rows(k, self.tk * b)
        self.v = self.pad_rows(v, self.tk * b)
        self.summary_k = None if summary_k is None else summary_k.to(self.dtype)
        self.summary_v = None if summary_v is None else summary_v.to(self.dtype)
        self.slopes = None if a.slopes is None else a.slopes.to(self.dtype)
        key_ok = torch.ones(self.B, self.nk, dtype=torch.bool, device=q.device)
        if a.key_padding_mask is not None:
            key_ok = a.key_padding_mask.to(torch.bool).expand(self.B, self.nk)
        self.key_ok = F.pad(key_ok, (0, self.tk * b - self.nk), value=False)       # [B, Tk*b]
        self.work = self.key_slots()

    def pad_rows(self, x: Tensor, rows: int) -> Tensor:
        x = x.to(self.dtype)
        return F.pad(x, (0, 0, 0, rows - x.shape[2]))

    def query_rows(self, x: Tensor) -> Tensor:
        """[B, H, Nq, ...] -> [B, H, Tq*b, ...] in whole query blocks: `pad` rows before the first, the rest after."""
        x = x.to(self.dtype)
        tail = (0, 0) * (x.dim() - 3)
        return F.pad(x, tail + (self.pad, self.tq * self.b - x.shape[2] - self.pad))

    def call_rows(self, x: Tensor) -> Tensor:
        """[B, H, Tq*b, ...] -> the call's own rows [B, H, Nq, ...]."""
        return x[:, :, self.pad:self.pad + self.nq]

    def key_slots(self) -> int:
        """Key slots per query row of a chunk (blocks padded whole): what bounds its working memory."""
        if self.dense:
            return self.tk * self.b
        n = 0
        for idx, per in ((self.block_idx, self.b), (self.token_idx, 1), (self.summary_idx, 1)):
            if idx is not None:
                n += idx.shape[-1] * per
        return max(n, 1)

    def chunks(self):
        per_block = self.B * self.H * self.b * self.work
        step = max(1, LOGIT_BUDGET // max(per_block, 1))
        for t0 in range(0, self.tq, step):
            yield t0, min(self.tq, t0 + step)

    # --- layout: rows of a chunk are [B, Hkv, C, G * b] (one key set per query block and kv head)
    def to_chunk_rows(self, x: Tensor, t0: int, t1: int) -> Tensor:
        """[B, H, Tq*b, ...] -> [B, Hkv, C, G*b, ...] for query blocks t0..t1."""
        c, b = t1 - t0, self.b
        x = x[:, :, t0 * b:t1 * b]
        tail = x.shape[3:]
        x = x.reshape(self.B, self.Hkv, self.G, c, b, *tail).transpose(2, 3)
        return x.reshape(self.B, self.Hkv, c, self.G * b, *tail)

    def from_chunk_rows(self, x: Tensor, t0: int, t1: int) -> Tensor:
        c, b = t1 - t0, self.b
        tail = x.shape[4:]
        x = x.reshape(self.B, self.Hkv, c, self.G, b, *tail).transpose(2, 3)
        return x.reshape(self.B, self.H, c * b, *tail)

    def _gather_rows(self, table: Tensor, idx: Tensor) -> Tensor:
        """table [B, Hkv, R, X], idx [B, Hkv, C, K] (>= 0) -> [B, Hkv, C, K, X] by one index_select."""
        B, Hkv, R, X = table.shape
        base = (torch.arange(B * Hkv, device=idx.device) * R).view(B, Hkv, 1, 1)
        flat = (idx + base).reshape(-1)
        return table.reshape(B * Hkv * R, X).index_select(0, flat).view(*idx.shape, X)

    def _gather_key_ok(self, pos: Tensor) -> Tensor:
        B = self.B
        return torch.gather(self.key_ok, 1, pos.reshape(B, -1)).view(pos.shape)

    def key_set(self, t0: int, t1: int) -> dict:
        """The keys query blocks t0..t1 see: gathered keys/values, validity, positions, summary bias.

        Also returns where each gathered piece came from, so the backward can add its gradient back.
        """
        b, k, v = self.b, self.k, self.v
        if self.dense:
            # causal: keys up to the chunk's last block (at least one key: rows before every key are masked)
            kend = max(min((t1 + self.first) * b, self.tk * b), 1) if self.causal else self.tk * b
            pos = torch.arange(kend, device=k.device)
            return dict(keys=k[:, :, None, :kend], values=v[:, :, None, :kend],
                        ok=self.key_ok[:, None, None, :kend], pos=pos.view(1, 1, 1, kend),
                        n_exact=kend, summary_bias=None, summary_pos=None, sources=[("dense", kend)])
        keys, values, ok, pos, sources = [], [], [], [], []
        B, Hkv, c = self.B, self.Hkv, t1 - t0
        if self.block_idx is not None:
            bidx = self.block_idx[:, :, t0:t1].long()
            bc = bidx.clamp(min=0)
            kb = k.reshape(B, Hkv, self.tk, b * self.D)
            vb = v.reshape(B, Hkv, self.tk, b * self.Dv)
            keys.append(self._gather_rows(kb, bc).view(B, Hkv, c, -1, self.D))
            values.append(self._gather_rows(vb, bc).view(B, Hkv, c, -1, self.Dv))
            p = (bc[..., None] * b + torch.arange(b, device=bc.device)).view(B, Hkv, c, -1)
            pos.append(p)
            ok.append((bidx >= 0)[..., None].expand(*bidx.shape, b).reshape(B, Hkv, c, -1) & self._gather_key_ok(p))
            sources.append(("rows", p))
        if self.token_idx is not None:
            tidx = self.token_idx[:, :, t0:t1].long()
            tc = tidx.clamp(min=0)
            keys.append(self._gather_rows(k, tc))
            values.append(self._gather_rows(v, tc))
            pos.append(tc)
            ok.append((tidx >= 0) & self._gather_key_ok(tc))
            sources.append(("rows", tc))
        n_exact = sum(p.shape[-1] for p in pos)
        summary_bias = summary_pos = None
        if self.summary_idx is not None:
            sidx = self.summary_idx[:, :, t0:t1].long()
            sc = sidx.clamp(min=0)
            keys.append(self._gather_rows(self.summary_k, sc))
            values.append(self._gather_rows(self.summary_v, sc))
            ok.append(sidx >= 0)
            count = torch.gather(self.summary_count.to(self.dtype).expand(B, Hkv, -1), 2, sc.view(B, Hkv, -1))
            summary_bias = torch.log(count.clamp(min=1)).view(B, Hkv, c, -1)
            if self.summary_pos is not None:
                summary_pos = torch.gather(self.summary_pos.to(self.dtype).expand(B, Hkv, -1), 2,
                                           sc.view(B, Hkv, -1)).view(B, Hkv, c, -1)
            sources.append(("summaries", sc))
        return dict(keys=torch.cat(keys, 3), values=torch.cat(values, 3), ok=torch.cat(ok, 3),
                    pos=torch.cat(pos, 3) if pos else None, n_exact=n_exact,
                    summary_bias=summary_bias, summary_pos=summary_pos, sources=sources)

    def logits(self, q_rows: Tensor, ks: dict, t0: int, t1: int):
        """Masked logits [B, Hkv, C, G*b, L], plus what the backward needs: tanh (softcap), |i - j| (ALiBi)."""
        b, c = self.b, t1 - t0
        n_exact = ks["n_exact"]
        logits = torch.matmul(q_rows, ks["keys"].transpose(-1, -2)) * self.scale
        tanh = dist = None
        if self.softcap is not None:
            tanh = torch.tanh(logits / self.softcap)
            logits = self.softcap * tanh
        allowed = ks["ok"][..., None, :]                                               # [B, Hkv|1, C|1, 1, L]
        # query position of each row: block t0 + c, offset r within the block, for each of G heads
        q_pos = (((torch.arange(t0, t1, device=q_rows.device) + self.first) * b)[:, None, None]
                 + torch.arange(b, device=q_rows.device)).expand(c, self.G, b).reshape(1, 1, c, self.G * b, 1)
        n_summaries = 0 if ks["summary_bias"] is None else ks["summary_bias"].shape[-1]
        if (self.causal or self.band is not None) and n_exact:
            offset = q_pos - ks["pos"][..., None, :]                                  # i - j
            position_ok = torch.ones_like(offset, dtype=torch.bool)
            if self.causal:
                position_ok = offset >= 0
            if self.band is not None:   # the sliding window of tokens
                position_ok = position_ok & (offset < self.band) & (-offset < self.band)
            if n_summaries:        # summaries are strictly in the past by construction
                position_ok = F.pad(position_ok, (0, n_summaries), value=True)
            allowed = allowed & position_ok
        if n_summaries:
            logits = logits + F.pad(ks["summary_bias"], (n_exact, 0))[..., None, :]
        if self.slopes is not None:
            pieces = [] if not n_exact else [ks["pos"].to(self.dtype)]
            if n_summaries:
                pieces.append(ks["summary_pos"] if ks["summary_pos"] is not None
                              else torch.zeros_like(ks["summary_bias"]))
            dist = (q_pos.to(self.dtype) - torch.cat(pieces, -1)[..., None, :]).abs()
            logits = logits - self.slope_rows() * dist
        if self.attn_mask is not None:
            m = self.mask_rows(self.attn_mask, t0, t1, logits.shape[-1])
            if m.dtype == torch.bool:
                allowed = allowed & m
            else:
                logits = logits + m
        return logits.masked_fill(~allowed, float("-inf")), tanh, dist

    def slope_rows(self) -> Tensor:
        b = self.b
        return self.slopes.view(self.Hkv, self.G, 1).expand(self.Hkv, self.G, b).reshape(1, self.Hkv, 1, self.G * b, 1)

    def forward_chunk(self, t0: int, t1: int):
        """Output [B, Hkv, C, G*b, Dv] and lse [B, Hkv, C, G*b] of query blocks t0..t1."""
        ks = self.key_set(t0, t1)
        logits, _, _ = self.logits(self.to_chunk_rows(self.q, t0, t1), ks, t0, t1)
        m = logits.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(logits - m)
        s = p.sum(-1, keepdim=True)
        out = torch.matmul(p, ks["values"]) / s.clamp(min=torch.finfo(self.dtype).tiny)
        lse = torch.where(s > 0, m + torch.log(s.clamp(min=torch.finfo(self.dtype).tiny)),
                          torch.full_like(s, float("-inf")))
        return out, lse[..., 0]

    def backward_chunk(self, t0: int, t1: int, go: Tensor, o: Tensor, lse: Tensor, glse: Optional[Tensor], grads: dict):
        """Add the gradients of query blocks t0..t1 into `grads`; returns dq rows (hand-written flash backward)."""
        q_rows = self.to_chunk_rows(self.q, t0, t1)
        ks = self.key_set(t0, t1)
        logits, tanh, dist = self.logits(q_rows, ks, t0, t1)
        p = torch.exp(logits - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
        go_rows = self.to_chunk_rows(go, t0, t1)
        d_values = torch.matmul(p.transpose(-1, -2), go_rows)                          # [B, Hkv, C|1, L, Dv]
        dp = torch.matmul(go_rows, ks["values"].transpose(-1, -2))
        delta = (go_rows * self.to_chunk_rows(o, t0, t1)).sum(-1, keepdim=True)
        ds = p * (dp - delta)                                                           # d loss / d logit
        if glse is not None:
            ds = ds + p * self.to_chunk_rows(glse, t0, t1)[..., None]
        if "mask" in grads:
            grads["mask"][:, :, t0 * self.b:t1 * self.b, :ds.shape[-1]] += self.from_chunk_rows(ds, t0, t1)
        if "slopes" in grads:
            per_row = -(ds * dist).sum(-1)                                              # [B, Hkv, C, G*b]
            grads["slopes"] += per_row.reshape(self.B, self.Hkv, -1, self.G, self.b).sum((0, 2, 4)).reshape(-1)
        if tanh is not None:
            ds = ds * (1 - tanh * tanh)
        ds = ds * self.scale
        dq_rows = torch.matmul(ds, ks["keys"])
        d_keys = torch.matmul(ds.transpose(-1, -2), q_rows)                            # [B, Hkv, C|1, L, D]
        self.add_key_grads(ks, d_keys, d_values, grads)
        return dq_rows

    def add_key_grads(self, ks: dict, d_keys: Tensor, d_values: Tensor, grads: dict) -> None:
        start = 0
        for kind, where in ks["sources"]:
            if kind == "dense":
                grads["k"][:, :, :where] += d_keys.sum(2)
                grads["v"][:, :, :where] += d_values.sum(2)
                continue
            width = where.shape[-1]
            dk, dv = d_keys[:, :, :, start:start + width], d_values[:, :, :, start:start + width]
            start += width
            if kind == "rows":
                targets = ("k", "v")
            elif "sk" in grads:
                targets = ("sk", "sv")
            else:
                continue
            for name, g in zip(targets, (dk, dv)):
                table = grads[name]
                base = (torch.arange(self.B * self.Hkv, device=where.device) * table.shape[2]).view(self.B, self.Hkv, 1, 1)
                table.view(-1, table.shape[-1]).index_add_(0, (where + base).reshape(-1), g.reshape(-1, g.shape[-1]))

    def mask_rows(self, attn_mask: Tensor, t0: int, t1: int, kend: int) -> Tensor:
        """The general mask's rows for query blocks t0..t1 in chunk layout [B, Hkv, C, G*b, kend]."""
        b = self.b
        lo, hi = max(t0 * b - self.pad, 0), min(t1 * b - self.pad, self.nq)    # the call's rows in the chunk
        m = attn_mask.expand(self.B, self.H, self.nq, self.nk)[:, :, lo:hi, :min(kend, self.nk)]
        before = lo - (t0 * b - self.pad)
        rows, cols = (t1 - t0) * b - m.shape[2] - before, kend - m.shape[3]
        if m.dtype == torch.bool:
            m = F.pad(m, (0, cols, before, rows), value=False)
        else:
            m = F.pad(m.to(self.dtype), (0, cols, before, rows))
        return self.to_chunk_rows(m, 0, t1 - t0)


def reference_forward(a: AttentionArgs):
    """out [B, H, Nq, Dv] in q's dtype and lse [B, H, Nq] in the accumulation dtype."""
    prob = Problem(a)
    q = a.q
    B, H, b = prob.B, prob.H, prob.b
    out = q.new_full((B, H, prob.tq * b, prob.Dv), float("nan"), dtype=prob.dtype)   # poisoned until written
    lse = q.new_full((B, H, prob.tq * b), float("nan"), dtype=prob.dtype)
    for t0, t1 in prob.chunks():
        o, l = prob.forward_chunk(t0, t1)
        out[:, :, t0 * b:t1 * b] = prob.from_chunk_rows(o, t0, t1)
        lse[:, :, t0 * b:t1 * b] = prob.from_chunk_rows(l, t0, t1)
    return prob.call_rows(out).to(q.dtype), prob.call_rows(lse)


def reference_backward(a: AttentionArgs, g: BackwardArgs, use_lse: bool):
    """(dq, dk, dv, d_summary_k, d_summary_v, d_attn_mask, d_slopes); grads not asked for are empty.

    Written out by hand (no autograd inside: a custom op's kernel runs below the autograd key).
    """
    q, k, v, attn_mask = a.q, a.k, a.v, a.attn_mask
    empty = q.new_empty(0)
    prob = Problem(a)
    b, rows = prob.b, prob.tq * prob.b
    # Contiguous tables whatever the inputs' strides: add_key_grads scatters into them through flat views.
    dense = dict(memory_format=torch.contiguous_format)
    grads = {"k": torch.zeros_like(prob.k, **dense), "v": torch.zeros_like(prob.v, **dense)}
    if g.need_summary_grad and prob.summary_k is not None:
        grads["sk"] = torch.zeros_like(prob.summary_k, **dense)
        grads["sv"] = torch.zeros_like(prob.summary_v, **dense)
    if g.need_mask_grad and attn_mask is not None:
        grads["mask"] = torch.zeros(prob.B, prob.H, rows, prob.tk * b, dtype=prob.dtype, device=q.device)
    if g.need_slopes_grad and prob.slopes is not None:
        grads["slopes"] = torch.zeros_like(prob.slopes)
    go = prob.query_rows(g.grad_out)
    o = prob.query_rows(g.out)
    l = prob.query_rows(g.lse)
    gl = prob.query_rows(g.grad_lse) if use_lse else None
    dq = torch.zeros_like(prob.q)
    for t0, t1 in prob.chunks():
        dq_rows = prob.backward_chunk(t0, t1, go, o, prob.to_chunk_rows(l, t0, t1), gl, grads)
        dq[:, :, t0 * b:t1 * b] = prob.from_chunk_rows(dq_rows, t0, t1)

    def grad_of(name, like):
        return grads[name].to(like.dtype) if name in grads else empty

    d_mask = empty
    if "mask" in grads:   # reduce over the dimensions the mask was broadcast along
        full = prob.call_rows(grads["mask"])[:, :, :, :prob.nk]
        d_mask = full.sum_to_size(attn_mask.shape).to(attn_mask.dtype)
    return (prob.call_rows(dq).to(q.dtype), grad_of("k", k)[:, :, :prob.nk], grad_of("v", v)[:, :, :prob.nk],
            grad_of("sk", a.summary_k), grad_of("sv", a.summary_v), d_mask, grad_of("slopes", a.slopes))
