"""Triton kernels of the plan executor: forward, and the two backward passes (DESIGN.md section 4).

One program owns BLOCK_M query rows of one query head (BLOCK_M divides the plan's block size b, so
the rows lie in one query block t_q) and walks the plan's four key sources with a flash-style online
softmax in fp32, in log2 units (exp2 is the fast exponential):

- the near range: query block t_q's window blocks, one contiguous key range (the dense plan is a
  window that covers every block), tiles of BLOCK_N keys;
- listed blocks (block_idx): b keys each, tiles of BLOCK_N;
- listed tokens (token_idx): gathered rows, BLOCK_T at a time;
- summaries (summary_idx): gathered rows of the summary table, with the log-count bias.

Exact keys (the first three) get the causal, band and key-padding masks token by token; every key
gets the ALiBi bias -slope * |i - pos| and the softcap. GQA: kv head = query head // G.

Backward: `_backward_dq` recomputes each program's logits, writes dq, and adds the gradients of
listed blocks, tokens and summaries with atomics (a key there can be listed by any query block);
`_backward_dkdv_near` owns BLOCK_N keys of one kv head and adds the near range's dk, dv by walking
the query blocks whose window holds them (the window is symmetric, so its inverse is a range too).

This file is loaded twice by danon/kernels/triton.py: compiled for CUDA tensors and interpreted for CPU
tensors (Triton picks compile or interpret when @triton.jit runs, not at launch).
"""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
KERNELS = ("_forward", "_backward_dq", "_backward_dkdv_near")   # the entry points; the rest are helpers


