"""The attention pass on queries after a cache (Nq < Nk): a bottom-right causal mask keeps the sparse family,
a top-left one (SDPA's is_causal, or a hand-made tril) does not change meaning."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import danon

OPTIONS = {"attention": "msra", "min_seq_len": 0, "block_size": 16, "window": 16}


class CacheAttention(nn.Module):
    """Queries after `past` cached positions, with the mask built as transformers builds it (bottom-right)."""

    def __init__(self, bottom_right: bool):
        super().__init__()
        self.bottom_right = bottom_right

    def forward(self, q, k, v):
        nq, nk = q.shape[2], k.shape[2]
        i = torch.arange(nq)[:, None] + ((nk - nq) if self.bottom_right else 0)
        mask = torch.arange(nk)[None, :] <= i
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _inputs(nq=20, nk=100):
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 2, nq, 8, generator=g), torch.randn(1, 2, nk, 8, generator=g), torch.randn(1, 2, nk, 8, generator=g)


def test_a_bottom_right_cache_mask_runs_the_family():
    q, k, v = _inputs()
    report = danon.explain(CacheAttention(True), q, k, v, options={**OPTIONS, "target": "eager"})
    site = report.sites[0]
    assert (site.mask, site.family, site.reason) == ("causal", "msra", None)
    out = torch.compile(CacheAttention(True), backend="danon", options={**OPTIONS, "target": "eager"})(q, k, v)
    want = danon.msra_attention(q, k, v, causal=True, block_size=16, window=16)
    assert (out - want).abs().max() < 1e-5


def test_a_top_left_mask_after_a_cache_stays_general_and_exact():
    q, k, v = _inputs()
    report = danon.explain(CacheAttention(False), q, k, v, options={**OPTIONS, "target": "eager"})
    assert (report.sites[0].mask, report.sites[0].family) == ("general", "exact")
    out = torch.compile(CacheAttention(False), backend="danon", options={**OPTIONS, "target": "eager"})(q, k, v)
    assert (out - CacheAttention(False)(q, k, v)).abs().max() < 1e-5


def test_sdpa_is_causal_with_fewer_queries_is_kept_as_sdpa():
    class TopLeft(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = _inputs()
    report = danon.explain(TopLeft(), q, k, v, options={**OPTIONS, "target": "eager"})
    assert not report.sites[0].replaced and "top-left" in report.sites[0].reason
    out = torch.compile(TopLeft(), backend="danon", options={**OPTIONS, "target": "eager"})(q, k, v)
    assert (out - TopLeft()(q, k, v)).abs().max() < 1e-6


def test_a_decode_step_without_a_mask_runs_the_family():
    q, k, v = _inputs(nq=1)

    class Decode(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    report = danon.explain(Decode(), q, k, v, options={**OPTIONS, "target": "eager"})
    assert (report.sites[0].family, report.sites[0].reason) == ("msra", None)
