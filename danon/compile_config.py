"""`DanonConfig`: the validated options of `torch.compile(model, backend="danon", options={...})`."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Dict, Optional

from danon import functional

ATTENTION_CHOICES = ("exact", "ucsa", "msra", "dala", "keep")
TARGET_CHOICES = ("inductor", "eager")

# keywords each family's functional op takes beyond (q, k, v, causal, key_padding_mask, scale)
FAMILY_KEYWORDS = {
    name: tuple(p for p in inspect.signature(fn).parameters
                if p not in ("q", "k", "v", "causal", "key_padding_mask", "scale", "attn_mask", "importance",
                             "slopes", "softcap"))
    for name, fn in (("ucsa", functional.ucsa_attention), ("msra", functional.msra_attention),
                     ("dala", functional.dala_attention))
}


@dataclasses.dataclass
class DanonConfig:
    """Options of the danon backend.

    attention: "exact" (default) | "ucsa" | "msra" | "dala" | "keep" (leave every site as it is).
    min_seq_len: sites whose key length is shorter stay exact (default 2048).
    target: "inductor" (default) | "eager" (run the rewritten graph as it is).
    report: print the compile report after each compiled graph.
    family_options: keywords of the chosen family (e.g. window=512 for msra), checked by name.

    Example:
        >>> cfg = DanonConfig.from_options({"attention": "msra", "window": 128, "min_seq_len": 0})
        >>> cfg.attention, cfg.family_options
        ('msra', {'window': 128})
        >>> DanonConfig.from_options({"atention": "msra"})
        Traceback (most recent call last):
        ...
        ValueError: unknown danon option 'atention'; allowed: attention, min_seq_len, report, target, ...
    """

    attention: str = "exact"
    min_seq_len: int = 2048
    target: str = "inductor"
    report: bool = False
    family_options: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"danon option 'attention' must be one of {', '.join(ATTENTION_CHOICES)}; "
                             f"got {self.attention!r}")
        if self.target not in TARGET_CHOICES:
            raise ValueError(f"danon option 'target' must be one of {', '.join(TARGET_CHOICES)}; got {self.target!r}")
        if isinstance(self.min_seq_len, bool) or not isinstance(self.min_seq_len, int) or self.min_seq_len < 0:
            raise ValueError(f"danon option 'min_seq_len' must be an integer >= 0, got {self.min_seq_len!r}")
        if not isinstance(self.report, bool):
            raise ValueError(f"danon option 'report' must be True or False, got {self.report!r}")
        allowed = FAMILY_KEYWORDS.get(self.attention, ())
        for key in self.family_options:
            if key not in allowed:
                raise ValueError(f"danon option {key!r} does not apply to attention={self.attention!r}; "
                                 f"its keywords are: {', '.join(allowed) or 'none'}")

    @classmethod
    def from_options(cls, options: Optional[Dict[str, Any]]) -> "DanonConfig":
        """Build from the flat dict torch.compile passes as `options` (family keywords included)."""
        options = dict(options or {})
        own = {f.name for f in dataclasses.fields(cls)} - {"family_options"}
        family_keys = {k for keys in FAMILY_KEYWORDS.values() for k in keys}
        for key in options:
            if key not in own and key not in family_keys:
                allowed = sorted(own) + sorted(family_keys)
                raise ValueError(f"unknown danon option {key!r}; allowed: {', '.join(allowed)}")
        family = {k: options.pop(k) for k in list(options) if k not in own}
        config = cls(**options, family_options=family)
        if config.family_options:   # check the values once, as the functional op would
            functional.check_family_options(config.attention, config.family_options)
        return config
