"""Whether a sequence split across ranks is active (danon.context_parallel's `with cp:`), for the op to check.

Inside `with cp:` the tensors a model holds are one rank's tokens. A `danon::attention` call that did not come
through danon.context_parallel (a graph compiled with backend="danon" calls the op directly) would attend
over this rank's tokens alone and silently return a different function: the op refuses it instead. The roof
(danon/parallel) enters `split_scope` with its `with cp:` and runs its own op calls in `own_call`.

Example:
    >>> with split_scope():
    ...     try:
    ...         check_not_bypassed()
    ...     except RuntimeError as err:
    ...         print(str(err)[:40])
    ...     with own_call():
    ...         check_not_bypassed()            # the split's own calls pass
    danon::attention was called inside `with
"""
from __future__ import annotations

import contextlib

__all__ = ["split_scope", "own_call", "check_not_bypassed"]

_STATE = {"scopes": 0, "own": 0}   # process-wide, as `with cp:` is (autograd may recompute on other threads)


@contextlib.contextmanager
def split_scope():
    """The scope of one `with cp:`.

    Example:
        >>> with split_scope():
        ...     _STATE["scopes"]
        1
    """
    _STATE["scopes"] += 1
    try:
        yield
    finally:
        _STATE["scopes"] -= 1


@contextlib.contextmanager
def own_call():
    """Op calls that danon.context_parallel makes itself (each sees the keys its rank gathered).

    Example:
        >>> with split_scope(), own_call():
        ...     check_not_bypassed()         # no error: the split's own call
    """
    _STATE["own"] += 1
    try:
        yield
    finally:
        _STATE["own"] -= 1


def check_not_bypassed() -> None:
    """Raise when the op is called inside `with cp:` from outside danon.context_parallel.

    Example:
        >>> check_not_bypassed()             # no split active: nothing to check
    """
    if _STATE["scopes"] and not _STATE["own"]:
        raise RuntimeError("danon::attention was called inside `with cp:` (danon.context_parallel) on this rank's "
                           "tokens alone, not through the context-parallel path, so it would attend to part of the "
                           "sequence: a model compiled with backend='danon' does this. Run it eagerly inside "
                           "`with cp:` (its danon layers and attn_implementation='danon' route through cp), or "
                           "call cp.attention")
