"""The cache index: rows, per-tier byte quotas, LRU, refcounts, prefix lengths.

Pure bookkeeping, no I/O: the meta server is its only writer, and reads (``get``,
``lookup_exact``, ``candidate_lengths``) are safe from any thread because rows are
immutable and replaced whole.

A tier is *charged* for every byte that may exist in it: rows, saves being written
(charged at reservation), rows being copied in (charged when the move begins) and bytes
still *leaving*: a row removed from the index, or moved out, stays charged to its old tier
until its writer reports the file deleted (:meth:`release`). So the bytes really held by a
tier never exceed its charge, and the charge never exceeds the quota.

Every change of a tier's rows is counted in its flows (:data:`FLOWS`), so at any moment
``rows = adopted + saves + moves_in - moves_out - evictions - removed`` per tier.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from erllama import errors
from erllama.types import TIERS

__all__ = ["FLOWS", "TIERS", "AlreadyPresent", "Conflict", "Index", "Leaving", "NoRoom", "Room", "Row",
           "RowStatus"]


FLOWS: tuple[str, ...] = ("adopted", "saves", "moves_in", "moves_out", "evictions", "removed", "hits")
"""Per-tier counts kept by the index: rows found at start, published saves, rows moved in
and out (demotions and promotions), rows evicted (policy, ``evict_bytes``, gc, pressure),
rows removed (corrupt or missing file), and check-outs served."""


class RowStatus(enum.Enum):
    """A row is being written (reserved) or available to readers."""

    WRITING = "writing"
    AVAILABLE = "available"


class AlreadyPresent(errors.CacheError):
    """The key is already saved (a duplicate save is dropped, not an error for the caller)."""


class Conflict(errors.CacheError):
    """Another writer holds a reservation for the key, or the row cannot change now."""


class Leaving(Conflict):
    """The key's old file in that tier is still being deleted: retry once it is released."""


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


@dataclass(frozen=True)
class Room:
    """How a tier can make room for ``size`` more bytes: ``victims`` (least recently used
    first) to move out now; ``wait``: bytes already on their way out (or held by readers)
    cover the rest, so the caller should wait for a release and ask again."""

    victims: tuple[Row, ...]
    wait: bool


