"""Classify an attention site's mask by where it comes from: causal, key padding, sliding window, general."""
from __future__ import annotations

import torch.fx as fx

from .sites import Site


def classify_mask(gm: fx.GraphModule, site: Site) -> None:
    """Set site.mask_class (and causal / key_padding / window) from the mask's provenance (being written)."""
    return None
