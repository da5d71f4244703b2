"""Per-site attention choices: the backend's `sites` option, as `danon.calibrate` writes it.

A choice names one attention site by its module (the qualified name of the module the attention runs in, as
in `model.named_modules()`, with "#2", "#3", ... for a module's later sites) and says which family runs it
with which keywords, or "exact". The backend's `attention` option still decides the sites the choices do not
name. The same JSON round-trips: `danon.calibrate(...).save(path)` writes it, `options={"sites": path}` reads it.

Example:
    >>> choices = load_site_choices({"layer.0.attn": {"family": "ucsa", "options": {"block_size": 16}},
    ...                              "layer.1.attn": "exact"})
    >>> choices["layer.0.attn"].family, choices["layer.0.attn"].options, choices["layer.1.attn"].family
    ('ucsa', {'block_size': 16}, 'exact')
    >>> load_site_choices({"layer.0.attn": {"family": "flash"}})
    Traceback (most recent call last):
    ...
    ValueError: danon option 'sites': site 'layer.0.attn' has family 'flash'; allowed: exact, ucsa, msra, dala
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional

from danon.core.families import FAMILIES

__all__ = ["SiteChoice", "load_site_choices"]


@dataclasses.dataclass(frozen=True)
class SiteChoice:
    """One site's family, its keywords, and the output error calibration measured for it (None when not measured)."""

    family: str
    options: Dict[str, Any] = dataclasses.field(default_factory=dict)
    error: Optional[float] = None


def _choice(name: str, entry) -> SiteChoice:
    if isinstance(entry, str):
        entry = {"family": entry}
    if not isinstance(entry, dict) or "family" not in entry:
        raise ValueError(f"danon option 'sites': site {name!r} must be a family name or a dict with 'family' "
                         f"(and 'options', 'error'), got {entry!r}")
    unknown = set(entry) - {"family", "options", "error", "keys_per_query"}
    if unknown:
        raise ValueError(f"danon option 'sites': site {name!r} has unknown keys {sorted(unknown)}; allowed: family, "
                         "options, error, keys_per_query")
    family, options = entry["family"], dict(entry.get("options") or {})
    if family not in FAMILIES:
        raise ValueError(f"danon option 'sites': site {name!r} has family {family!r}; allowed: {', '.join(FAMILIES)}")
    if family == "exact" and options:
        raise ValueError(f"danon option 'sites': site {name!r} runs exact, which takes no options; got {options}")
    FAMILIES[family](**options)               # the values, checked with the functional API's messages
    error = entry.get("error")
    return SiteChoice(family, options, None if error is None else float(error))


def load_site_choices(value) -> Dict[str, SiteChoice]:
    """{site name: SiteChoice} from a dict, or from the path of a JSON file (calibrate's, or the dict itself).

    The file may hold the choices at its top level or under "sites" (as `Calibration.save` writes it).
    """
    if isinstance(value, (str, os.PathLike)):
        try:
            with open(value) as f:
                value = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"danon option 'sites': cannot read {os.fspath(value)!r} as JSON: {e}") from e
    if isinstance(value, dict) and isinstance(value.get("sites"), dict):
        value = value["sites"]
    if not isinstance(value, dict):
        raise ValueError(f"danon option 'sites' must be a dict {{site name: choice}} or the path of a JSON file, "
                         f"got {type(value).__name__}")
    return {str(name): _choice(str(name), entry) for name, entry in value.items()}
