"""The five families at matched size, with sparse settings that stay sparse at N = 512 and 2048.

All models: 2 layers, hidden 64, 4 heads (head dim 16), MLP 256, the tasks' vocabulary, causal.
Sparse settings (block 16 tokens, the smallest allowed, so that a 64-token window is 4 blocks):

- MSRA: window 64, compression factor 4, levels "auto";
- DALA: window 64, 32 routed tokens, ALiBi decay (learnable slopes), compress_rest;
- UCSA: window 64, no global tokens, top-4 blocks, compress. ``global_tokens = 0`` because the
  MQAR pairs sit at the start of the sequence: global blocks would hand UCSA the answer by the
  task's layout, and this benchmark measures the selection;
- hybrid: the same three, gated per head.

Example:
    >>> from bench.quality.models import build_model, parameter_counts
    >>> model = build_model("msra", seed=0)
    >>> parameter_counts(model)["total"] > 0
    True
"""
from __future__ import annotations

from typing import Dict

import torch

import danon
from bench.quality.tasks import VOCAB_SIZE

FAMILIES = ("dense", "msra", "dala", "ucsa", "hybrid")

COMMON = dict(hidden_size=64, num_heads=4, num_layers=2, vocab_size=VOCAB_SIZE, causal=True, tie_word_embeddings=False,
              initializer_range=0.125)

# The factories initialise embeddings with std 0.02 while the sinusoidal position encoding has
# amplitude 1: the token's identity is then ~3 % of the residual stream and small models sit on a
# long plateau before they learn anything. Token embeddings N(0, EMBED_STD) put tokens and
# positions on the same scale (and the LM head is untied so the logits start small).
EMBED_STD = 1.0

SETTINGS: Dict[str, dict] = {
    "dense": {},
    "msra": dict(block_size=16, window=64, num_levels="auto", compression_factor=4),
    "dala": dict(block_size=16, window=64, memory_size=32, decay="alibi", compress_rest=True),
    "ucsa": dict(block_size=16, local_window_size=64, global_tokens=0, top_k_blocks=4, compress=True),
    "hybrid": dict(block_size=16, window=64, num_levels="auto", compression_factor=4, memory_size=32,
                   decay="alibi", compress_rest=True, local_window_size=64, global_tokens=0, top_k_blocks=4,
                   compress=True),
}

# Opt-in variants: a family with one default changed, to test a proposal of docs/quality.md in training
# (`run.py --families dala dala-halfdecay ...`). Not in FAMILIES: the default grid runs the families as
# danon defines them.
VARIANTS: Dict[str, dict] = {
    "dala-halfdecay": dict(base="dala", settings={}, slopes="half",
                           what="DALA; half of the heads start with ALiBi slope 0 (no decay), the other half with "
                                "ALiBi's slopes for H/2 heads (the slopes stay learnable)"),
    "ucsa-scaled": dict(base="ucsa", settings=dict(sparsity_factor=0.1),
                        what="UCSA; selects ceil(0.1 x key blocks) blocks instead of a fixed top 4"),
}


def base_family(family: str) -> str:
    """The danon family a benchmark family or variant runs.

    Example:
        >>> base_family("dala-halfdecay"), base_family("msra")
        ('dala', 'msra')
    """
    return VARIANTS[family]["base"] if family in VARIANTS else family


def settings_of(family: str) -> dict:
    """The attention settings a family or variant is built with (the factories' keyword arguments).

    Example:
        >>> settings_of("ucsa-scaled")["sparsity_factor"]
        0.1
    """
    if family in VARIANTS:
        return {**SETTINGS[VARIANTS[family]["base"]], **VARIANTS[family]["settings"]}
    return SETTINGS[family]


def family_rank(name: str) -> int:
    """Where ``name`` goes in the report: the families in FAMILIES order, then the variants, then the rest.

    Example:
        >>> family_rank("dense"), family_rank("ucsa-scaled") > family_rank("hybrid")
        (0, True)
    """
    order = list(FAMILIES) + list(VARIANTS)
    return order.index(name) if name in order else len(order)


def ordered_families(names) -> list:
    """``names`` in the report's order (``family_rank``).

    Example:
        >>> ordered_families({"ucsa-scaled", "dense", "ucsa"})
        ['dense', 'ucsa', 'ucsa-scaled']
    """
    return sorted(names, key=family_rank)


