"""Dense float64 oracle for danon's attention families.

Written only from DESIGN.md section 3 (and the interpretation details fixed by
the implementer, listed below), independently of the implementation. For every
query i it builds the full logit vector over the exact keys E(i) and the
summary keys S(i), then one softmax and one weighted sum:

    logit(i, j) = scale * q_i . k_j + bias(i, j)                   j in E(i)
    logit(i, s) = scale * q_i . kbar_s + log(n_s) + bias(i, s)      s in S(i)

Interpretation details (fixed by the implementer):

* window w -> W = ceil(w / b) blocks; near blocks of query block t_q are the t
  with |t - t_q| <= W (causal: t_q - W <= t <= t_q);
* query row i sits at position Nk - Nq + i (causal masking aligned bottom-right: key j is
  visible to query i iff j <= Nk - Nq + i; the sparse families here take Nq = Nk);
  key_padding_mask True = attend; inside exact blocks causal and padding masks
  apply token by token;
* a summary's kbar / vbar are the means of the visible (non-padded) keys and
  values of its span, n_s their count; a span without visible token has no
  summary and a block without visible token is never selected;
* UCSA: exact = near + global blocks (t < ceil(global_tokens / b)) + top-k of
  the remaining eligible blocks (eligible = not near, not global, at least one
  visible key; causal: strictly before the query block), scored by
  r(t_q, t) = sum over the kv group's query heads of qbar . kbar_t, qbar = mean
  of q over every position (< Nq) of block t_q; causal: of block t_q - 1 (the
  selection reads no position after any row of the block);
  k = ceil(sparsity_factor * number of key blocks) if sparsity_factor else
  top_k_blocks; causal: ceil(sparsity_factor * (t_q + 1)), the key blocks the
  query block can see; all eligible blocks are taken when fewer exist; summaries
  (compress=True) one per remaining eligible block;
* MSRA: level-l spans are c^l consecutive blocks, span u near at level l iff
  |u - floor(t_q / c^l)| <= W; exact = near level-0 blocks; summaries at
  level l < L: spans not near at l whose parent is near at l + 1; at level L:
  every visible span not near. "auto" levels: smallest L >= 1 with
  ceil(n_blocks / c^L) <= 2W + 1;
* DALA: routed = top memory_size visible tokens outside the near blocks
  (causal: in blocks before the first near block) by importance (default
  ||k_j||_2 per kv head); compress_rest = one summary of every remaining
  candidate; ALiBi bias -lambda_h * |i - j| (summary position = mean position
  of its tokens), lambda_h = 2^(-8 (h + 1) / H) by default, `slopes` [H]
  overrides, decay="none" -> no bias;
* GQA: query head h uses kv head h // (H // Hkv);
* a query row with no visible key gives 0.

Selections (top-k, routing) are computed in float64 and detached; the summary
means are ordinary differentiable torch ops, so the oracle also gives float64
reference gradients.

Only meant for small N (Python loops over batch, kv heads and query blocks).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = [
    "oracle_attention",
    "oracle_plan",
    "alibi_slopes",
    "rel_err",
]

_DEFAULTS = {
    "exact": {"attn_mask": None},
    "ucsa": {
        "local_window_size": 512,
        "global_tokens": 64,
        "top_k_blocks": 16,
        "sparsity_factor": None,
        "compress": True,
        "gamma": None,
    },
    "msra": {"window": 256, "num_levels": 3, "compression_factor": 4},
    "dala": {
        "window": 256,
        "memory_size": 64,
        "importance": None,
        "decay": "alibi",
        "slopes": None,
        "compress_rest": True,
    },
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out = out.detach().double()
    ref = ref.detach().double()
    return ((out - ref).norm() / ref.norm()).item()


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's geometric slopes lambda_h = 2^(-8 (h + 1) / H), float64 [H]."""
    h = torch.arange(num_heads, dtype=torch.float64)
    return torch.pow(2.0, -8.0 * (h + 1) / num_heads)


def _near_blocks(tq: int, W: int, nb: int, causal: bool) -> set:
    if causal:
        lo, hi = tq - W, tq
    else:
        lo, hi = tq - W, tq + W
    return {t for t in range(max(lo, 0), min(hi, nb - 1) + 1)}


def _block_tokens(t: int, b: int, nk: int) -> range:
    return range(t * b, min((t + 1) * b, nk))


