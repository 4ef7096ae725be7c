"""The cache index: rows, per-tier byte quotas, LRU, refcounts, prefix lengths.

Pure bookkeeping, no I/O: the meta server is its only writer, and reads (``get``,
``lookup_exact``, ``candidate_lengths``) are safe from any thread because rows are
immutable and replaced whole. Bytes are charged to a tier when a save is *reserved*, so a
tier's accounted bytes never exceed its quota at any observed point, even while files are
being written.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from erllama import errors

__all__ = ["TIERS", "AlreadyPresent", "Conflict", "Index", "NoRoom", "Row", "RowStatus"]

TIERS: tuple[str, ...] = ("ram", "ram_file", "disk")
"""Fastest first: a row evicted from a tier is demoted to the next one with room."""


class RowStatus(enum.Enum):
    """A row is being written (reserved) or available to readers."""

    WRITING = "writing"
    AVAILABLE = "available"


class AlreadyPresent(errors.CacheError):
    """The key is already saved (a duplicate save is dropped, not an error for the caller)."""


class Conflict(errors.CacheError):
    """Another writer holds a reservation for the key."""


class NoRoom(errors.CacheError):
    """The tier cannot take the row without evicting rows first (or at all)."""


@dataclass(frozen=True)
class Row:
    """One saved KV state. ``group`` identifies its fingerprint, quantization, context
    shape and namespace (rows of one group can be prefixes of each other)."""

    key: bytes
    group: bytes
    n_tokens: int
    tier: str
    size: int
    status: RowStatus
    refcount: int = 0
    hits: int = 0
    last_used: float = 0.0
    location: Any = None
    moving_to: str | None = None


class Index:
    """Rows by key, with byte accounting and LRU per tier."""

    def __init__(self, quotas: Mapping[str, int]) -> None:
        for tier in quotas:
            if tier not in TIERS:
                raise errors.ConfigError(f"unknown cache tier {tier!r}; tiers are {TIERS}")
        self.quotas = {t: int(quotas.get(t, 0)) for t in TIERS}
        self.rows: dict[bytes, Row] = {}
        self.used = dict.fromkeys(TIERS, 0)
        self._recency: dict[str, dict[bytes, float]] = {t: {} for t in TIERS}
        self._lengths: dict[bytes, dict[int, int]] = {}

    # ---- reads (any thread) -------------------------------------------------------------

    def get(self, key: bytes) -> Row | None:
        """The row of ``key`` in any status."""
        return self.rows.get(key)

    def lookup_exact(self, key: bytes) -> Row | None:
        """The row of ``key`` if it is available to readers."""
        row = self.rows.get(key)
        return row if row is not None and row.status is RowStatus.AVAILABLE else None

    def candidate_lengths(self, group: bytes, max_len: int) -> list[int]:
        """Token counts of available rows of ``group`` up to ``max_len``, longest first."""
        lengths = self._lengths.get(group)
        if not lengths:
            return []
        return sorted((n for n in list(lengths) if n <= max_len), reverse=True)

    def free_bytes(self, tier: str) -> int:
        """Quota minus accounted bytes."""
        return self.quotas[tier] - self.used[tier]

    def lru(self, tier: str) -> list[bytes]:
        """Available rows of ``tier``, least recently used first."""
        rec = self._recency[tier]
        return sorted(rec, key=rec.__getitem__)

    # ---- planning ----------------------------------------------------------------------------

    def plan_room(self, tier: str, size: int) -> list[Row] | None:
        """The least recently used evictable rows (available, refcount 0) of ``tier`` whose
        removal makes room for ``size`` bytes; ``[]`` if there is room, ``None`` if even
        evicting every evictable row would not be enough."""
        if size > self.quotas[tier]:
            return None
        need = self.used[tier] + size - self.quotas[tier]
        if need <= 0:
            return []
        victims: list[Row] = []
        for key in self.lru(tier):
            row = self.rows[key]
            if row.refcount == 0 and row.moving_to is None:
                victims.append(row)
                need -= row.size
                if need <= 0:
                    return victims
        return None

    # ---- writes (the meta server only) ---------------------------------------------------------

    def reserve(self, key: bytes, group: bytes, n_tokens: int, tier: str, size: int) -> Row:
        """Charge ``size`` bytes to ``tier`` for a row about to be written."""
        old = self.rows.get(key)
        if old is not None:
            if old.status is RowStatus.AVAILABLE:
                raise AlreadyPresent(f"row {key.hex()[:16]} is already saved in {old.tier}")
            raise Conflict(f"row {key.hex()[:16]} is being written")
        if self.used[tier] + size > self.quotas[tier]:
            raise NoRoom(f"tier {tier} has {self.free_bytes(tier)} of {self.quotas[tier]} bytes free, "
                         f"a row needs {size}")
        row = Row(key, group, n_tokens, tier, size, RowStatus.WRITING)
        self.rows[key] = row
        self.used[tier] += size
        return row

    def publish(self, key: bytes, *, now: float, location: Any = None, size: int | None = None,
                hits: int = 0) -> Row:
        """Make a reserved row available. ``size`` may correct the reserved size downwards
        (a written file's real size); ``hits`` restored from a file bias its recency."""
        row = self.rows[key]
        if row.status is not RowStatus.WRITING:
            raise Conflict(f"row {key.hex()[:16]} is not being written")
        if size is not None and size != row.size:
            if self.used[row.tier] - row.size + size > self.quotas[row.tier]:
                self.cancel(key)
                raise NoRoom(f"row {key.hex()[:16]} grew to {size} bytes, over the {row.tier} quota")
            self.used[row.tier] += size - row.size
            row = replace(row, size=size)
        row = replace(row, status=RowStatus.AVAILABLE, location=location, hits=hits,
                      last_used=now + hits)  # a persisted hit is worth 1 s of recency (SPEC 4.6)
        self._install(row)
        return row

    def insert_available(self, key: bytes, group: bytes, n_tokens: int, tier: str, size: int, *,
                         now: float, location: Any = None, hits: int = 0) -> Row:
        """Register an existing row (startup scan, orphan adoption) in one step."""
        self.reserve(key, group, n_tokens, tier, size)
        return self.publish(key, now=now, location=location, hits=hits)

    def cancel(self, key: bytes) -> None:
        """Drop a reservation (the write failed)."""
        row = self.rows.get(key)
        if row is not None and row.status is RowStatus.WRITING:
            del self.rows[key]
            self.used[row.tier] -= row.size

    def remove(self, key: bytes) -> Row | None:
        """Forget an available row (evicted, corrupt or deleted); returns it."""
        row = self.rows.get(key)
        if row is None or row.status is not RowStatus.AVAILABLE:
            return None
        del self.rows[key]
        self.used[row.tier] -= row.size
        if row.moving_to is not None:
            self.used[row.moving_to] -= row.size
        del self._recency[row.tier][key]
        counts = self._lengths[row.group]
        counts[row.n_tokens] -= 1
        if not counts[row.n_tokens]:
            del counts[row.n_tokens]
            if not counts:
                del self._lengths[row.group]
        return row

    def begin_move(self, key: bytes, tier: str) -> Row:
        """Start moving an available row to ``tier`` (demotion or promotion): ``tier`` is
        charged now, the row stays readable where it is until :meth:`finish_move`. Raises
        :class:`NoRoom` when ``tier`` lacks room, :class:`Conflict` if it is already moving."""
        row = self.rows[key]
        if row.status is not RowStatus.AVAILABLE or row.moving_to is not None:
            raise Conflict(f"row {key.hex()[:16]} cannot move now")
        if self.used[tier] + row.size > self.quotas[tier]:
            raise NoRoom(f"tier {tier} cannot take {row.size} bytes")
        self.used[tier] += row.size
        row = replace(row, moving_to=tier)
        self.rows[key] = row
        return row

    def finish_move(self, key: bytes, location: Any) -> Row:
        """The bytes are in the new tier: the row now lives there; the old tier is released."""
        row = self.rows[key]
        if row.moving_to is None:
            raise Conflict(f"row {key.hex()[:16]} is not moving")
        self.used[row.tier] -= row.size
        del self._recency[row.tier][key]
        moved = replace(row, tier=row.moving_to, moving_to=None, location=location)
        self.rows[key] = moved
        self._recency[moved.tier][key] = moved.last_used
        return moved

    def abort_move(self, key: bytes) -> None:
        """The copy failed: release the charge on the target tier."""
        row = self.rows.get(key)
        if row is not None and row.moving_to is not None:
            self.used[row.moving_to] -= row.size
            self.rows[key] = replace(row, moving_to=None)

    def checkout(self, key: bytes, now: float) -> Row:
        """A reader takes the row: refcount and hits up, most recently used."""
        row = self.rows[key]
        if row.status is not RowStatus.AVAILABLE:
            raise Conflict(f"row {key.hex()[:16]} is not available")
        row = replace(row, refcount=row.refcount + 1, hits=row.hits + 1, last_used=now)
        self.rows[key] = row
        self._recency[row.tier][key] = now
        return row

    def checkin(self, key: bytes) -> None:
        """A reader is done with the row (its refcount never goes below 0)."""
        row = self.rows.get(key)
        if row is not None and row.refcount > 0:
            self.rows[key] = replace(row, refcount=row.refcount - 1)

    def _install(self, row: Row) -> None:
        self.rows[row.key] = row
        self._recency[row.tier][row.key] = row.last_used
        counts = self._lengths.setdefault(row.group, {})
        counts[row.n_tokens] = counts.get(row.n_tokens, 0) + 1
