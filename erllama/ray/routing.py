"""Which replica serves a request: the scoring of erllama's Ray Serve router, as a pure
module (no Ray, no I/O), so its rules are tested as properties.

Replicas publish what they hold (:class:`Replica`): the cache keys of their rows with each
row's length in tokens, the sticky sessions they pin, and their load. A request's prefix
keys at those lengths are computed once (``prompt_keys``, over the exact token ids, so a
match is a real cache hit, not a text guess), and :func:`choose` ranks the replicas:

1. Never a dead replica, nor one whose queue is full (``waiting >= capacity``).
2. A replica is *overloaded* when its load (running + waiting) exceeds
   ``max(min_load * imbalance_rel, min_load + imbalance_abs)`` over the eligible replicas:
   the bound on imbalance. An overloaded replica is chosen only when every one is.
3. The replica pinning the request's session, unless it is overloaded.
4. Else the replica holding the longest cached prefix (at least ``min_match_tokens``),
   the least loaded among equal matches, unless every holder is overloaded: then the
   request spreads (a burst of one new prefix stays on its holder until it is overloaded).
5. Else power of two choices among the replicas that are not overloaded.

The rest follow by load, so a caller can fall back down the list.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Policy", "Replica", "choose", "matched_tokens"]


@dataclass(frozen=True)
class Replica:
    """What one replica publishes. ``rows``: cache key -> tokens of that row;
    ``capacity``: requests that may wait there (its ``max_queue``)."""

    id: str
    alive: bool = True
    running: int = 0
    waiting: int = 0
    capacity: int = 64
    rows: Mapping[Any, int] = field(default_factory=dict)
    sessions: frozenset[str] = frozenset()

    @property
    def load(self) -> int:
        """Requests running or waiting."""
        return self.running + self.waiting

    @property
    def eligible(self) -> bool:
        """Alive and with room in its queue."""
        return self.alive and self.waiting < self.capacity


@dataclass(frozen=True)
class Policy:
    """The router's knobs (see the module docstring)."""

    imbalance_abs: int = 4
    imbalance_rel: float = 1.5
    min_match_tokens: int = 32


def matched_tokens(replica: Replica, keys: Mapping[int, Any]) -> int:
    """The longest prefix (in tokens) of the request that ``replica`` holds a row of:
    ``keys`` maps a length to the request's cache key at that length."""
    best = 0
    for n, key in keys.items():
        if n > best and replica.rows.get(key) == n:
            best = n
    return best


def choose(replicas: Sequence[Replica], prompt_keys: Callable[[Iterable[int]], Mapping[int, Any]],
           session_id: str | None = None, policy: Policy = Policy(),
           rng: random.Random | None = None) -> list[str]:
    """The eligible replicas' ids, best first (empty when none can take the request).
    ``prompt_keys(lengths)`` returns the request's cache key at each of those lengths that
    is within its prompt."""
    rng = rng or random.Random()
    eligible = [r for r in replicas if r.eligible]
    if not eligible:
        return []
    min_load = min(r.load for r in eligible)
    bound = max(min_load * policy.imbalance_rel, min_load + policy.imbalance_abs)
    calm = [r for r in eligible if r.load <= bound]  # never empty: the least loaded is in it
    first: Replica | None = None
    if session_id is not None:
        first = next((r for r in calm if session_id in r.sessions), None)
    if first is None:
        lengths = {n for r in eligible for n in r.rows.values() if n >= policy.min_match_tokens}
        keys = prompt_keys(sorted(lengths)) if lengths else {}
        matches = {r.id: matched_tokens(r, keys) for r in calm} if keys else {}
        best = max(matches.values(), default=0)
        if best >= policy.min_match_tokens:
            holders = [r for r in calm if matches[r.id] == best]
            first = min(holders, key=lambda r: (r.load, rng.random()))
    if first is None:
        pair = rng.sample(calm, min(2, len(calm)))
        first = min(pair, key=lambda r: r.load)
    rest = sorted((r for r in eligible if r.id != first.id), key=lambda r: (r.load, r.id))
    return [first.id, *(r.id for r in rest)]
