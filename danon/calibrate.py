"""`danon.calibrate`: per attention site, the cheapest sparse setting whose output stays within an error bound.

The model runs once, exactly, compiled by a backend of calibration's own: the attention pass finds the sites
as the danon backend does, and each site, when it runs, computes its exact output, then every candidate
setting on the same q, k, v, and records each candidate's relative output error
||out - exact|| / ||exact|| and the keys per query its plan lists. The site then hands on its *exact*
output, so every site is measured on the inputs the exact model gives it (errors are per site; the model's
end-to-end error is what bench/pretrained measures). A site's choice is the candidate with the fewest keys
per query whose error is at most `max_error`, or "exact" when none is. `Calibration.save(path)` writes the
choices as JSON; `torch.compile(model, backend="danon", options={"sites": path, "min_seq_len": 0})` runs them
and its report shows each site's choice and error.

Example:
    >>> import torch, danon
    >>> model = danon.create_dense_model(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2)
    >>> ids = torch.randint(0, 64, (1, 256))
    >>> cal = danon.calibrate(model, (ids,), family="msra", max_error=0.5,
    ...                       candidates=[{"block_size": 16, "window": 32}], progress=False)
    >>> [(name, site.family) for name, site in cal.sites.items()]
    [('layers.0.attention', 'msra')]
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from danon.core.families import FAMILIES, substitution_options
from danon.core.plan import listed_keys_per_query
from danon.core.run import attention_site, plan
from danon.passes.attention import rewrite_attention
from danon.passes.options import DanonConfig
from danon.visualization import capture_plans

__all__ = ["calibrate", "Calibration", "SiteCalibration", "default_candidates"]

SPARSE = tuple(name for name, spec in FAMILIES.items() if spec.sparse)
# the keywords of attention_site that describe the site itself, not the family
_SITE_KEYWORDS = ("causal", "attn_mask", "key_padding_mask", "sliding_window", "scale", "softcap")


@dataclasses.dataclass
class SiteCalibration:
    """One site: its choice, and every candidate measured (family, options, error, keys per query)."""

    family: str                                   # the choice: a sparse family, or "exact"
    options: Dict[str, Any]
    error: float                                  # the choice's output error (0 for exact)
    keys_per_query: float                         # the choice's listed keys per query
    exact_keys_per_query: float                   # exact attention's, for comparison
    reason: str = ""                              # why exact, when it is
    candidates: List[Dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Calibration:
    """The choices of `calibrate`, one per site (keyed by the site's module name, as the `sites` option is).

    Example:
        >>> cal = Calibration({"attn": SiteCalibration("ucsa", {"block_size": 16}, 0.004, 120.0, 256.0)}, 0.01)
        >>> cal.choices()
        {'attn': {'family': 'ucsa', 'options': {'block_size': 16}, 'error': 0.004, 'keys_per_query': 120.0}}
    """

    sites: Dict[str, SiteCalibration]
    max_error: float

    def with_max_error(self, max_error: float) -> "Calibration":
        """The choices for another bound, from the same measurements (no new run).

        Example:
            >>> rows = [{"family": "msra", "options": {"window": 64}, "error": 0.03, "keys_per_query": 100.0,
            ...          "capacity": 100.0}]
            >>> cal = Calibration({"attn": SiteCalibration("exact", {}, 0.0, 256.0, 256.0, "", rows)}, 0.01)
            >>> cal.with_max_error(0.05).sites["attn"].family
            'msra'
        """
        return Calibration({name: _choose(s.candidates, s.exact_keys_per_query,
                                          s.reason if not s.candidates else "", max_error)
                            for name, s in self.sites.items()}, max_error)

    def choices(self) -> Dict[str, Dict[str, Any]]:
        """{site: {"family", "options", "error", "keys_per_query"}}: what the backend's `sites` option takes."""
        return {name: {"family": s.family, "options": dict(s.options), "error": s.error,
                       "keys_per_query": s.keys_per_query} for name, s in self.sites.items()}

    def to_dict(self) -> Dict[str, Any]:
        return {"max_error": self.max_error, "sites": self.choices(),
                "measured": {name: s.candidates for name, s in self.sites.items()}}

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the choices (and every measurement) as JSON; `options={"sites": path}` reads it back."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    def __str__(self) -> str:
        lines = [f"danon calibration (max_error {self.max_error:g}): site, choice, error, keys/query (exact's)"]
        for name, s in self.sites.items():
            what = s.family if not s.options else f"{s.family} {s.options}"
            lines.append(f"  {name}: {what}  error {s.error:.2e}  keys/query {s.keys_per_query:.0f} "
                         f"({s.exact_keys_per_query:.0f}){'  ' + s.reason if s.reason else ''}")
        return "\n".join(lines)


def default_candidates(family: str, seq_len: int) -> List[Dict[str, Any]]:
    """A grid of `family`'s settings for keys of length `seq_len`, from sparse to nearly exact.

    Example:
        >>> len(default_candidates("ucsa", 512)) > 0, default_candidates("msra", 512)[0]
        (True, {'block_size': 16, 'window': 16, 'num_levels': 'auto', 'compression_factor': 2})
    """
    sizes = [b for b in (16, 32, 64) if 4 * b <= max(seq_len, 64)]
    out: List[Dict[str, Any]] = []
    for b in sizes:
        blocks = -(-seq_len // b)
        windows = [b * m for m in (1, 2, 4, 8) if b * m < seq_len]
        for w in windows:
            if family == "ucsa":
                for gamma in (0.8, 0.9, 0.95, 0.98):
                    out.append(dict(block_size=b, local_window_size=w, global_tokens=b, top_k_blocks=blocks,
                                    gamma=gamma))
                for k in (2, 4, 8):
                    out.append(dict(block_size=b, local_window_size=w, global_tokens=b, top_k_blocks=k))
            elif family == "msra":
                for c in (2, 4):
                    out.append(dict(block_size=b, window=w, num_levels="auto", compression_factor=c))
            else:
                for m in (16, 64, 128):
                    out.append(dict(block_size=b, window=w, memory_size=min(m, seq_len)))
    return out


def _relative_error(out: Tensor, ref: Tensor) -> float:
    ref = ref.to(torch.float64)
    return float(torch.linalg.vector_norm(out.to(torch.float64) - ref) / torch.linalg.vector_norm(ref).clamp(min=1e-300))


class _Recorder:
    """What the sites measured while the model ran: per site, per candidate, the worst error and mean keys."""

    def __init__(self, candidates: Dict[str, List[Dict[str, Any]]], progress: bool):
        self.candidates, self.progress = candidates, progress
        self.measured: Dict[str, Dict[Tuple[str, str], Dict[str, Any]]] = {}
        self.exact: Dict[str, Tuple[str, float]] = {}

    def _grid(self, nk: int) -> List[Tuple[str, Dict[str, Any]]]:
        return [(fam, opts) for fam, grid in self.candidates.items()
                for opts in (default_candidates(fam, nk) if grid is None else grid)]

    def measure(self, q: Tensor, k: Tensor, v: Tensor, *, family: str, site_name: str, **keywords) -> Tensor:
        """The site's call: its exact output, after measuring every candidate against it."""
        site = {name: keywords[name] for name in _SITE_KEYWORDS if name in keywords}
        with torch.no_grad():
            ref = attention_site(q, k, v, family="exact", **site)
            exact_keys = plan("exact", q, k, causal=bool(site.get("causal", False))).keys_per_query()
            if family not in SPARSE:                   # the site cannot run a sparse family (its mask, its shapes)
                self.exact.setdefault(site_name, ("the site runs exact (see the compile report)", exact_keys))
                return ref
            self.exact[site_name] = ("", exact_keys)
            grid = self._grid(k.shape[2])
            if self.progress:
                print(f"danon.calibrate: {site_name}: {len(grid)} candidates", file=sys.stderr, flush=True)
            runs = {name: site[name] for name in ("causal", "key_padding_mask", "scale") if name in site}
            for fam, opts in grid:
                opts = substitution_options(fam, opts)
                with capture_plans() as plans:        # the plan the call ran, not a second one built to count
                    out = attention_site(q, k, v, family=fam, **runs, **opts)
                built = plans[-1]
                row = self.measured.setdefault(site_name, {}).setdefault(
                    (fam, json.dumps(opts, sort_keys=True)), {"family": fam, "options": opts, "error": 0.0,
                                                              "keys": [], "capacity": built.keys_per_query()})
                row["error"] = max(row["error"], _relative_error(out, ref))
                row["keys"].append(listed_keys_per_query(built))
        return ref

    def result(self, max_error: float) -> Calibration:
        sites = {}
        for name, (reason, exact_keys) in self.exact.items():
            rows = [{"family": r["family"], "options": r["options"], "error": r["error"],
                     "keys_per_query": sum(r["keys"]) / len(r["keys"]), "capacity": float(r["capacity"])}
                    for r in self.measured.get(name, {}).values()]
            sites[name] = _choose(rows, exact_keys, reason, max_error)
        return Calibration(sites, max_error)


def _choose(rows: List[Dict[str, Any]], exact_keys: float, reason: str, max_error: float) -> SiteCalibration:
    """The candidate with the fewest listed keys per query within max_error (then the smaller capacity, then the
    smaller error), or exact."""
    fits = [r for r in rows if r["error"] <= max_error and r["keys_per_query"] < exact_keys]
    if fits:
        best = min(fits, key=lambda r: (r["keys_per_query"], r["capacity"], r["error"]))
        return SiteCalibration(best["family"], best["options"], best["error"], best["keys_per_query"], exact_keys,
                               candidates=rows)
    why = reason or (f"no candidate within max_error {max_error:g} (best {min(r['error'] for r in rows):.2e})"
                     if rows else "no candidate")
    return SiteCalibration("exact", {}, 0.0, exact_keys, exact_keys, why, rows)


def _families(family) -> Tuple[str, ...]:
    names = (family,) if isinstance(family, str) else tuple(family)
    for name in names:
        if name not in SPARSE:
            raise ValueError(f"danon.calibrate: family must be one of {', '.join(SPARSE)} (or a list of them); "
                             f"got {name!r}")
    if not names:
        raise ValueError(f"danon.calibrate: family must name at least one of {', '.join(SPARSE)}")
    return names


def _candidates(families: Tuple[str, ...], candidates) -> Dict[str, Optional[List[Dict[str, Any]]]]:
    """{family: list of options, or None for default_candidates}, every option set checked by the family's spec."""
    if candidates is None:
        return {fam: None for fam in families}
    if isinstance(candidates, Mapping):
        grid = {fam: list(candidates.get(fam, [])) for fam in families}
        unknown = set(candidates) - set(families)
        if unknown:
            raise ValueError(f"danon.calibrate: candidates name families {sorted(unknown)} that `family` does not "
                             f"({', '.join(families)})")
    elif len(families) == 1:
        grid = {families[0]: list(candidates)}
    else:
        raise ValueError("danon.calibrate: with several families, candidates must be a dict {family: [options, ...]}")
    for fam, options in grid.items():
        for opts in options:
            if not isinstance(opts, Mapping):
                raise ValueError(f"danon.calibrate: each candidate is a dict of {fam}'s keywords, got {opts!r}")
            FAMILIES[fam](**opts)
    return grid


def calibrate(model: torch.nn.Module, example_inputs: Union[Sequence[Any], Mapping[str, Any]], *,
              family: Union[str, Iterable[str]] = "ucsa", max_error: float = 1e-2,
              candidates: Optional[Union[Sequence[Mapping[str, Any]], Mapping[str, Sequence[Mapping[str, Any]]]]] = None,
              save: Optional[Union[str, os.PathLike]] = None, progress: bool = True) -> Calibration:
    """Choose, per attention site of `model`, the setting of `family` with the fewest keys per query whose
    output error on `example_inputs` is at most `max_error` (relative, per site), or exact attention.

    example_inputs: the model's positional inputs (a tuple) or its keyword inputs (a dict, such as a
    tokenizer's output). family: "ucsa", "msra", "dala", or a list of them. candidates: the settings to try
    (a list of keyword dicts, or {family: list}); default `default_candidates` for each site's length.
    save: a path to write the choices to as JSON. The model runs once, under torch.no_grad().

    Example:
        >>> import torch, danon
        >>> model = danon.create_dense_model(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2)
        >>> ids = torch.randint(0, 64, (1, 128))
        >>> cal = danon.calibrate(model, (ids,), family="ucsa", max_error=1e-3, progress=False,
        ...                       candidates=[dict(block_size=16, local_window_size=16, top_k_blocks=8, gamma=g)
        ...                                   for g in (0.5, 0.99)])
        >>> compiled = torch.compile(model, backend="danon",
        ...                          options={"sites": cal.choices(), "min_seq_len": 0, "target": "eager"})
        >>> bool(torch.allclose(compiled(ids), model(ids), atol=1e-2))
        True
    """
    families = _families(family)
    if isinstance(max_error, bool) or not isinstance(max_error, (int, float)) or not 0 <= max_error < math.inf:
        raise ValueError(f"danon.calibrate: max_error must be a number >= 0 (relative output error per site), "
                         f"got {max_error!r}")
    if not isinstance(example_inputs, (tuple, list, Mapping)):
        raise TypeError("danon.calibrate: example_inputs must be the model's positional inputs (a tuple) or its "
                        f"keyword inputs (a dict), got {type(example_inputs).__name__}")
    recorder = _Recorder(_candidates(families, candidates), progress)
    config = DanonConfig(attention=families[0], min_seq_len=0, target="eager")   # which sites take a sparse family

    def backend(gm, inputs):   # a backend of its own: the sites run `recorder.measure`, eagerly
        return rewrite_attention(gm, config, site_function=recorder.measure)[0].forward

    args, kwargs = (tuple(example_inputs), {}) if not isinstance(example_inputs, Mapping) else ((), dict(example_inputs))
    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=False)(*args, **kwargs)
    if not recorder.exact:
        raise RuntimeError("danon.calibrate: the model ran no attention site the danon backend finds (or Dynamo "
                           "answered from its cache: call torch._dynamo.reset() and try again)")
    result = recorder.result(float(max_error))
    if save is not None:
        result.save(save)
    return result
