"""The compile report: every attention site found, what was done with it or why not, and its cost."""
from __future__ import annotations

import dataclasses
from typing import List, Optional


@dataclasses.dataclass
class SiteReport:
    """One attention site of a compiled graph."""

    location: str                 # "file:line" of the user's code, from the node's stack trace
    source: str                   # "sdpa" | "manual" | "module"
    mask: str                     # "none" | "causal" | "key_padding" | "causal+key_padding" | "general" | "unknown"
    family: Optional[str]         # the family that runs it, or None when kept
    replaced: bool
    reason: Optional[str]         # why it was kept, or why it stayed exact
    q_shape: tuple = ()
    k_shape: tuple = ()
    dtype: str = ""
    keys_per_query: Optional[float] = None
    flops_before: Optional[float] = None
    flops_after: Optional[float] = None


@dataclasses.dataclass
class CompileReport:
    """What the danon backend did to each attention site.

    Example:
        >>> report = CompileReport([SiteReport("model.py:12", "sdpa", "causal", "msra", True, None)])
        >>> report.to_dict()["sites"][0]["family"]
        'msra'
    """

    sites: List[SiteReport] = dataclasses.field(default_factory=list)
    graphs: int = 1               # FX graphs the report covers

    def extend(self, other: "CompileReport") -> None:
        self.sites.extend(other.sites)
        self.graphs += other.graphs

    @property
    def replaced(self) -> int:
        return sum(s.replaced for s in self.sites)

    def totals(self) -> dict:
        before = sum(s.flops_before or 0 for s in self.sites)
        after = sum((s.flops_after if s.replaced else s.flops_before) or 0 for s in self.sites)
        return {"graphs": self.graphs, "sites": len(self.sites), "replaced": self.replaced,
                "flops_before": before, "flops_after": after}

    def to_dict(self) -> dict:
        """JSON-ready: {"sites": [...], "totals": {...}}."""
        return {"sites": [dataclasses.asdict(s) for s in self.sites], "totals": self.totals()}

    def __str__(self) -> str:
        head = ["location", "source", "mask", "q shape", "family", "keys/query", "GFLOP before", "GFLOP after", "note"]
        rows = []
        for s in self.sites:
            rows.append([s.location, s.source, s.mask, "x".join(str(d) for d in s.q_shape),
                         s.family if s.replaced else "kept",
                         "-" if s.keys_per_query is None else f"{s.keys_per_query:.0f}",
                         "-" if s.flops_before is None else f"{s.flops_before / 1e9:.3f}",
                         "-" if s.flops_after is None else f"{s.flops_after / 1e9:.3f}",
                         s.reason or ""])
        widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
        line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()   # noqa: E731
        t = self.totals()
        out = [f"danon compile report: {t['replaced']} of {t['sites']} attention sites replaced", line(head),
               line(["-" * w for w in widths])] + [line(r) for r in rows]
        if t["flops_before"]:
            out.append(f"total attention GFLOP: {t['flops_before'] / 1e9:.3f} -> {t['flops_after'] / 1e9:.3f}")
        return "\n".join(out)
