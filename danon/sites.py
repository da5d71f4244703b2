"""What a rewritten attention site calls: `attention_site`, the floor's (danon.core.run), named here too.

The attention pass (danon/passes/attention.py) inserts calls of danon.core.run.attention_site; this module is
its public name, the very same function, so that a graph's call targets compare equal to it.
"""
from __future__ import annotations

from danon.core.run import attention_site

__all__ = ["attention_site"]
