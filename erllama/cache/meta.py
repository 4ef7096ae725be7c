"""The meta server: the only writer of the cache index, reservations and waiters.

Exact lookups read :attr:`MetaServer.index` without a message (rows are immutable and
replaced whole); everything that changes the index is a message to this actor, so the
bookkeeping needs no locks. The actor does no row I/O: writers and readers move bytes, and
tell it what they did. On start it rebuilds the index from the tiers (file scans and the
RAM tier's rows), so a restart by its supervisor loses nothing that was published.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pykka

import supervision
from erllama.cache import kvc
from erllama.cache.counters import Counters, counters
from erllama.cache.index import TIERS, AlreadyPresent, Conflict, Index, NoRoom, Room, Row, RowStatus
from erllama.cache.key import KeyMeta, group_of

__all__ = ["MetaServer", "group_of"]

logger = logging.getLogger("erllama.cache")

RESERVATION_TTL = 60.0
SWEEP_INTERVAL = 30.0


class _Sweep:
    """Internal message: drop expired reservations."""


def _tell_quietly(ref: pykka.ActorRef[Any], message: Any) -> None:
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        pass


def _group_of_parsed(m: kvc.RowMeta) -> bytes:
    return group_of(KeyMeta(m.fingerprint, m.quant, m.ctx_params_hash, m.namespace))


@dataclass
class _Reservation:
    token: int
    expires: float


@dataclass(frozen=True)
class NeedRoom:
    """Answer to a reservation (or a demotion's target): these rows must leave the tier
    first; with no victims, ``waiter`` is resolved at the next release of bytes (a move
    or deletion in flight, or a reader letting go), after which the caller asks again."""

    victims: tuple[Row, ...]
    waiter: pykka.ThreadingFuture[None] | None = None


class MetaServer(supervision.Actor):
    """Sole writer of the index. ``tiers`` maps tier names to tier objects (for the
    startup rebuild only); ``quotas`` maps tier names to byte quotas."""

    def __init__(self, tiers: dict[str, Any], quotas: dict[str, int], *,
                 stats: Counters = counters, clock: Callable[[], float] = time.time,
                 published: dict[str, Index] | None = None) -> None:
        super().__init__()
        self.index = Index({t: quotas.get(t, 0) if t in tiers else 0 for t in TIERS})
        # readers find the live index here (a restarted server publishes its new one)
        self._published = published if published is not None else {}
        self._tiers = tiers
        self._stats = stats
        self._clock = clock
        self._reservations: dict[bytes, _Reservation] = {}
        self._tokens = itertools.count(1)
        self._waiters: dict[bytes, list[pykka.ThreadingFuture[Row | None]]] = {}
        # checkouts by holder actor: released when the holder dies (monitor Down)
        self._holders: dict[str, tuple[supervision.MonitorRef, dict[bytes, int]]] = {}
        self._sweeper: threading.Timer | None = None
        self._room_waiters: list[pykka.ThreadingFuture[None]] = []

    # ---- startup -------------------------------------------------------------------------

    def on_start(self) -> None:
        """Rebuild the index from what the tiers hold (most recently used rows first)."""
        found: list[tuple[float, str, bytes, kvc.RowMeta, int, Any]] = []
        ram = self._tiers.get("ram")
        if ram is not None:
            for key in ram.keys():
                parts = ram.parts(key)
                parsed = kvc.parse_header(parts.prefix, file_size=parts.size)
                found.append((self._clock(), "ram", key, parsed.meta, parts.size, None))
        for name in ("ram_file", "disk"):
            tier = self._tiers.get(name)
            if tier is None:
                continue
            for row in tier.scan():
                m = row.parsed.meta
                found.append((m.creation_time + m.hit_count, name, row.key, m, row.size, row.path))
        found.sort(key=lambda r: r[0], reverse=True)
        now = self._clock()
        for _, tier, key, m, size, location in found:
            try:
                self.index.insert_available(key, _group_of_parsed(m), m.n_tokens, tier, size, now=now,
                                            location=location, hits=m.hit_count)
            except (NoRoom, AlreadyPresent):
                # over the quota (it shrank) or a copy in a faster tier: drop this one
                self._tiers[tier].delete(key)
                self._stats.add("evictions")
        self._gauge()
        self._published["index"] = self.index
        self._arm_sweep()
        logger.info("cache index rebuilt: %d rows (%s)", len(self.index.rows), dict(self.index.used))

    def _gauge(self) -> None:
        for tier in TIERS:
            self._stats.set(f"bytes_{tier}", self.index.used[tier])

    # ---- messages ------------------------------------------------------------------------------

    def _arm_sweep(self) -> None:
        self._sweeper = threading.Timer(SWEEP_INTERVAL, _tell_quietly, (self.actor_ref, _Sweep()))
        self._sweeper.daemon = True
        self._sweeper.start()

    def on_stop(self) -> None:
        """Cancel the reservation sweep."""
        if self._sweeper is not None:
            self._sweeper.cancel()

    def sweep(self) -> int:
        """Release the readers waiting on reservations past their TTL (a writer that hung):
        they get ``None`` and go on without the row. The reservation itself, and its
        charge, stay until its writer publishes or cancels: its file may still be written,
        and the tier must account for it. Returns how many reservations are overdue."""
        now = self._clock()
        stale = [k for k, r in self._reservations.items() if r.expires < now]
        for key in stale:
            if self._waiters.get(key):
                logger.warning("a save of %s is overdue; releasing its waiters", key.hex()[:16])
            for fut in self._waiters.pop(key, []):
                fut.set(None)
        return len(stale)

    _CALLS = frozenset({"reserve", "publish", "cancel", "owns", "demote", "promote", "finish_move", "abort_move",
                        "released", "checkout", "checkin", "remove", "lost", "evict", "wait_for", "reservations",
                        "sweep", "holders", "stats", "sync"})

    _CASTS = frozenset({"checkin"})

    def on_receive(self, message: Any) -> Any:
        """``("call", method, args)``: run one of the methods below in the actor's thread;
        ``("cast", method, args)``: the same for a message nobody waits on (a failure is
        logged, never fatal to the server); ``Down`` of a reader: release its checkouts;
        the periodic reservation sweep."""
        if isinstance(message, supervision.Down):
            return self._holder_down(message)
        if isinstance(message, _Sweep):
            self.sweep()
            self._arm_sweep()
            return None
        if isinstance(message, tuple) and len(message) == 3 and message[0] == "call" and message[1] in self._CALLS:
            return getattr(self, message[1])(*message[2])
        if isinstance(message, tuple) and len(message) == 3 and message[0] == "cast" and message[1] in self._CASTS:
            try:
                getattr(self, message[1])(*message[2])
            except Exception:
                logger.exception("meta server: %s failed", message[1])
            return None
        logger.warning("meta server ignores an unexpected message %r", message)
        return None

    def reserve(self, key: bytes, group: bytes, n_tokens: int, tier: str, size: int) -> int | NeedRoom:
        """Reserve a save: a token, or how ``tier`` makes room first. Raises
        ``AlreadyPresent``, ``Conflict`` (a live reservation), ``Leaving`` (the key's old
        file there is being deleted) or ``NoRoom`` (cannot fit)."""
        if tier not in self._tiers:
            raise NoRoom(f"tier {tier} is not configured")
        try:
            self.index.reserve(key, group, n_tokens, tier, size)
        except NoRoom:
            room = self.index.room(tier, size)
            if room is None:
                raise
            return self._need_room(room)
        token = next(self._tokens)
        self._reservations[key] = _Reservation(token, self._clock() + RESERVATION_TTL)
        self._gauge()
        return token

    def _need_room(self, room: Room) -> NeedRoom:
        waiter: pykka.ThreadingFuture[None] | None = None
        if room.wait:
            waiter = pykka.ThreadingFuture()
            self._room_waiters.append(waiter)
        return NeedRoom(room.victims, waiter)

    def _room_freed(self) -> None:
        """Wake every writer waiting for room (each asks again): bytes were released, or a
        row became one that can be moved out."""
        waiters, self._room_waiters = self._room_waiters, []
        for fut in waiters:
            fut.set(None)

    def publish(self, key: bytes, token: int, location: Any, size: int, hits: int = 0) -> Row:
        """A reserved row is written: make it available and wake its waiters."""
        self._check(key, token)
        del self._reservations[key]
        row = self.index.publish(key, now=self._clock(), location=location, size=size, hits=hits)
        self._gauge()
        for fut in self._waiters.pop(key, []):
            fut.set(row)
        self._room_freed()  # a published row can be moved out to make room
        return row

    def cancel(self, key: bytes, token: int) -> None:
        """A reserved write failed and left no file: forget it (waiters get ``None``)."""
        res = self._reservations.get(key)
        if res is None or res.token != token:
            return
        del self._reservations[key]
        self.index.cancel(key)
        self._gauge()
        for fut in self._waiters.pop(key, []):
            fut.set(None)
        self._room_freed()

    def owns(self, key: bytes, token: int) -> bool:
        """Whether ``token`` still holds the reservation of ``key``: a writer whose publish
        failed deletes its file only then (else a restarted server may have adopted it)."""
        res = self._reservations.get(key)
        return res is not None and res.token == token

    def _check(self, key: bytes, token: int) -> None:
        res = self._reservations.get(key)
        if res is None or res.token != token:
            raise Conflict(f"the reservation of {key.hex()[:16]} expired or belongs to another writer")

    def demote(self, key: bytes, source: str, cascade: bool = True) -> tuple[Any, ...]:
        """Decide, from the row's current state, the fate of a victim planned in ``source``:

        * ``("busy",)``: it is no longer there, is being read or is already moving;
        * ``("move", tier, row)``: copy it to ``tier`` (charged there now), then
          :meth:`finish_move`, delete the source file, :meth:`released`;
        * ``("room", tier, NeedRoom)``: the next slower tier must make room first
          (``cascade``), by moving out rows used less recently than this one; a row is
          never dropped while a slower tier has room or rows older than it;
        * ``("drop", row)``: no slower tier can take it: forgotten, its bytes still charged
          to ``source`` until the caller deletes its file and calls :meth:`released`.
        """
        row = self.index.lookup_exact(key)
        if row is None or row.tier != source or row.refcount > 0 or row.moving_to is not None:
            return ("busy",)
        for tier in TIERS[TIERS.index(source) + 1:]:
            if tier not in self._tiers:
                continue
            if (key, tier) in self.index.leaving:  # its old copy there (it was just promoted) is being deleted
                return ("room", tier, self._need_room(Room((), True))) if cascade else ("busy",)
            if self.index.free_bytes(tier) >= row.size:
                moving = self.index.begin_move(key, tier)
                self._gauge()
                return ("move", tier, moving)
            room = self.index.room(tier, row.size) if cascade else None
            # make room only by moving out rows used less recently than this one
            if room is not None and (not room.victims or room.victims[0].last_used <= row.last_used):
                return ("room", tier, self._need_room(room))
        self.index.remove(key, reason="evictions", hold=True)
        self._stats.add("evictions")
        self._gauge()
        return ("drop", row)

    def promote(self, key: bytes, tier: str) -> bool:
        """Start moving a row to the faster ``tier`` if it has free room (no eviction for a
        promotion); ``True`` when the caller should copy it."""
        row = self.index.lookup_exact(key)
        if row is None or row.moving_to is not None or tier not in self._tiers \
                or TIERS.index(tier) >= TIERS.index(row.tier) or self.index.free_bytes(tier) < row.size \
                or (key, tier) in self.index.leaving:
            return False
        self.index.begin_move(key, tier)
        self._gauge()
        return True

    def finish_move(self, key: bytes, location: Any, target: str) -> Row | None:
        """The row's bytes are in ``target``: it lives there now. Its old file stays
        charged to the old tier until the caller deletes it and calls :meth:`released`.
        ``None`` when the row was removed meanwhile (its old file was found corrupt or
        missing): the caller deletes its copy, which stays charged until then."""
        row = self.index.get(key)
        if row is None or row.moving_to != target:
            return None
        source = row.tier
        row = self.index.finish_move(key, location)
        self._room_freed()  # a row moved in can be moved out again
        self._stats.add("demotions" if TIERS.index(row.tier) > TIERS.index(source) else "promotions")
        self._gauge()
        return row

    def abort_move(self, key: bytes, target: str) -> None:
        """Copying a row to ``target`` failed (the copy left no file): it stays where it
        was (or, removed meanwhile, its charge in ``target`` goes)."""
        row = self.index.get(key)
        if row is not None and row.moving_to == target:
            self.index.abort_move(key)
        else:
            self.index.release(key, target)
        self._gauge()
        self._room_freed()

    def released(self, keys: list[tuple[bytes, str]]) -> int:
        """These leaving files are deleted: uncharge their tiers; returns how many were leaving."""
        n = sum(self.index.release(key, tier) for key, tier in keys)
        self._gauge()
        self._room_freed()
        return n

    def checkout(self, key: bytes, holder: pykka.ActorRef[Any] | None = None) -> Row | None:
        """A reader takes an available row (refcount + 1), or ``None``. A ``holder`` actor's
        checkouts are released if it dies before checking them in. The hit count reaches
        the file at :meth:`checkin`, after the read, not on the reader's path."""
        if self.index.lookup_exact(key) is None:
            return None
        row = self.index.checkout(key, self._clock())
        if holder is not None:
            entry = self._holders.get(holder.actor_urn)
            if entry is None:
                entry = (supervision.monitor(holder, self.actor_ref), {})
                self._holders[holder.actor_urn] = entry
            entry[1][key] = entry[1].get(key, 0) + 1
        return row

    def checkin(self, key: bytes, holder: pykka.ActorRef[Any] | None = None) -> None:
        """A reader is done with a row (sent as a cast: the reader does not wait); a file
        row's hit count is persisted in its header."""
        if self.index.checkin(key) and self._room_waiters:
            self._room_freed()
        row = self.index.lookup_exact(key)
        if row is not None and row.tier != "ram" and row.location is not None:
            self._tiers[row.tier].write_hits(key, row.hits)
        if holder is not None:
            entry = self._holders.get(holder.actor_urn)
            if entry is not None:
                keys = entry[1]
                keys[key] = keys.get(key, 1) - 1
                if keys[key] <= 0:
                    del keys[key]
                if not keys:
                    supervision.demonitor(entry[0])
                    del self._holders[holder.actor_urn]

    def _holder_down(self, down: supervision.Down) -> None:
        entry = self._holders.pop(down.actor_ref.actor_urn, None)
        if entry is None:
            return
        for key, n in entry[1].items():
            for _ in range(n):
                self.index.checkin(key)
        self._room_freed()
        logger.info("released %d checkouts of dead reader %s", sum(entry[1].values()), down.actor_ref)

    def holders(self) -> int:
        """Readers with checkouts outstanding."""
        return len(self._holders)

    def remove(self, key: bytes, tier: str) -> Row | None:
        """Forget a row of ``tier`` whose file a reader found corrupt (and deleted) or
        missing; nothing if the row lives elsewhere by now."""
        row = self.index.remove(key, reason="removed", tier=tier)
        if row is not None:
            self._gauge()
            self._room_freed()
        return row

    def lost(self, key: bytes, tier: str) -> Row | None:
        """A reader holding ``key`` found no bytes in ``tier``: ``None`` after forgetting
        the row if it still claims that tier, else the row where it lives now (it was
        moved while the reader waited: read it there)."""
        row = self.index.get(key)
        if row is not None and row.status is RowStatus.AVAILABLE and row.tier != tier:
            return row
        self.remove(key, tier)
        return None

    def evict(self, n_bytes: int, tiers: tuple[str, ...] | None = None) -> list[Row]:
        """Forget least recently used unreferenced rows of ``tiers`` until ``n_bytes`` are
        freed (all of them when ``n_bytes`` < 0). Their bytes stay charged until the
        caller has deleted them and calls :meth:`released`."""
        out: list[Row] = []
        freed = 0
        for tier in tiers or TIERS:
            for key in self.index.lru(tier):
                if 0 <= n_bytes <= freed:
                    break
                row = self.index.rows[key]
                if row.refcount == 0 and row.moving_to is None:
                    self.index.remove(key, reason="evictions", hold=True)
                    out.append(row)
                    freed += row.size
        self._stats.add("evictions", len(out))
        self._gauge()
        return out

    def wait_for(self, key: bytes) -> pykka.ThreadingFuture[Row | None] | Row | None:
        """The row if available; a future resolved when a running write of it ends; or ``None``."""
        row = self.index.get(key)
        if row is None:
            return None
        if row.status is RowStatus.AVAILABLE:
            return row
        fut: pykka.ThreadingFuture[Row | None] = pykka.ThreadingFuture()
        self._waiters.setdefault(key, []).append(fut)
        return fut

    def reservations(self) -> int:
        """Number of live reservations (for leak checks)."""
        return len(self._reservations)

    def stats(self) -> dict[str, Any]:
        """One consistent snapshot of the index (:meth:`Index.stats`) for the configured tiers."""
        out = self.index.stats()
        out["tiers"] = {t: v for t, v in out["tiers"].items() if t in self._tiers}
        out["reservations"] = len(self._reservations)
        return out

    def sync(self) -> None:
        """Nothing: answering it proves every earlier message of the sender was handled."""
