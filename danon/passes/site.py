"""What the recognisers hand the attention pass: one `Site` per attention computation found in a graph."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true


def known_equal(a, b) -> bool:
    """a == b known without adding a guard (symbolic sizes compare by expression)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:   # sizes of different kinds: not known equal
        return False


@dataclasses.dataclass
class Site:
    """An attention computation in a Dynamo FX graph, proven equal to softmax attention.

    out = softmax(scale * q k^T [softcapped] + mask) v, with q [B, H, Nq, D] and k, v [B, Hkv, Nk, D].

    node: the node whose value is the attention output [B, H, Nq, Dv]; the pass replaces its uses.
    q, k, v: nodes of the 4-D inputs. When the graph repeats kv heads (repeat_kv), k and v are the
        nodes before the repeat (Hkv heads), so no repeated heads are materialised.
    causal: the causal mask applies, aligned bottom-right as the op's: query i sits at position Nk - Nq + i.
    key_padding: a node of a bool [B, Nk] mask (True = attend), or None.
    mask: a node of any other mask, bool (True = attend) or additive float, broadcastable to
        [B, H, Nq, Nk]; or None.
    mask_class: "none" | "causal" | "key_padding" | "causal+key_padding" | "sliding_window" | "general".
    window: for sliding_window, w such that query i sees keys i - w < j <= i.
    scale: a Python float, None for 1/sqrt(D), or the node of a SymFloat (a float attribute under dynamic=True).
    softcap: c for logits c * tanh(logits / c), or None.
    kept: None when the site can be replaced; else the reason it must stay as it is.
    """

    node: fx.Node
    source: str                                  # "sdpa" | "manual" | "module"
    q: Optional[fx.Node] = None
    k: Optional[fx.Node] = None
    v: Optional[fx.Node] = None
    causal: bool = False
    key_padding: Optional[fx.Node] = None
    mask: Optional[fx.Node] = None
    mask_class: str = "none"
    window: Optional[int] = None
    scale: Optional[float] = None
    softcap: Optional[float] = None
    kept: Optional[str] = None

    def value(self, name: str) -> Optional[torch.Tensor]:
        """The traced example value of q, k, v or mask (Dynamo's node.meta['example_value'])."""
        node = getattr(self, name)
        return node.meta.get("example_value") if isinstance(node, fx.Node) else None