def _half_decay(model: torch.nn.Module) -> None:
    """Slopes 0 for the first half of the heads, ALiBi's slopes for H/2 heads for the others, in every layer."""
    with torch.no_grad():
        for layer in model.layers:
            slopes = layer.attention.slopes
            half = slopes.numel() // 2
            slopes.zero_()
            slopes[half:] = danon.alibi_slopes(slopes.numel() - half)


_FACTORIES = {
    "dense": danon.create_dense_model,
    "msra": danon.create_msra_model,
    "dala": danon.create_dala_model,
    "ucsa": danon.create_ucsa_model,
    "hybrid": danon.create_super_hybrid_model,
}


def build_model(family: str, *, seed: int, hidden_size: int = 64, **overrides) -> danon.DanonLanguageModel:
    """A fresh model of ``family`` with the benchmark's settings, initialised from ``seed``.

    Example:
        >>> build_model("ucsa", seed=1).config.top_k_blocks
        4
    """
    if family not in FAMILIES and family not in VARIANTS:
        raise ValueError(f"family must be one of {', '.join(map(repr, FAMILIES + tuple(VARIANTS)))}, got {family!r}")
    torch.manual_seed(seed)
    kwargs = {**COMMON, "hidden_size": hidden_size, **settings_of(family), **overrides}
    model = _FACTORIES[base_family(family)](**kwargs)
    with torch.no_grad():
        model.embed_tokens.weight.normal_(0.0, EMBED_STD)
    if VARIANTS.get(family, {}).get("slopes") == "half":   # after the draws: the weights stay those of the base family
        _half_decay(model)
    return model


def parameter_counts(model: torch.nn.Module) -> Dict[str, int]:
    """Total and trainable parameter counts (tied weights once). DALA's router is frozen in danon.

    Example:
        >>> c = parameter_counts(build_model("dala", seed=0))
        >>> c["total"] - c["trainable"]  # the frozen router: 2 layers x (64*16+16 + 16*4+4)
        2216
    """
    return {"total": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def coverage(family: str, seq_len: int, *, seed: int = 0) -> Dict[str, float]:
    """Plan coverage and keys per query of the family's attention at ``seq_len`` (first layer, random input).

    ``exact``/``summary``/``skipped`` are shares of the visible keys (danon.plan_coverage, causal);
    ``keys_per_query`` is the plan's list capacity (exact tokens + summaries) against the mean
    number of visible keys per query, ``(N + 1) / 2``. The hybrid reports its three families.

    Example:
        >>> cov = coverage("msra", 512)
        >>> round(cov["exact"] + cov["summary"] + cov["skipped"], 6)
        1.0
    """
    if family == "dense":
        return {"exact": 1.0, "summary": 0.0, "skipped": 0.0, "keys_per_query": float(seq_len)}
    model = build_model(family, seed=seed).eval()
    layer = model.layers[0].attention
    x = torch.randint(0, VOCAB_SIZE, (1, seq_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        h = model.layers[0].attention_norm(model.embed_tokens(x))
        q, k, v, kpm = layer._project(h, None)
        plans = _plans(base_family(family), layer, q, k, kpm, h)
    out: Dict[str, float] = {}
    for name, plan in plans.items():
        cov = danon.plan_coverage(plan)
        prefix = "" if len(plans) == 1 else name + "_"
        for key in ("exact", "summary", "skipped"):
            out[prefix + key] = cov[key]
        out[prefix + "keys_per_query"] = float(plan.keys_per_query())
    return out


def _plans(family, layer, q, k, kpm, h):
    fn = danon.functional
    msra = lambda: fn.attention_plan(q, k, kind="msra", causal=True, **layer._msra_kwargs()) if family == "hybrid" \
        else fn.attention_plan(q, k, kind="msra", causal=True, **layer._family_kwargs())
    if family == "msra":
        return {"msra": msra()}
    if family == "ucsa":
        return {"ucsa": fn.attention_plan(q, k, kind="ucsa", causal=True, **layer._family_kwargs())}
    dala_kw = layer._dala_kwargs(h)
    dala_kw.pop("slopes", None)
    dala_kw.pop("decay", None)
    dala = fn.attention_plan(q, k, kind="dala", causal=True, **dala_kw)
    if family == "dala":
        return {"dala": dala}
    return {"msra": msra(), "dala": dala,
            "ucsa": fn.attention_plan(q, k, kind="ucsa", causal=True, **layer._ucsa_kwargs())}
