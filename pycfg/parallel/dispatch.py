"""Which rank runs which branch."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=64)
def dispatch_branches(active: tuple[str, ...], size: int) -> tuple[tuple[str, ...], ...]:
    """Round-robin: branch b of ``active`` runs on rank b mod ``size``.

    Ranks beyond the number of branches get an empty tuple and run no forward. Cached, so a plan is only
    rebuilt when the active set changes (step windows).
    """
    return tuple(tuple(active[b] for b in range(r, len(active), size)) for r in range(size))