def _msra_levels(num_levels, nb: int, W: int, c: int) -> int:
    if isinstance(num_levels, str):
        assert num_levels == "auto"
        L = 1
        while -(-nb // (c ** L)) > 2 * W + 1:
            L += 1
        return L
    return int(num_levels)


def _mass_choice(qbar, k_head, vis_tokens, fixed, eligible, topk, gamma, scale, seen, b, Nk) -> set:
    """UCSA's selection by attention mass, from its definition (docs/design.md): per query head, the softmax over
    the seen blocks of scale * qbar_h . kbar_t + log n_t, averaged over the group; blocks in order of mass,
    each taken while the mass of the fixed (near, global) and the higher-ranked blocks is below gamma."""
    mass = {t: 0.0 for t in seen}
    for h in range(qbar.shape[0]):
        logits = {}
        for t in seen:
            toks = vis_tokens(_block_tokens(t, b, Nk))
            logits[t] = scale * float(qbar[h] @ k_head[toks].mean(dim=0)) + math.log(len(toks))
        top = max(logits.values())
        z = sum(math.exp(x - top) for x in logits.values())
        for t in seen:
            mass[t] += math.exp(logits[t] - top) / z / qbar.shape[0]
    covered = sum(mass[t] for t in seen if t in fixed)
    chosen = set()
    for t in sorted(eligible, key=lambda t: -mass[t])[:topk]:
        if covered >= gamma:
            break
        chosen.add(t)
        covered += mass[t]
    return chosen


def oracle_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    kind: str,
    *,
    causal: bool,
    key_padding_mask: Optional[torch.Tensor],
    block_size: int,
    scale: Optional[float] = None,
    **family_kw,
):
    """The oracle's selection, as Python sets, for every (batch, kv head, query block).

    Returns a dict {(b, g, tq): (exact_blocks: set[int], extra_tokens: set[int],
    summaries: list[list[int]])}. Summaries are listed as the token indices of
    their span (padding still to be excluded: spans are returned whole and the
    caller keeps the visible tokens; empty-after-padding spans are dropped here).
    """
    kw = dict(_DEFAULTS[kind])
    unknown = set(family_kw) - set(kw)
    if unknown:
        raise TypeError(f"oracle: unknown keywords {sorted(unknown)} for {kind}")
    kw.update(family_kw)

    B, H, Nq, D = q.shape
    _, Hkv, Nk, _ = k.shape
    b = block_size
    nb = -(-Nk // b)
    nqb = -(-Nq // b)
    group = H // Hkv
    qd = q.detach().double()
    kd = k.detach().double()
    if key_padding_mask is None:
        pad = torch.ones(B, Nk, dtype=torch.bool)
    else:
        pad = key_padding_mask.to(torch.bool).cpu()

    plans = {}
    for bi in range(B):
        padb = pad[bi]
        blk_vis = [bool(padb[t * b:(t + 1) * b].any()) for t in range(nb)]

        def vis_tokens(tokens):
            return [j for j in tokens if bool(padb[j])]

        for g in range(Hkv):
            for tq in range(nqb):
                exact_blocks: set = set()
                extra: set = set()
                summaries: list = []
                if kind == "exact":
                    exact_blocks = set(range(nb))
                elif kind == "ucsa":
                    W = -(-int(kw["local_window_size"]) // b)
                    G = -(-int(kw["global_tokens"]) // b)
                    near = _near_blocks(tq, W, nb, causal)
                    glob = set(range(min(G, nb)))
                    exact_blocks = near | glob
                    eligible = [
                        t for t in range(nb)
                        if t not in exact_blocks and blk_vis[t] and (not causal or t < tq)
                    ]
                    if kw["sparsity_factor"] is not None:
                        seen = min(tq + 1, nb) if causal else nb
                        topk = math.ceil(float(kw["sparsity_factor"]) * seen)
                    else:
                        topk = int(kw["top_k_blocks"])
                    if eligible and topk > 0:
                        tsel = tq - 1 if causal else tq      # causal: eligible blocks exist only for tq >= 1
                        qs = range(tsel * b, min((tsel + 1) * b, Nq))
                        qbar = qd[bi, g * group:(g + 1) * group, qs.start:qs.stop].mean(dim=1)  # [group, D]
                        qsum = qbar.sum(dim=0)  # sum over the kv group's query heads
                        scores = []
                        for t in eligible:
                            toks = vis_tokens(_block_tokens(t, b, Nk))
                            kbar = kd[bi, g, toks].mean(dim=0)
                            scores.append(float(qsum @ kbar))
                        order = sorted(range(len(eligible)), key=lambda n: -scores[n])
                        chosen = {eligible[n] for n in order[:topk]}
                        if kw["gamma"] is not None:
                            chosen = _mass_choice(qbar, kd[bi, g], vis_tokens, exact_blocks, eligible, topk,
                                                  float(kw["gamma"]), scale or 1.0 / math.sqrt(D),
                                                  [t for t in range(nb) if blk_vis[t] and (not causal or t < tq)],
                                                  b, Nk)
                    else:
                        chosen = set()
                    exact_blocks = exact_blocks | chosen
                    if kw["compress"]:
                        for t in eligible:
                            if t not in chosen:
                                summaries.append(list(_block_tokens(t, b, Nk)))
                elif kind == "msra":
                    W = -(-int(kw["window"]) // b)
                    c = int(kw["compression_factor"])
                    L = _msra_levels(kw["num_levels"], nb, W, c)

                    def near_at(u, l):
                        return abs(u - tq // (c ** l)) <= W

                    exact_blocks = {t for t in range(nb) if near_at(t, 0)}
                    if causal:
                        exact_blocks = {t for t in exact_blocks if t <= tq}
                    seen_spans = set()
                    for t in range(nb):
                        if near_at(t, 0):
                            continue
                        # smallest level m whose ancestor is near
                        lvl = None
                        for l in range(1, L + 1):
                            if near_at(t // (c ** l), l):
                                lvl = l - 1
                                break
                        if lvl is None:
                            lvl = L
                        u = t // (c ** lvl)
                        if (lvl, u) in seen_spans:
                            continue
                        seen_spans.add((lvl, u))
                        t0, t1 = u * c ** lvl, min((u + 1) * c ** lvl, nb)
                        if causal and t1 > tq:
                            # not in the strict past of the query block: must be entirely
                            # in the future (otherwise it would contain a near block).
                            assert t0 > tq, (tq, lvl, u)
                            continue
                        summaries.append(list(range(t0 * b, min(t1 * b, Nk))))
                elif kind == "dala":
                    W = -(-int(kw["window"]) // b)
                    near = _near_blocks(tq, W, nb, causal)
                    exact_blocks = set(near)
                    if causal:
                        first = min(near)
                        cand_blocks = range(0, first)
                    else:
                        cand_blocks = [t for t in range(nb) if t not in near]
                    cand = []
                    for t in cand_blocks:
                        cand.extend(vis_tokens(_block_tokens(t, b, Nk)))
                    if kw["importance"] is not None:
                        imp = kw["importance"].detach().double()[bi, g]
                    else:
                        imp = kd[bi, g].norm(dim=-1)
                    m = int(kw["memory_size"])
                    order = sorted(cand, key=lambda j: -float(imp[j]))
                    routed = set(order[:m])
                    extra = routed
                    rest = [j for j in cand if j not in routed]
                    if kw["compress_rest"] and rest:
                        summaries.append(rest)
                else:
                    raise ValueError(f"oracle: unknown kind {kind!r}")
                # drop summaries without visible token
                summaries = [s for s in summaries if any(bool(padb[j]) for j in s)]
                plans[(bi, g, tq)] = (exact_blocks, extra, summaries)
    return plans


def oracle_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kind: str = "exact",
    *,
    causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    block_size: int = 64,
    **family_kw,
) -> torch.Tensor:
    """Dense float64 reference of danon's attention families. Returns float64 [B, H, Nq, D]."""
    B, H, Nq, D = q.shape
    Bk, Hkv, Nk, Dk = k.shape
    assert Bk == B and Dk == D and v.shape == k.shape and H % Hkv == 0
    if kind != "exact":
        assert Nq == Nk, "sparse families are self-attention"
    group = H // Hkv
    b = block_size
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    qd, kd, vd = q.double(), k.double(), v.double()
    if key_padding_mask is None:
        pad = torch.ones(B, Nk, dtype=torch.bool)
    else:
        pad = key_padding_mask.to(torch.bool).cpu()

    kw = dict(_DEFAULTS[kind])
    kw.update(family_kw)
    attn_mask = kw.pop("attn_mask", None)
    if attn_mask is not None:
        attn_mask = attn_mask.expand(B, H, Nq, Nk)
    slopes = None
    if kind == "dala" and kw["decay"] == "alibi":
        slopes = kw["slopes"]
        slopes = alibi_slopes(H) if slopes is None else slopes.detach().double().cpu()

    plans = oracle_plan(q, k, kind, causal=causal, key_padding_mask=key_padding_mask,
                        block_size=block_size, scale=scale, **family_kw)

    out = []
    for bi in range(B):
        heads = []
        for h in range(H):
            g = h // group
            rows = []
            for tq in range(-(-Nq // b)):
                exact_blocks, extra, summaries = plans[(bi, g, tq)]
                i0, i1 = tq * b, min((tq + 1) * b, Nq)
                qi = qd[bi, h, i0:i1]  # [m, D]
                ipos = torch.arange(i0, i1, dtype=torch.float64) + (Nk - Nq)
                # exact token set (before per-token masks)
                sel = torch.zeros(Nk, dtype=torch.bool)
                for t in exact_blocks:
                    sel[t * b:(t + 1) * b] = True
                for j in extra:
                    sel[j] = True
                jpos = torch.arange(Nk)
                vis = (sel & pad[bi]).unsqueeze(0).expand(i1 - i0, Nk).clone()
                if causal:
                    vis &= jpos.unsqueeze(0) <= torch.arange(i0, i1).unsqueeze(1) + (Nk - Nq)
                logits = scale * (qi @ kd[bi, g].T)  # [m, Nk]
                if attn_mask is not None:
                    am = attn_mask[bi, h, i0:i1]
                    if am.dtype == torch.bool:
                        vis &= am
                    else:
                        logits = logits + am.double()
                if slopes is not None:
                    logits = logits - slopes[h] * (ipos.unsqueeze(1) - jpos.double().unsqueeze(0)).abs()
                logits = logits.masked_fill(~vis, float("-inf"))
                vals = [vd[bi, g]]
                all_logits = [logits]
                for span in summaries:
                    toks = torch.tensor([j for j in span if bool(pad[bi, j])], dtype=torch.long)
                    n = toks.numel()
                    kbar = kd[bi, g, toks].mean(dim=0)
                    vbar = vd[bi, g, toks].mean(dim=0)
                    sl = scale * (qi @ kbar) + math.log(n)
                    if slopes is not None:
                        spos = toks.double().mean()
                        sl = sl - slopes[h] * (ipos - spos).abs()
                    all_logits.append(sl.unsqueeze(1))
                    vals.append(vbar.unsqueeze(0))
                L = torch.cat(all_logits, dim=1)
                V = torch.cat(vals, dim=0)
                any_vis = torch.isfinite(L).any(dim=1, keepdim=True)
                Lsafe = torch.where(any_vis, L, torch.zeros_like(L))
                p = torch.softmax(Lsafe, dim=1)
                p = torch.where(any_vis & torch.isfinite(L), p, torch.zeros_like(p))
                rows.append(p @ V)
            heads.append(torch.cat(rows, dim=0))
        out.append(torch.stack(heads, dim=0))
    return torch.stack(out, dim=0)


def oracle_coverage(q, k, kind, *, causal, key_padding_mask, block_size, **family_kw):
    """Counts of (batch, kv head, query, visible key) pairs seen exactly / via summaries / not at all."""
    B, H, Nq, D = q.shape
    _, Hkv, Nk, _ = k.shape
    b = block_size
    pad = torch.ones(B, Nk, dtype=torch.bool) if key_padding_mask is None else key_padding_mask.bool()
    plans = oracle_plan(q, k, kind, causal=causal, key_padding_mask=key_padding_mask,
                        block_size=block_size, **family_kw)
    counts = {"exact": 0, "summary": 0, "skipped": 0}
    for (bi, g, tq), (blocks, extra, summaries) in plans.items():
        ex = torch.zeros(Nk, dtype=torch.bool)
        for t in blocks:
            ex[t * b:(t + 1) * b] = True
        for j in extra:
            ex[j] = True
        sm = torch.zeros(Nk, dtype=torch.bool)
        for s in summaries:
            sm[s] = True
        for i in range(tq * b, min((tq + 1) * b, Nq)):
            vis = pad[bi].clone()
            if causal:
                vis[i + 1:] = False
            e = vis & ex
            s = vis & sm & ~ex
            counts["exact"] += int(e.sum())
            counts["summary"] += int(s.sum())
            counts["skipped"] += int((vis & ~ex & ~sm).sum())
    return counts
