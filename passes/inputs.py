"""Normalise a site's k and v: see through repeat_kv (expand + reshape) and concatenation with an empty cache."""
from __future__ import annotations

import torch.fx as fx

from .sites import Site


def normalize_kv(gm: fx.GraphModule, site: Site) -> None:
    """Point site.k / site.v at the un-repeated, un-concatenated tensors when that is provably the same (being written)."""
    return None