# Only Triton builtins and this file's own @triton.jit functions are used: triton.language's jit'd
# helpers (tl.sum, tl.max, tl.zeros, tl.sigmoid) were compiled-mode objects when triton was imported
# and cannot run in the interpreter; reducing with their combine functions keeps the interpreter's
# numpy fast paths (it recognises them by identity).
@triton.jit
def _reduce_sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _reduce_max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def _mm(a, b, IP: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST: the interpreter's bf16 dot is wrong (numpy has no bf16), so
    there the (already rounded) bf16 operands are multiplied in fp32, which is exact for their products."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=IP)


@triton.jit
def _rows(base, pos, ok, stride_n, stride_d, cols, ncols):
    """Rows `pos` of a [N, X] matrix (zeros where not ok or past the last column)."""
    ptrs = base + pos[:, None].to(tl.int64) * stride_n + cols[None, :] * stride_d
    return tl.load(ptrs, mask=ok[:, None] & (cols[None, :] < ncols), other=0.0)


@triton.jit
def _scores(q, k, rows, kpos, kposf, key_ok, bias, slope, scale, softcap, nq, band,
            EXACT: tl.constexpr, CAUSAL: tl.constexpr, HAS_BAND: tl.constexpr, HAS_BIAS: tl.constexpr,
            HAS_SLOPES: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IP: tl.constexpr, UPCAST: tl.constexpr):
    """Logits of one tile in log2 units [BLOCK_M, BLOCK_N], -inf where masked, and tanh (softcap)."""
    qk = _mm(q, tl.trans(k), IP, UPCAST)
    if HAS_SOFTCAP:
        th = 2.0 / (1.0 + tl.exp(qk * (-2.0 * scale / softcap))) - 1.0    # tanh(x) = 2 sigmoid(2x) - 1
        s = th * (softcap * 1.4426950408889634)
    else:
        th = qk
        s = qk * (scale * 1.4426950408889634)
    ok = key_ok[None, :] & (rows < nq)[:, None]
    if EXACT:
        off = rows[:, None] - kpos[None, :]                           # i - j
        if CAUSAL:
            ok = ok & (off >= 0)
        if HAS_BAND:
            ok = ok & (off < band) & (-off < band)
    if HAS_BIAS:
        s = s + bias[None, :] * 1.4426950408889634
    if HAS_SLOPES:
        s = s - (slope * 1.4426950408889634) * tl.abs(rows.to(tl.float32)[:, None] - kposf[None, :])
    s = tl.where(ok, s, float("-inf"))
    return s, th


@triton.jit
def _online(acc, m_i, l_i, s, v, IP: tl.constexpr, UPCAST: tl.constexpr):
    """One step of the online softmax: rows whose keys are all masked so far keep m = -inf, l = 0."""
    m_new = tl.maximum(m_i, _reduce_max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + _reduce_sum(p, 1)
    acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, IP, UPCAST)
    return acc, m_new, l_i


@triton.jit
def _grad(dq, dsl, q, do, k, v, rows, kpos, kposf, key_ok, bias, slope, lse2, delta, scale, softcap, nq, band,
          EXACT: tl.constexpr, CAUSAL: tl.constexpr, HAS_BAND: tl.constexpr, HAS_BIAS: tl.constexpr,
          HAS_SLOPES: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_SLOPES: tl.constexpr, IP: tl.constexpr, UPCAST: tl.constexpr):
    """The flash backward of one tile: returns dq, the slope gradient per row, p and dS (scaled, for dk)."""
    s, th = _scores(q, k, rows, kpos, kposf, key_ok, bias, slope, scale, softcap, nq, band,
                    EXACT, CAUSAL, HAS_BAND, HAS_BIAS, HAS_SLOPES, HAS_SOFTCAP, IP, UPCAST)
    p = tl.exp2(s - lse2[:, None])
    dp = _mm(do, tl.trans(v), IP, UPCAST)
    ds = p * (dp - delta[:, None])                                    # d loss / d logit
    if NEED_SLOPES:
        dist = tl.abs(rows.to(tl.float32)[:, None] - kposf[None, :])
        dsl = dsl - _reduce_sum(ds * dist, 1)
    if HAS_SOFTCAP:
        ds = ds * (1.0 - th * th)
    ds = ds * scale
    dq = dq + _mm(ds.to(k.dtype), k, IP, UPCAST)
    return dq, dsl, p, ds


@triton.jit
def _near_keys(t_q, m0, window, band, nk, b, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_BAND: tl.constexpr):
    """Key range [lo, hi) of query block t_q's window, trimmed to what rows m0..m0+BLOCK_M can see."""
    lo = tl.maximum(t_q - window, 0) * b
    if CAUSAL:
        hi = tl.minimum(tl.minimum(t_q + 1, (nk + b - 1) // b) * b, m0 + BLOCK_M)
    else:
        hi = tl.minimum(t_q + window + 1, (nk + b - 1) // b) * b
    if HAS_BAND:
        lo = tl.maximum(lo, m0 - band + 1)
        if not CAUSAL:
            hi = tl.minimum(hi, m0 + BLOCK_M - 1 + band)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.minimum(hi, nk)
    return lo, hi


@triton.jit
def _query_tile(pid_m, qoff, nq, b, BLOCK_M: tl.constexpr):
    """The rows of program pid_m. The call's row i is position qoff + i (queries after a cache: qoff = Nk - Nq;
    0 for self-attention); programs tile whole query blocks from block qoff // b. Returns (first position m0,
    absolute query block, positions, row indices, which rows exist, the block's row in the plan lists)."""
    first = qoff // b
    m0 = first * b + pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    ri = rows - qoff
    return m0, m0 // b, rows, ri, (ri >= 0) & (ri < nq), m0 // b - first


@triton.jit
def _forward(Q, K, V, O, LSE, KPM, BIDX, TIDX, SIDX, SK, SV, SCNT, SPOS, SLOPES,
             sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
             H, HKV, G, nq, nk, b, tq, qoff, window, band, n_blocks, n_tokens, n_summ, S, scale, softcap,
             D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
             CAUSAL: tl.constexpr, NEAR: tl.constexpr, HAS_KPM: tl.constexpr, HAS_BAND: tl.constexpr,
             HAS_BLOCKS: tl.constexpr, HAS_TOKENS: tl.constexpr, HAS_SUMM: tl.constexpr, HAS_SPOS: tl.constexpr,
             HAS_SLOPES: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IP: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bb = pid_bh // H
    h = pid_bh % H
    hkv = h // G
    m0, t_q, rows, ri, row_ok, plan_t = _query_tile(pid_m, qoff, nq, b, BLOCK_M)
    cd = tl.arange(0, BLOCK_D)
    cv = tl.arange(0, BLOCK_DV)
    cn = tl.arange(0, BLOCK_N)
    ct = tl.arange(0, BLOCK_T)
    q = _rows(Q + bb.to(tl.int64) * sqb + h.to(tl.int64) * sqh, ri, row_ok, sqn, sqd, cd, D)
    nq = qoff + nq                                              # from here on: the end of the rows' positions
    k_base = K + bb.to(tl.int64) * skb + hkv.to(tl.int64) * skh
    v_base = V + bb.to(tl.int64) * svb + hkv.to(tl.int64) * svh
    kpm_base = KPM + bb.to(tl.int64) * nk
    plan_row = (bb * HKV + hkv) * tq + plan_t                   # row of the [B, Hkv, Tq, K] plan lists
    slope = 0.0
    if HAS_SLOPES:
        slope = tl.load(SLOPES + h).to(tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    zero_n = tl.full([BLOCK_N], 0.0, tl.float32)
    zero_t = tl.full([BLOCK_T], 0.0, tl.float32)

    if NEAR:
        lo, hi = _near_keys(t_q, m0, window, band, nk, b, BLOCK_M, BLOCK_N, CAUSAL, HAS_BAND)
        for n0 in range(lo, hi, BLOCK_N):
            kpos = n0 + cn
            ok = kpos < nk
            if HAS_KPM:
                ok = ok & (tl.load(kpm_base + kpos, mask=ok, other=0) != 0)
            k = _rows(k_base, kpos, ok, skn, skd, cd, D)
            v = _rows(v_base, kpos, ok, svn, svd, cv, DV)
            s, _ = _scores(q, k, rows, kpos, kpos.to(tl.float32), ok, zero_n, slope, scale, softcap, nq, band,
                           True, CAUSAL, HAS_BAND, False, HAS_SLOPES, HAS_SOFTCAP, IP, UPCAST)
            acc, m_i, l_i = _online(acc, m_i, l_i, s, v, IP, UPCAST)
    if HAS_BLOCKS:
        for j in range(0, n_blocks):
            blk = tl.load(BIDX + plan_row.to(tl.int64) * n_blocks + j)
            if blk >= 0:
                for sub in range(0, b, BLOCK_N):
                    kpos = blk * b + sub + cn
                    ok = kpos < nk
                    if HAS_KPM:
                        ok = ok & (tl.load(kpm_base + kpos, mask=ok, other=0) != 0)
                    k = _rows(k_base, kpos, ok, skn, skd, cd, D)
                    v = _rows(v_base, kpos, ok, svn, svd, cv, DV)
                    s, _ = _scores(q, k, rows, kpos, kpos.to(tl.float32), ok, zero_n, slope, scale, softcap, nq,
                                   band, True, CAUSAL, HAS_BAND, False, HAS_SLOPES, HAS_SOFTCAP, IP, UPCAST)
                    acc, m_i, l_i = _online(acc, m_i, l_i, s, v, IP, UPCAST)
    if HAS_TOKENS:
        for j0 in range(0, n_tokens, BLOCK_T):
            idx = tl.load(TIDX + plan_row.to(tl.int64) * n_tokens + j0 + ct, mask=j0 + ct < n_tokens, other=-1)
            ok = (idx >= 0) & (idx < nk)
            kpos = tl.where(ok, idx, 0)
            if HAS_KPM:
                ok = ok & (tl.load(kpm_base + kpos, mask=ok, other=0) != 0)
            k = _rows(k_base, kpos, ok, skn, skd, cd, D)
            v = _rows(v_base, kpos, ok, svn, svd, cv, DV)
            s, _ = _scores(q, k, rows, kpos, kpos.to(tl.float32), ok, zero_t, slope, scale, softcap, nq, band,
                           True, CAUSAL, HAS_BAND, False, HAS_SLOPES, HAS_SOFTCAP, IP, UPCAST)
            acc, m_i, l_i = _online(acc, m_i, l_i, s, v, IP, UPCAST)
    if HAS_SUMM:
        table = (bb * HKV + hkv).to(tl.int64) * S                   # this kv head's rows of the summary table
        for j0 in range(0, n_summ, BLOCK_T):
            idx = tl.load(SIDX + plan_row.to(tl.int64) * n_summ + j0 + ct, mask=j0 + ct < n_summ, other=-1)
            ok = idx >= 0
            sidx = tl.where(ok, idx, 0)
            k = _rows(SK + table * D, sidx, ok, D, 1, cd, D).to(q.dtype)
            v = _rows(SV + table * DV, sidx, ok, DV, 1, cv, DV).to(q.dtype)
            bias = tl.log(tl.maximum(tl.load(SCNT + table + sidx, mask=ok, other=1.0), 1.0))
            spos = zero_t
            if HAS_SPOS:
                spos = tl.load(SPOS + table + sidx, mask=ok, other=0.0)
            s, _ = _scores(q, k, rows, sidx, spos, ok, bias, slope, scale, softcap, nq, band,
                           False, CAUSAL, HAS_BAND, True, HAS_SLOPES, HAS_SOFTCAP, IP, UPCAST)
            acc, m_i, l_i = _online(acc, m_i, l_i, s, v, IP, UPCAST)

    dead = l_i == 0.0                                              # a row that saw no key: out 0, lse -inf
    out = acc / tl.where(dead, 1.0, l_i)[:, None]
    lse = tl.where(dead, float("-inf"), (m_i + tl.log2(tl.where(dead, 1.0, l_i))) * 0.6931471805599453)
    o_ptrs = O + bb.to(tl.int64) * sob + h.to(tl.int64) * soh + ri[:, None].to(tl.int64) * son + cv[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (cv[None, :] < DV))
    tl.store(LSE + pid_bh.to(tl.int64) * (nq - qoff) + ri, lse, mask=row_ok)


@triton.jit
def _backward_dq(Q, K, V, DO, LSE, DELTA, GQ, GK, GV, GSK, GSV, GSL, KPM, BIDX, TIDX, SIDX, SK, SV, SCNT, SPOS,
                 SLOPES,
                 sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
                 H, HKV, G, nq, nk, b, tq, qoff, window, band, n_blocks, n_tokens, n_summ, S, scale, softcap,
                 D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 CAUSAL: tl.constexpr, NEAR: tl.constexpr, HAS_KPM: tl.constexpr, HAS_BAND: tl.constexpr,
                 HAS_BLOCKS: tl.constexpr, HAS_TOKENS: tl.constexpr, HAS_SUMM: tl.constexpr,
                 HAS_SPOS: tl.constexpr, HAS_SLOPES: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 NEED_SUMM: tl.constexpr, NEED_SLOPES: tl.constexpr, IP: tl.constexpr, UPCAST: tl.constexpr):
    """dq of BLOCK_M rows over every key source; listed keys' dk, dv (and summaries') by atomic adds."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bb = pid_bh // H
    h = pid_bh % H
    hkv = h // G
    m0, t_q, rows, ri, row_ok, plan_t = _query_tile(pid_m, qoff, nq, b, BLOCK_M)
    cd = tl.arange(0, BLOCK_D)
    cv = tl.arange(0, BLOCK_DV)
    cn = tl.arange(0, BLOCK_N)
    ct = tl.arange(0, BLOCK_T)
    q = _rows(Q + bb.to(tl.int64) * sqb + h.to(tl.int64) * sqh, ri, row_ok, sqn, sqd, cd, D)
    do = _rows(DO + bb.to(tl.int64) * sdb + h.to(tl.int64) * sdh, ri, row_ok, sdn, sdd, cv, DV)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * nq + ri, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)   # dead rows: every p is 0 anyway
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * nq + ri, mask=row_ok, other=0.0)
    dq_ptrs = GQ + pid_bh.to(tl.int64) * nq * D + ri[:, None].to(tl.int64) * D + tl.arange(0, BLOCK_D)[None, :]
    nq = qoff + nq                                              # from here on: the end of the rows' positions
    k_base = K + bb.to(tl.int64) * skb + hkv.to(tl.int64) * skh
    v_base = V + bb.to(tl.int64) * svb + hkv.to(tl.int64) * svh
    kv_row = (bb * HKV + hkv).to(tl.int64)
    dk_base = GK + kv_row * nk * D                                  # dk, dv: contiguous fp32 [B, Hkv, Nk, D]
    dv_base = GV + kv_row * nk * DV
    kpm_base = KPM + bb.to(tl.int64) * nk
    plan_row = (bb * HKV + hkv) * tq + plan_t
    slope = 0.0
    if HAS_SLOPES:
        slope = tl.load(SLOPES + h).to(tl.float32)
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    dsl = tl.full([BLOCK_M], 0.0, tl.float32)
    zero_n = tl.full([BLOCK_N], 0.0, tl.float32)
    zero_t = tl.full([BLOCK_T], 0.0, tl.float32)

    if NEAR:   # dk, dv of the near range come from _backward_dkdv_near
        lo, hi = _near_keys(t_q, m0, window, band, nk, b, BLOCK_M, BLOCK_N, CAUSAL, HAS_BAND)
        for n0 in range(lo, hi, BLOCK_N):
            kpos = n0 + cn
            ok = kpos < nk
            if HAS_KPM:
                ok = ok & (tl.load(kpm_base + kpos, mask=ok, other=0) != 0)
            k = _rows(k_base, kpos, ok, skn, skd, cd, D)
            v = _rows(v_base, kpos, ok, svn, svd, cv, DV)
            dq, dsl, p, ds = _grad(dq, dsl, q, do, k, v, rows, kpos, kpos.to(tl.float32), ok, zero_n, slope, lse2,
                                   delta, scale, softcap, nq, band, True, CAUSAL, HAS_BAND, False, HAS_SLOPES,
                                   HAS_SOFTCAP, NEED_SLOPES, IP, UPCAST)
    if HAS_BLOCKS:
        for j in range(0, n_blocks):
            blk = tl.load(BIDX + plan_row.to(tl.int64) * n_blocks + j)
            if blk >= 0:
                for sub in range(0, b, BLOCK_N):
                    kpos = blk * b + sub + cn
                    ok = kpos < nk
                    if HAS_KPM:
                        ok = ok & (tl.load(kpm_base + kpos, mask=ok, other=0) != 0)
                    k = _rows(k_base, kpos, ok, skn, skd, cd, D)
                    v = _rows(v_base, kpos, ok, svn, svd, cv, DV)
                    dq, dsl, p, ds = _grad(dq, dsl, q, do, k, v, rows, kpos, kpos.to(tl.float32), ok, zero_n, slope,
                                           lse2, delta, scale, softcap, nq, band, True, CAUSAL, HAS_BAND, False,
                                           HAS_SLOPES, HAS_SOFTCAP, NEED_SLOPES, IP, UPCAST)
                    dk = _mm(tl.trans(ds).to(q.dtype), q, IP, UPCAST)
                    dv = _mm(tl.trans(p).to(do.dtype), do, IP, UPCAST)
                    tl.atomic_add(dk_base + kpos[:, None].to(tl.int64) * D + cd[None, :], dk,
                                  mask=ok[:, None] & (cd[None, :] < D))
                    tl.atomic_add(dv_base + kpos[:, None].to(tl.int64) * DV + cv[None, :], dv,
                                  mask=ok[:, None] & (cv[None, :] < DV))
    if HAS_TOKENS:
        for j0 in range(0, n_tokens, BLOCK_T):
            idx = tl.load(TIDX + plan_row.to(tl.int64) * n_tokens + j0 + ct, mask=j0 + ct < n_tokens, other=-1)
            ok = (idx >= 0) & (idx < nk)
            kpos = tl.where(ok, idx, 0)
            if HAS_KPM:
                ok = ok & (tl.load(kpm_base + kpos, mask=ok, other=0) != 0)
            k = _rows(k_base, kpos, ok, skn, skd, cd, D)
            v = _rows(v_base, kpos, ok, svn, svd, cv, DV)
            dq, dsl, p, ds = _grad(dq, dsl, q, do, k, v, rows, kpos, kpos.to(tl.float32), ok, zero_t, slope, lse2,
                                   delta, scale, softcap, nq, band, True, CAUSAL, HAS_BAND, False, HAS_SLOPES,
                                   HAS_SOFTCAP, NEED_SLOPES, IP, UPCAST)
            dk = _mm(tl.trans(ds).to(q.dtype), q, IP, UPCAST)
            dv = _mm(tl.trans(p).to(do.dtype), do, IP, UPCAST)
            tl.atomic_add(dk_base + kpos[:, None].to(tl.int64) * D + cd[None, :], dk,
                          mask=ok[:, None] & (cd[None, :] < D))
            tl.atomic_add(dv_base + kpos[:, None].to(tl.int64) * DV + cv[None, :], dv,
                          mask=ok[:, None] & (cv[None, :] < DV))
    if HAS_SUMM:
        table = kv_row * S
        for j0 in range(0, n_summ, BLOCK_T):
            idx = tl.load(SIDX + plan_row.to(tl.int64) * n_summ + j0 + ct, mask=j0 + ct < n_summ, other=-1)
            ok = idx >= 0
            sidx = tl.where(ok, idx, 0)
            k = _rows(SK + table * D, sidx, ok, D, 1, cd, D).to(q.dtype)
            v = _rows(SV + table * DV, sidx, ok, DV, 1, cv, DV).to(q.dtype)
            bias = tl.log(tl.maximum(tl.load(SCNT + table + sidx, mask=ok, other=1.0), 1.0))
            spos = zero_t
            if HAS_SPOS:
                spos = tl.load(SPOS + table + sidx, mask=ok, other=0.0)
            dq, dsl, p, ds = _grad(dq, dsl, q, do, k, v, rows, sidx, spos, ok, bias, slope, lse2, delta, scale,
                                   softcap, nq, band, False, CAUSAL, HAS_BAND, True, HAS_SLOPES, HAS_SOFTCAP,
                                   NEED_SLOPES, IP, UPCAST)
            if NEED_SUMM:
                dk = _mm(tl.trans(ds).to(q.dtype), q, IP, UPCAST)
                dv = _mm(tl.trans(p).to(do.dtype), do, IP, UPCAST)
                tl.atomic_add(GSK + (table + sidx[:, None]) * D + cd[None, :], dk, mask=ok[:, None] & (cd[None, :] < D))
                tl.atomic_add(GSV + (table + sidx[:, None]) * DV + cv[None, :], dv,
                              mask=ok[:, None] & (cv[None, :] < DV))

    tl.store(dq_ptrs, dq.to(GQ.dtype.element_ty), mask=row_ok[:, None] & (cd[None, :] < D))   # dq: contiguous
    if NEED_SLOPES:
        tl.atomic_add(GSL + h, _reduce_sum(dsl, 0))


@triton.jit
def _backward_dkdv_near(Q, K, V, DO, LSE, DELTA, GK, GV, KPM, SLOPES,
                        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
                        H, HKV, G, nq, nk, b, qoff, window, band, scale, softcap,
                        D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr,
                        HAS_KPM: tl.constexpr, HAS_BAND: tl.constexpr, HAS_SLOPES: tl.constexpr,
                        HAS_SOFTCAP: tl.constexpr, IP: tl.constexpr, UPCAST: tl.constexpr):
    """dk, dv of BLOCK_N keys of one kv head from the query blocks whose near window holds them.

    Adds to what _backward_dq's atomics left in GK, GV (the kernels run one after the other).
    """
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    bb = pid_bk // HKV
    hkv = pid_bk % HKV
    n0 = pid_n * BLOCK_N
    t = n0 // b                                                     # the key block of these keys
    kpos = n0 + tl.arange(0, BLOCK_N)
    cd = tl.arange(0, BLOCK_D)
    cv = tl.arange(0, BLOCK_DV)
    cm = tl.arange(0, BLOCK_M)
    ok = kpos < nk
    if HAS_KPM:
        ok = ok & (tl.load(KPM + bb.to(tl.int64) * nk + kpos, mask=ok, other=0) != 0)
    k = _rows(K + bb.to(tl.int64) * skb + hkv.to(tl.int64) * skh, kpos, ok, skn, skd, cd, D)
    v = _rows(V + bb.to(tl.int64) * svb + hkv.to(tl.int64) * svh, kpos, ok, svn, svd, cv, DV)
    kposf = kpos.to(tl.float32)
    zero_n = tl.full([BLOCK_N], 0.0, tl.float32)
    # query positions (row i is position qoff + i) whose window holds key block t: blocks t - window ..
    # t + window (causal: t .. t + window); tiles start on the query blocks' grid
    if CAUSAL:
        lo = n0
    else:
        lo = tl.maximum(t - window, 0) * b
    hi = tl.minimum((t + window + 1) * b, qoff + nq)
    if HAS_BAND:
        lo = tl.maximum(lo, n0 - band + 1)
        hi = tl.minimum(hi, n0 + BLOCK_N - 1 + band)
    lo = (tl.maximum(lo, (qoff // b) * b) // BLOCK_M) * BLOCK_M
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_DV], 0.0, tl.float32)
    for g in range(0, G):
        h = hkv * G + g
        bh = (bb * H + h).to(tl.int64)
        slope = 0.0
        if HAS_SLOPES:
            slope = tl.load(SLOPES + h).to(tl.float32)
        q_base = Q + bb.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        do_base = DO + bb.to(tl.int64) * sdb + h.to(tl.int64) * sdh
        for m0 in range(lo, hi, BLOCK_M):
            rows = m0 + cm
            ri = rows - qoff
            row_ok = (ri >= 0) & (ri < nq)
            q = _rows(q_base, ri, row_ok, sqn, sqd, cd, D)
            do = _rows(do_base, ri, row_ok, sdn, sdd, cv, DV)
            lse = tl.load(LSE + bh * nq + ri, mask=row_ok, other=0.0)
            lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
            delta = tl.load(DELTA + bh * nq + ri, mask=row_ok, other=0.0)
            s, th = _scores(q, k, rows, kpos, kposf, ok, zero_n, slope, scale, softcap, qoff + nq, band,
                            True, CAUSAL, HAS_BAND, False, HAS_SLOPES, HAS_SOFTCAP, IP, UPCAST)
            p = tl.exp2(s - lse2[:, None])
            dv += _mm(tl.trans(p).to(do.dtype), do, IP, UPCAST)
            dp = _mm(do, tl.trans(v), IP, UPCAST)
            ds = p * (dp - delta[:, None])
            if HAS_SOFTCAP:
                ds = ds * (1.0 - th * th)
            ds = ds * scale
            dk += _mm(tl.trans(ds).to(q.dtype), q, IP, UPCAST)
    kv_row = (bb * HKV + hkv).to(tl.int64)
    keep = kpos < nk
    dk_ptrs = GK + kv_row * nk * D + kpos[:, None].to(tl.int64) * D + cd[None, :]
    dv_ptrs = GV + kv_row * nk * DV + kpos[:, None].to(tl.int64) * DV + cv[None, :]
    dk_mask = keep[:, None] & (cd[None, :] < D)
    dv_mask = keep[:, None] & (cv[None, :] < DV)
    tl.store(dk_ptrs, tl.load(dk_ptrs, mask=dk_mask, other=0.0) + dk, mask=dk_mask)
    tl.store(dv_ptrs, tl.load(dv_ptrs, mask=dv_mask, other=0.0) + dv, mask=dv_mask)
