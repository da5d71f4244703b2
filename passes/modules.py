"""Expand fused module calls (nn.MultiheadAttention's F.multi_head_attention_forward) into projections + SDPA."""
from __future__ import annotations

from typing import List

import torch.fx as fx

from .sites import Site


def expand_module_calls(gm: fx.GraphModule) -> List[Site]:
    """Rewrite module-level attention calls so the SDPA recogniser sees them; returns sites kept as they are (being written)."""
    return []
