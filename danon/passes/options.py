"""`DanonConfig`: the validated options of `torch.compile(model, backend="danon", options={...})`."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Tuple

from danon.core.families import FAMILIES

from .site_choices import load_site_choices

ATTENTION_CHOICES = tuple(FAMILIES) + ("keep",)
TARGET_CHOICES = ("inductor", "eager", "onnxrt", "tensorrt")
CHECKPOINT_CHOICES = ("none", "auto")
QUANTIZE_CHOICES = ("none", "int8-weight", "fp8-weight")
MEMORY_TARGETS = ("inductor", "eager")       # targets the checkpoint and quantize passes lower to
DEFAULT_MEMORY_BUDGET = 0.5                  # checkpoint="auto" without memory_budget or max_activation_bytes

# the options each sparse family takes: its parameters (an exact site's come from the site itself)
FAMILY_KEYWORDS = {name: spec.names() for name, spec in FAMILIES.items() if spec.sparse}


@dataclasses.dataclass
class DanonConfig:
    """Options of the danon backend.

    attention: "exact" (default) | "ucsa" | "msra" | "dala" | "keep" (leave every site as it is).
    min_seq_len: sites whose key length is shorter stay exact (default 2048).
    target: "inductor" (default) | "eager" (run the rewritten graph as it is) | "onnxrt" (export in memory,
        run with ONNX Runtime; inference only) | "tensorrt" (needs CUDA and torch-tensorrt).
    report: print the compile report after each compiled graph.
    family_options: keywords of the chosen family (e.g. window=512 for msra), checked by name.
    sites: per-site choices, {site name: family or {"family": ..., "options": {...}}}, or the path of the JSON
        file `danon.calibrate(...).save(path)` wrote (danon/passes/site_choices.py); a site it names runs its
        choice, the others follow `attention`. A sparse family substituted into a model adds no positional
        bias the model did not have: DALA runs with decay="none" unless decay is given.

    Memory decisions (docs/memory.md):
    checkpoint: "none" (default) | "auto": in training graphs, choose which activations to recompute in
        the backward instead of saving them (AOTAutograd's partitioner under a memory budget).
    memory_budget: with checkpoint="auto", the activations to keep as a fraction 0..1 of what the default
        partition saves (default 0.5); 0 saves nothing but the graph inputs.
    max_activation_bytes: with checkpoint="auto", instead of memory_budget: a cap in bytes per graph.
    quantize: "none" (default) | "int8-weight" | "fp8-weight" (CUDA, compute capability >= 8.9): weight-only
        quantization of linear layers with torchao; inference only.
    quantize_min_features: keep layers with in_features or out_features below this (default 0).
    quantize_skip: module-name patterns to keep (fnmatch; a plain name also matches as a suffix: "lm_head").
    quantize_tolerance: quantize only as many layers, least sensitive first, as keep the graph's output
        rel. error on the example inputs within this (> 0).

    Example:
        >>> cfg = DanonConfig.from_options({"attention": "msra", "window": 128, "min_seq_len": 0})
        >>> cfg.attention, cfg.family_options
        ('msra', {'window': 128})
        >>> DanonConfig.from_options({"atention": "msra"})
        Traceback (most recent call last):
        ...
        ValueError: unknown danon option 'atention'; allowed: attention, checkpoint, max_activation_bytes, ...
        >>> DanonConfig.from_options({"checkpoint": "auto", "memory_budget": 0.25}).memory_budget
        0.25
        >>> DanonConfig.from_options({"quantize": "int4"})
        Traceback (most recent call last):
        ...
        ValueError: danon option 'quantize' must be one of none, int8-weight, fp8-weight; got 'int4'
    """

    attention: str = "exact"
    min_seq_len: int = 2048
    target: str = "inductor"
    report: bool = False
    checkpoint: str = "none"
    memory_budget: Optional[float] = None
    max_activation_bytes: Optional[int] = None
    quantize: str = "none"
    quantize_min_features: Optional[int] = None
    quantize_skip: Tuple[str, ...] = ()
    quantize_tolerance: Optional[float] = None
    sites: Optional[Any] = None
    family_options: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.sites is not None:
            self.sites = load_site_choices(self.sites)
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"danon option 'attention' must be one of {', '.join(ATTENTION_CHOICES)}; "
                             f"got {self.attention!r}")
        if self.target not in TARGET_CHOICES:
            raise ValueError(f"danon option 'target' must be one of {', '.join(TARGET_CHOICES)}; got {self.target!r}")
        if isinstance(self.min_seq_len, bool) or not isinstance(self.min_seq_len, int) or self.min_seq_len < 0:
            raise ValueError(f"danon option 'min_seq_len' must be an integer >= 0, got {self.min_seq_len!r}")
        if not isinstance(self.report, bool):
            raise ValueError(f"danon option 'report' must be True or False, got {self.report!r}")
        self._check_memory_options()
        allowed = FAMILY_KEYWORDS.get(self.attention, ())
        for key in self.family_options:
            if key not in allowed:
                raise ValueError(f"danon option {key!r} does not apply to attention={self.attention!r}; "
                                 f"its keywords are: {', '.join(allowed) or 'none'}")

    def _check_memory_options(self) -> None:
        if self.checkpoint not in CHECKPOINT_CHOICES:
            raise ValueError(f"danon option 'checkpoint' must be one of {', '.join(CHECKPOINT_CHOICES)}; "
                             f"got {self.checkpoint!r}")
        b = self.memory_budget
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b <= 1):
            raise ValueError(f"danon option 'memory_budget' must be a number in [0, 1] (a fraction of the "
                             f"activations saved by default), got {b!r}")
        m = self.max_activation_bytes
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
            raise ValueError(f"danon option 'max_activation_bytes' must be an integer >= 0 (bytes per graph), "
                             f"got {m!r}")
        if b is not None and m is not None:
            raise ValueError("danon options 'memory_budget' and 'max_activation_bytes' exclude each other; give one")
        if self.checkpoint == "none" and (b is not None or m is not None):
            name = "memory_budget" if b is not None else "max_activation_bytes"
            raise ValueError(f"danon option {name!r} applies only with checkpoint='auto'; got checkpoint='none'")
        if self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"danon option 'quantize' must be one of {', '.join(QUANTIZE_CHOICES)}; "
                             f"got {self.quantize!r}")
        f = self.quantize_min_features
        if f is not None and (isinstance(f, bool) or not isinstance(f, int) or f < 0):
            raise ValueError(f"danon option 'quantize_min_features' must be an integer >= 0, got {f!r}")
        if isinstance(self.quantize_skip, str):             # one pattern
            self.quantize_skip = (self.quantize_skip,)
        if not isinstance(self.quantize_skip, (list, tuple)) or \
                not all(isinstance(p, str) and p for p in self.quantize_skip):
            raise ValueError("danon option 'quantize_skip' must be a module-name pattern or a list of them "
                             f"(non-empty strings, fnmatch style), got {self.quantize_skip!r}")
        self.quantize_skip = tuple(self.quantize_skip)
        t = self.quantize_tolerance
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < math.inf):
            raise ValueError(f"danon option 'quantize_tolerance' must be a number > 0 (relative output error), "
                             f"got {t!r}")
        given = [k for k, v in (("quantize_min_features", f), ("quantize_skip", self.quantize_skip or None),
                                ("quantize_tolerance", t)) if v is not None]
        if self.quantize == "none" and given:
            raise ValueError(f"danon option {given[0]!r} applies only with quantize='int8-weight' or 'fp8-weight'; "
                             "got quantize='none'")
        for name, on in (("checkpoint", self.checkpoint != "none"), ("quantize", self.quantize != "none")):
            if on and self.target not in MEMORY_TARGETS:
                raise ValueError(f"danon option {name!r} works with target {' or '.join(map(repr, MEMORY_TARGETS))}; "
                                 f"got target={self.target!r}")

    @property
    def budget(self) -> Optional[float]:
        """The memory budget checkpoint="auto" works to (None with max_activation_bytes or checkpoint="none")."""
        if self.checkpoint == "none" or self.max_activation_bytes is not None:
            return None
        return DEFAULT_MEMORY_BUDGET if self.memory_budget is None else float(self.memory_budget)

    @classmethod
    def option_names(cls) -> Tuple[str, ...]:
        """Every name `from_options` accepts: the backend's own options and every family's keywords.

        Example:
            >>> "window" in DanonConfig.option_names() and "attention" in DanonConfig.option_names()
            True
        """
        own = {f.name for f in dataclasses.fields(cls)} - {"family_options"}
        return tuple(sorted(own)) + tuple(sorted({k for keys in FAMILY_KEYWORDS.values() for k in keys} - own))

    @classmethod
    def from_options(cls, options: Optional[Dict[str, Any]]) -> "DanonConfig":
        """Build from the flat dict torch.compile passes as `options` (family keywords included)."""
        options = dict(options or {})
        own = {f.name for f in dataclasses.fields(cls)} - {"family_options"}
        for key in options:
            if key not in cls.option_names():
                raise ValueError(f"unknown danon option {key!r}; allowed: {', '.join(cls.option_names())}")
        family = {k: options.pop(k) for k in list(options) if k not in own}
        config = cls(**options, family_options=family)
        if config.family_options:   # check the values once, with the functional op's messages
            FAMILIES[config.attention](**config.family_options)
        return config