class Index:
    """Rows by key, with byte accounting and LRU per tier."""

    def __init__(self, quotas: Mapping[str, int]) -> None:
        for tier in quotas:
            if tier not in TIERS:
                raise errors.ConfigError(f"unknown cache tier {tier!r}; tiers are {TIERS}")
        self.quotas = {t: int(quotas.get(t, 0)) for t in TIERS}
        self.rows: dict[bytes, Row] = {}
        self.used = dict.fromkeys(TIERS, 0)
        """Bytes charged per tier: rows, reservations, moves in, and bytes leaving."""
        self.leaving: dict[tuple[bytes, str], int] = {}
        """Bytes of removed or moved-out rows whose files are not deleted yet, by (key, tier)."""
        self.flows = {t: dict.fromkeys(FLOWS, 0) for t in TIERS}
        self._recency: dict[str, dict[bytes, float]] = {t: {} for t in TIERS}
        self._lengths: dict[bytes, dict[int, int]] = {}
        self._groups: dict[bytes, dict[str, list[int]]] = {}  # group -> tier -> [rows, bytes, hits]

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
        """Quota minus charged bytes."""
        return self.quotas[tier] - self.used[tier]

    def lru(self, tier: str) -> list[bytes]:
        """Available rows of ``tier``, least recently used first."""
        rec = self._recency[tier]
        return sorted(rec, key=rec.__getitem__)

    # ---- planning ----------------------------------------------------------------------------

    def plan_room(self, tier: str, size: int) -> list[Row] | None:
        """The least recently used evictable rows (available, refcount 0, not moving) of
        ``tier`` whose removal makes room for ``size`` bytes; ``[]`` if there is room,
        ``None`` if even evicting every evictable row would not be enough."""
        if size > self.quotas[tier]:
            return None
        need = self.used[tier] + size - self.quotas[tier]
        victims: list[Row] = []
        for key in self.lru(tier):
            if need <= 0:
                break
            row = self.rows[key]
            if row.refcount == 0 and row.moving_to is None:
                victims.append(row)
                need -= row.size
        return victims if need <= 0 else None

    def room(self, tier: str, size: int) -> Room | None:
        """How ``tier`` can make room for ``size`` bytes: its least recently used
        evictable rows, as many as needed (bytes already leaving are some other writer's
        room); when those are not enough but bytes that will be free or evictable soon
        would cover the rest (files being deleted, rows being moved out, rows being read,
        saves being written and rows being copied in), the caller moves what it can, then
        waits. ``None`` when even all of that could not; ``Room((), False)``: it fits now."""
        if size > self.quotas[tier]:
            return None
        need = self.used[tier] + size - self.quotas[tier]
        if need <= 0:
            return Room((), False)
        victims: list[Row] = []
        held = 0
        for key in self.lru(tier):
            if need <= 0:
                break
            row = self.rows[key]
            if row.moving_to is not None:
                continue  # counted in outgoing
            if row.refcount:
                held += row.size
                continue
            victims.append(row)
            need -= row.size
        if need > 0 and need > held + self.outgoing(tier) + self.incoming(tier):
            return None
        return Room(tuple(victims), not victims)

    def incoming(self, tier: str) -> int:
        """Bytes charged to ``tier`` for saves being written and rows being copied in:
        rows there soon, which can then be moved out."""
        return sum(r.size for r in self.rows.values()
                   if (r.tier == tier and r.status is RowStatus.WRITING) or r.moving_to == tier)

    def outgoing(self, tier: str) -> int:
        """Bytes charged to ``tier`` that are on their way out: leaving files and rows
        being moved to another tier."""
        out = sum(n for (_, t), n in self.leaving.items() if t == tier)
        return out + sum(self.rows[k].size for k in self._recency[tier] if self.rows[k].moving_to is not None)

    # ---- writes (the meta server only) ---------------------------------------------------------

    def reserve(self, key: bytes, group: bytes, n_tokens: int, tier: str, size: int) -> Row:
        """Charge ``size`` bytes to ``tier`` for a row about to be written."""
        old = self.rows.get(key)
        if old is not None:
            if old.status is RowStatus.AVAILABLE:
                raise AlreadyPresent(f"row {key.hex()[:16]} is already saved in {old.tier}")
            raise Conflict(f"row {key.hex()[:16]} is being written")
        if (key, tier) in self.leaving:
            raise Leaving(f"the old file of row {key.hex()[:16]} in {tier} is still being deleted")
        if self.used[tier] + size > self.quotas[tier]:
            raise NoRoom(f"tier {tier} has {self.free_bytes(tier)} of {self.quotas[tier]} bytes free, "
                         f"a row needs {size}")
        row = Row(key, group, n_tokens, tier, size, RowStatus.WRITING)
        self.rows[key] = row
        self.used[tier] += size
        return row

    def publish(self, key: bytes, *, now: float, location: Any = None, size: int | None = None,
                hits: int = 0, adopted: bool = False) -> Row:
        """Make a reserved row available. ``size`` may correct the reserved size downwards
        (a written file's real size); ``hits`` restored from a file bias its recency;
        ``adopted``: a row found at start rather than saved."""
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
        self.flows[row.tier]["adopted" if adopted else "saves"] += 1
        return row

    def insert_available(self, key: bytes, group: bytes, n_tokens: int, tier: str, size: int, *,
                         now: float, location: Any = None, hits: int = 0) -> Row:
        """Register an existing row (startup scan, orphan adoption) in one step."""
        self.reserve(key, group, n_tokens, tier, size)
        return self.publish(key, now=now, location=location, hits=hits, adopted=True)

    def cancel(self, key: bytes) -> None:
        """Drop a reservation (the write failed and left no file)."""
        row = self.rows.get(key)
        if row is not None and row.status is RowStatus.WRITING:
            del self.rows[key]
            self.used[row.tier] -= row.size

    def remove(
        self, key: bytes, *, reason: str = "evictions", hold: bool = False, tier: str | None = None
    ) -> Row | None:
        """Forget an available row (``reason``: ``"evictions"`` or ``"removed"``); returns
        it. ``hold``: its bytes stay charged as leaving until :meth:`release` (its file is
        still to be deleted). ``tier``: only if the row lives there."""
        row = self.rows.get(key)
        if row is None or row.status is not RowStatus.AVAILABLE or (tier is not None and row.tier != tier):
            return None
        del self.rows[key]
        if hold:
            self.leaving[(key, row.tier)] = row.size
        else:
            self.used[row.tier] -= row.size
        if row.moving_to is not None:  # its mover's copy is leaving too
            self.leaving[(key, row.moving_to)] = row.size
        del self._recency[row.tier][key]
        counts = self._lengths[row.group]
        counts[row.n_tokens] -= 1
        if not counts[row.n_tokens]:
            del counts[row.n_tokens]
            if not counts:
                del self._lengths[row.group]
        self._count(row, row.tier, -1)
        self.flows[row.tier][reason] += 1
        return row

    def release(self, key: bytes, tier: str) -> bool:
        """The file of a leaving row is deleted: uncharge its bytes. ``False`` if none was leaving."""
        size = self.leaving.pop((key, tier), None)
        if size is None:
            return False
        self.used[tier] -= size
        return True

    def begin_move(self, key: bytes, tier: str) -> Row:
        """Start moving an available row to ``tier`` (demotion or promotion): ``tier`` is
        charged now, the row stays readable where it is until :meth:`finish_move`. Raises
        :class:`NoRoom` when ``tier`` lacks room, :class:`Conflict` if it is already moving
        or its old file there is still leaving."""
        row = self.rows[key]
        if row.status is not RowStatus.AVAILABLE or row.moving_to is not None or (key, tier) in self.leaving:
            raise Conflict(f"row {key.hex()[:16]} cannot move now")
        if self.used[tier] + row.size > self.quotas[tier]:
            raise NoRoom(f"tier {tier} cannot take {row.size} bytes")
        self.used[tier] += row.size
        row = replace(row, moving_to=tier)
        self.rows[key] = row
        return row

    def finish_move(self, key: bytes, location: Any) -> Row:
        """The bytes are in the new tier: the row lives there now; its old file is leaving
        (charged to the old tier until :meth:`release`)."""
        row = self.rows.get(key)
        if row is None or row.moving_to is None:
            raise Conflict(f"row {key.hex()[:16]} is not moving")
        self.leaving[(key, row.tier)] = row.size
        del self._recency[row.tier][key]
        self._count(row, row.tier, -1)
        self.flows[row.tier]["moves_out"] += 1
        moved = replace(row, tier=row.moving_to, moving_to=None, location=location)
        self.rows[key] = moved
        self._recency[moved.tier][key] = moved.last_used
        self._count(moved, moved.tier, 1)
        self.flows[moved.tier]["moves_in"] += 1
        return moved

    def abort_move(self, key: bytes) -> None:
        """The copy failed (and left no file): release the charge on the target tier."""
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
        self.flows[row.tier]["hits"] += 1
        self._groups[row.group][row.tier][2] += 1
        return row

    def checkin(self, key: bytes) -> bool:
        """A reader is done with the row (its refcount never goes below 0); ``True`` when
        no reader holds it any more."""
        row = self.rows.get(key)
        if row is not None and row.refcount > 0:
            self.rows[key] = replace(row, refcount=row.refcount - 1)
            return row.refcount == 1
        return False

    def _install(self, row: Row) -> None:
        self.rows[row.key] = row
        self._recency[row.tier][row.key] = row.last_used
        counts = self._lengths.setdefault(row.group, {})
        counts[row.n_tokens] = counts.get(row.n_tokens, 0) + 1
        self._count(row, row.tier, 1)

    def _count(self, row: Row, tier: str, sign: int) -> None:
        per = self._groups.setdefault(row.group, {t: [0, 0, 0] for t in TIERS})[tier]
        per[0] += sign
        per[1] += sign * row.size

    # ---- a view ----------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Per tier: rows, bytes, quota, charged bytes split into reserved / moving in /
        leaving, and the flows; per group (hex): rows, bytes and hits per tier."""
        tiers: dict[str, dict[str, int]] = {}
        for t in TIERS:
            tiers[t] = {"rows": 0, "bytes": 0, "quota": self.quotas[t], "reserved": 0, "moving_in": 0,
                        "leaving": 0, "charged": self.used[t], **self.flows[t]}
        for row in self.rows.values():
            if row.status is RowStatus.WRITING:
                tiers[row.tier]["reserved"] += row.size
                continue
            tiers[row.tier]["rows"] += 1
            tiers[row.tier]["bytes"] += row.size
            if row.moving_to is not None:
                tiers[row.moving_to]["moving_in"] += row.size
        for (_, t), n in self.leaving.items():
            tiers[t]["leaving"] += n
        groups = {g.hex(): {"rows": {t: v[0] for t, v in per.items()}, "bytes": {t: v[1] for t, v in per.items()},
                            "hits": {t: v[2] for t, v in per.items()}}
                  for g, per in self._groups.items()}
        return {"tiers": tiers, "groups": groups}
