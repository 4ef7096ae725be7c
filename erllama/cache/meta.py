"""The meta server: the only writer of the cache index, reservations and waiters.

Exact lookups read :attr:`MetaServer.index` without a message (rows are immutable and
replaced whole); everything that changes the index is a message to this actor, so the
bookkeeping needs no locks. The actor does no row I/O: writers and readers move bytes, and
tell it what they did. On start it rebuilds the index from the tiers (file scans and the
RAM tier's rows), so a restart by its supervisor loses nothing that was published.
"""

from __future__ import annotations

import hashlib
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
from erllama.cache.index import TIERS, AlreadyPresent, Conflict, Index, NoRoom, Row, RowStatus
from erllama.cache.key import KeyMeta

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


def group_of(meta: KeyMeta) -> bytes:
    """The id of the rows that can be prefixes of each other (same fp, quant, shape, namespace)."""
    return hashlib.sha256(meta.header()).digest()


def _group_of_parsed(m: kvc.RowMeta) -> bytes:
    return group_of(KeyMeta(m.fingerprint, m.quant, m.ctx_params_hash, m.namespace))


@dataclass
class _Reservation:
    token: int
    expires: float


@dataclass(frozen=True)
class NeedRoom:
    """Answer to a reservation: these rows must leave the tier first."""

    victims: tuple[Row, ...]


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
        """Drop reservations past their TTL (a writer that hung or vanished); returns how many."""
        now = self._clock()
        stale = [(k, r.token) for k, r in self._reservations.items() if r.expires < now]
        for key, token in stale:
            logger.warning("dropping an expired reservation of %s", key.hex()[:16])
            self.cancel(key, token)
        return len(stale)

    _CALLS = frozenset({"reserve", "publish", "cancel", "demote", "promote", "finish_move", "abort_move", "checkout",
                        "checkin", "remove", "evict", "wait_for", "reservations", "sweep", "holders", "sync"})

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
        """Reserve a save: a token, or the rows that must leave ``tier`` first. Raises
        ``AlreadyPresent``, ``Conflict`` (a live reservation) or ``NoRoom`` (cannot fit)."""
        res = self._reservations.get(key)
        if res is not None and res.expires < self._clock():
            logger.warning("dropping an expired reservation of %s", key.hex()[:16])
            self.cancel(key, res.token)
        if tier not in self._tiers:
            raise NoRoom(f"tier {tier} is not configured")
        try:
            self.index.reserve(key, group, n_tokens, tier, size)
        except NoRoom:
            plan = self.index.plan_room(tier, size)
            if plan is None:
                raise
            return NeedRoom(tuple(plan))
        token = next(self._tokens)
        self._reservations[key] = _Reservation(token, self._clock() + RESERVATION_TTL)
        self._gauge()
        return token

    def publish(self, key: bytes, token: int, location: Any, size: int, hits: int = 0) -> Row:
        """A reserved row is written: make it available and wake its waiters."""
        self._check(key, token)
        del self._reservations[key]
        row = self.index.publish(key, now=self._clock(), location=location, size=size, hits=hits)
        self._gauge()
        for fut in self._waiters.pop(key, []):
            fut.set(row)
        return row

    def cancel(self, key: bytes, token: int) -> None:
        """A reserved write failed: forget it (waiters get ``None``)."""
        res = self._reservations.get(key)
        if res is None or res.token != token:
            return
        del self._reservations[key]
        self.index.cancel(key)
        self._gauge()
        for fut in self._waiters.pop(key, []):
            fut.set(None)

    def _check(self, key: bytes, token: int) -> None:
        res = self._reservations.get(key)
        if res is None or res.token != token:
            raise Conflict(f"the reservation of {key.hex()[:16]} expired or belongs to another writer")

    def demote(self, key: bytes) -> tuple[str, str | None]:
        """Decide the fate of a victim: ``("move", tier)`` (charged there now),
        ``("drop", None)`` (forgotten; the caller deletes its bytes) or ``("busy", None)``."""
        row = self.index.lookup_exact(key)
        if row is None or row.refcount > 0 or row.moving_to is not None:
            return ("busy", None)
        slower = TIERS[TIERS.index(row.tier) + 1:]
        for tier in slower:
            if tier in self._tiers and self.index.free_bytes(tier) >= row.size:
                self.index.begin_move(key, tier)
                self._gauge()
                return ("move", tier)
        self.index.remove(key)
        self._stats.add("evictions")
        self._gauge()
        return ("drop", None)

    def promote(self, key: bytes, tier: str) -> bool:
        """Start moving a row to the faster ``tier`` if it has free room (no eviction for a
        promotion); ``True`` when the caller should copy it."""
        row = self.index.lookup_exact(key)
        if row is None or row.moving_to is not None or tier not in self._tiers \
                or TIERS.index(tier) >= TIERS.index(row.tier) or self.index.free_bytes(tier) < row.size:
            return False
        self.index.begin_move(key, tier)
        self._gauge()
        return True

    def finish_move(self, key: bytes, location: Any) -> Row:
        """The victim's bytes are in its new tier."""
        row = self.index.finish_move(key, location)
        self._gauge()
        return row

    def abort_move(self, key: bytes) -> None:
        """Copying a victim failed: it stays where it was."""
        self.index.abort_move(key)
        self._gauge()

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
        self.index.checkin(key)
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
        logger.info("released %d checkouts of dead reader %s", sum(entry[1].values()), down.actor_ref)

    def holders(self) -> int:
        """Readers with checkouts outstanding."""
        return len(self._holders)

    def remove(self, key: bytes) -> Row | None:
        """Forget an available row (a reader found it corrupt, or it was deleted)."""
        row = self.index.remove(key)
        self._gauge()
        return row

    def evict(self, n_bytes: int, tiers: tuple[str, ...] | None = None) -> list[Row]:
        """Forget least recently used unreferenced rows of ``tiers`` until ``n_bytes`` are
        freed (all of them when ``n_bytes`` < 0); the caller deletes their bytes."""
        out: list[Row] = []
        freed = 0
        for tier in tiers or TIERS:
            for key in self.index.lru(tier):
                if 0 <= n_bytes <= freed:
                    break
                row = self.index.rows[key]
                if row.refcount == 0 and row.moving_to is None:
                    self.index.remove(key)
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

    def sync(self) -> None:
        """Nothing: answering it proves every earlier message of the sender was handled."""
