"""The cache as one object: tiers, the meta server under its own supervisor, the writer pool.

``save`` hands a row to the writer pool and returns at once; ``lookup`` finds the exact
key, a ``parent_key`` resume or the longest saved prefix without a message; ``restore``
checks a row out, reads it (files: into a paged-in buffer of the shared pool) and checks
it in (a message that is not waited for).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

import supervision
from erllama import errors, private
from erllama.cache import kvc
from erllama.cache.counters import Counters, counters
from erllama.cache.index import TIERS, AlreadyPresent, Conflict, Index, Leaving, NoRoom, Row
from erllama.cache.key import KeyMeta, cache_key, prefix_keys
from erllama.cache.meta import RESERVATION_TTL, MetaServer, NeedRoom, group_of
from erllama.cache.pressure import CheckNow
from erllama.cache.pressure import Status as PressureStatus
from erllama.cache.pressure import child_spec as pressure_child_spec
from erllama.cache.publish import PublishError
from erllama.cache.shared import SharedTier
from erllama.cache.tiers import BufferPool, FileTier, RamTier, RowParts, encode_row
from erllama.cache.writer import WriterPool
from erllama.config import CacheConfig

__all__ = ["CacheConfig", "CacheStore", "Hit"]

logger = logging.getLogger("erllama.cache")

_store_ids = itertools.count(1)


@dataclass(frozen=True)
class Hit:
    """A lookup result: ``kind`` is ``"exact"``, ``"resume"`` or ``"partial"``; the row holds
    the first ``n_tokens`` tokens of the prompt."""

    kind: str
    key: bytes
    n_tokens: int


class CacheStore:
    """The cache subsystem. Start with :meth:`start`, stop with :meth:`close`."""

    def __init__(self, config: CacheConfig, *, stats: Counters = counters, supervise: bool = True) -> None:
        self.config = config
        self.counters = stats
        self.tiers: dict[str, Any] = {}
        # one pool of read buffers for publish read-backs, restores and moves between files
        self.buffers = BufferPool(keep=2)
        self._locks: list[private.DirLock] = []
        self.shared: SharedTier | None = None
        try:
            self._open_tiers(config, stats)
            if config.shared_dir:
                self.shared = SharedTier(config.shared_dir, stats, buffers=self.buffers, scan_s=config.shared_scan_s)
        except BaseException:
            self.release_locks()
            raise
        quotas = {"ram": config.ram_quota, "ram_file": config.ram_file_quota, "disk": config.disk_quota}
        self._published: dict[str, Index] = {}
        # saves handed to the writer pool and not yet ended, by key: a parent lookup waits for
        # one before its writer has reserved the key in the meta server
        self._queued: dict[bytes, list[Any]] = {}
        self._queued_lock = threading.Lock()
        self._name = f"erllama.cache.meta.{next(_store_ids)}"
        spec = supervision.ChildSpec(
            "meta", lambda: MetaServer.start(self.tiers, quotas, stats=stats, published=self._published),
            name=self._name)
        self._pressure_name = f"{self._name}.pressure"
        poller = pressure_child_spec(config.pressure, self.evict_bytes, name=self._pressure_name)
        self.writer = WriterPool(config.writer_max_concurrent, queue=config.writer_queue,
                                 queue_bytes=config.writer_queue_bytes)
        self._flags = supervision.SupFlags(supervision.Strategy.ONE_FOR_ONE, intensity=5, period=30.0)
        self._specs = [spec, self.writer.child_spec(), poller]
        try:
            self._sup: Any = supervision.start_supervisor(self._flags, self._specs) if supervise else None
        except BaseException:
            self.release_locks()
            raise

    def _open_tiers(self, config: CacheConfig, stats: Counters) -> None:
        # a FileTier checks its directory is private; it is locked before the meta server scans it
        if config.ram_quota:
            self.tiers["ram"] = RamTier()
        files = []
        if config.ram_file_quota:
            files.append(FileTier("ram_file", config.resolved_ram_file_dir(), stats, buffers=self.buffers,
                                  trust_verified=True))
        if config.disk_quota:
            files.append(FileTier("disk", config.resolved_disk_dir(), stats, buffers=self.buffers))
        for tier in files:
            self._locks.append(private.DirLock(tier.directory, f"{tier.name} tier directory"))
            self.tiers[tier.name] = tier

    def release_locks(self) -> None:
        """Let another application use the tier directories (after the meta server stopped;
        :meth:`close` does it for a store that supervises itself)."""
        locks, self._locks = self._locks, []
        for lock in locks:
            lock.release()

    def child_spec(self, id: str = "cache") -> supervision.ChildSpec:  # noqa: A002
        """The cache supervisor (meta server, writer pool, memory-pressure poller) as a
        child of the application's root supervisor, for a store made with
        ``supervise=False``."""
        return supervision.ChildSpec(id, lambda: supervision.Supervisor.start(self._flags, self._specs),
                                     type=supervision.ChildType.SUPERVISOR, shutdown=supervision.INFINITY)

    @classmethod
    def start(cls, config: CacheConfig | None = None, **overrides: Any) -> CacheStore:
        """Validate the configuration, rebuild the index from the tiers and start."""
        cfg = config or CacheConfig()
        if overrides:
            cfg = CacheConfig(**{**cfg.__dict__, **overrides})
        return cls(cfg)

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until every save handed to the writer pool has landed (or failed)."""
        return self.writer.wait_idle(timeout)

    def close(self, timeout: float = 30.0, *, persist: bool = True) -> None:
        """Finish queued saves, move the ``ram`` rows to the slower tiers (``persist``:
        the ram tier dies with the process), then stop the meta server."""
        self.writer.shutdown(wait=True, timeout=timeout)
        if persist:
            self.persist_ram(timeout)
        if self._sup is not None:  # else its parent stops it, then releases the locks
            supervision.stop_supervisor(self._sup, timeout)
            self.release_locks()

    def persist_ram(self, timeout: float = 30.0) -> int:
        """Demote every ``ram`` row, most recently used first, to the next slower tier with
        room (a row with no room anywhere is dropped, as it would be with the process);
        stops after ``timeout`` seconds. Returns the rows moved."""
        if "ram" not in self.tiers or len(self.tiers) == 1:
            return 0
        deadline = time.monotonic() + timeout
        rows = sorted((r for r in list(self.index.rows.values()) if r.tier == "ram"),
                      key=lambda r: r.last_used, reverse=True)
        before = self.counters.get("demotions")
        for row in rows:
            if time.monotonic() > deadline:
                logger.warning("cache close: %d ram rows not persisted within %s s", len(rows), timeout)
                break
            try:
                self._demote(row.key, "ram", deadline)
            except Exception as exc:  # the meta server went away: nothing more to move
                logger.warning("cache close: persisting %s failed: %s", row.key.hex()[:16], exc)
                break
        return self.counters.get("demotions") - before

    @property
    def index(self) -> Index:
        """The live index (read without a message)."""
        return self._published["index"]

    def _ask(self, method: str, *args: Any) -> Any:
        return supervision.registry.ask(self._name, ("call", method, args), timeout=30.0)

    def _tell(self, method: str, *args: Any) -> None:
        """Send without waiting; the meta server handles it before any later message of
        this thread (its inbox is FIFO)."""
        try:
            supervision.registry.tell(self._name, ("cast", method, args), timeout=30.0)
        except Exception as exc:  # a restarted meta server rebuilds its index: nothing to release
            logger.warning("cache %s of %s not delivered: %s", method, args[:1], exc)

    # ---- saving --------------------------------------------------------------------------------

    def save(self, meta: kvc.RowMeta, logits: np.ndarray | None,
             kv: bytes | bytearray | memoryview | Callable[[], Any], *,
             tier: str = "ram", wait: bool = False, kv_size: int = 0) -> Future[str] | None:
        """Save a row asynchronously; the future's result is ``"saved"`` or ``"duplicate"``.

        Returns ``None`` (and counts ``saves_dropped``) when every writer is busy, unless
        ``wait`` (evict/shutdown saves), which waits for a slot. ``kv`` and ``logits`` must
        not change until the future is done. ``kv`` may be a function that returns the
        state, called in the writer thread (a model's parked copy-out; ``kv_size`` is its
        expected size, for the queue's byte bound); it is not called for a duplicate.
        """
        if tier not in self.tiers:
            raise errors.ConfigError(f"tier {tier!r} is not configured (have {sorted(self.tiers)})")
        key = cache_key(KeyMeta(meta.fingerprint, meta.quant, meta.ctx_params_hash, meta.namespace), meta.token_ids)
        self._queue(key)
        try:
            if wait:
                return self.writer.submit(self._queued_job, key, meta, logits, kv, tier)
            size = kv_size if callable(kv) else memoryview(kv).nbytes
            nbytes = size + (0 if logits is None else np.asarray(logits).nbytes)
            fut = self.writer.try_submit(self._queued_job, key, meta, logits, kv, tier, nbytes=nbytes)
        except BaseException:
            self._unqueue(key)
            raise
        if fut is None:
            self._unqueue(key)
            self.counters.add("saves_dropped")
        return fut

    def _queue(self, key: bytes) -> None:
        with self._queued_lock:
            entry = self._queued.setdefault(key, [threading.Event(), 0])
            entry[1] += 1

    def _unqueue(self, key: bytes) -> None:
        with self._queued_lock:
            entry = self._queued[key]
            entry[1] -= 1
            if entry[1] == 0:
                del self._queued[key]
                entry[0].set()

    def _queued_job(self, key: bytes, *args: Any) -> str:
        try:
            return self._save_job(*args)
        finally:
            self._unqueue(key)

    def _save_job(self, meta: kvc.RowMeta, logits: Any, kv: Any, tier: str, again: bool = True) -> str:
        km = KeyMeta(meta.fingerprint, meta.quant, meta.ctx_params_hash, meta.namespace)
        key = cache_key(km, meta.token_ids)
        if self.index.lookup_exact(key) is not None:  # before the CRC: a finish save often repeats a row
            self.counters.add("duplicate_dropped")
            return "duplicate"
        if callable(kv):
            t0 = time.perf_counter_ns()
            try:
                kv = kv()
            except errors.ErllamaError:
                self.counters.add("saves_failed")
                raise
            self.counters.add("pack_parked_ns", time.perf_counter_ns() - t0)
        parts = encode_row(meta, logits, kv)
        try:
            self._store_parts(key, group_of(km), meta.n_tokens, tier, parts)
        except AlreadyPresent:
            self.counters.add("duplicate_dropped")
            return "duplicate"
        except Conflict:  # another writer is saving the same row right now: its outcome is ours
            if again:
                return self._await_other_save(key, meta, logits, kv, tier)
            self.counters.add("duplicate_dropped")
            return "duplicate"
        reason = kvc.SaveReason(meta.save_reason).name.lower()
        if reason != "unknown":
            self.counters.add(f"saves_{reason}")
        if self.shared is not None:
            self._share(key, parts)
        return "saved"

    def _store_parts(self, key: bytes, group: bytes, n_tokens: int, tier: str, parts: RowParts) -> None:
        """Reserve, write and publish an encoded row in ``tier`` (or a slower one). Raises
        ``AlreadyPresent``/``Conflict`` from the reservation, ``NoRoom`` or the write's error
        (counted in ``saves_failed``; nothing is left behind)."""
        try:
            token, tier = self._reserve(key, group, n_tokens, tier, parts.size)
        except NoRoom:
            self.counters.add("saves_failed")
            raise
        try:
            location = self.tiers[tier].put(key, parts)
        except BaseException:  # put leaves no file behind
            self.counters.add("saves_failed")
            with contextlib.suppress(Exception):
                self._ask("cancel", key, token)
            raise
        try:
            self._ask("publish", key, token, location, parts.size)
        except BaseException:
            self.counters.add("saves_failed")
            # delete the file only while the reservation is still ours: a restarted meta
            # server may have adopted it from its scan
            with contextlib.suppress(Exception):
                if self._ask("owns", key, token):
                    self.tiers[tier].delete(key)
                    self._ask("cancel", key, token)
            raise

    def _share(self, key: bytes, parts: RowParts) -> None:
        """Write a saved row to the shared tier too (best effort: a failure is counted)."""
        assert self.shared is not None
        try:
            self.shared.publish(key, parts)
        except Exception as exc:
            self.counters.add("shared_failed")
            logger.warning("cannot write row %s to the shared tier: %s", key.hex()[:16], exc)
        else:
            self.counters.add("shared_published")

    def _import_shared(self, key: bytes, group: bytes, n_tokens: int) -> bool:
        """Copy a verified row of the shared tier into this node's slowest tier; ``True``
        when it is then available here."""
        assert self.shared is not None
        try:
            parts = self.shared.parts(key)
        except (kvc.CorruptRow, OSError) as exc:
            logger.info("shared row %s not imported: %s", key.hex()[:16], exc)
            return False
        local = [t for t in TIERS if t in self.tiers][-1]
        try:
            self._store_parts(key, group, n_tokens, local, parts)
        except (AlreadyPresent, Conflict):
            pass
        except Exception as exc:
            logger.warning("cannot import shared row %s: %s", key.hex()[:16], exc)
            return False
        self.counters.add("shared_imports")
        return self.index.lookup_exact(key) is not None

    def _await_other_save(self, key: bytes, meta: kvc.RowMeta, logits: Any, kv: Any, tier: str) -> str:
        """Wait for the save of the same row that another writer holds; ``"duplicate"``
        once it is published (so a waiting save returns only when its row is readable),
        else save it here after all."""
        res = self._ask("wait_for", key)
        if res is not None and not isinstance(res, Row):
            try:
                res = res.get(timeout=RESERVATION_TTL)
            except Exception:
                res = None
        if self.index.lookup_exact(key) is not None:
            self.counters.add("duplicate_dropped")
            return "duplicate"
        return self._save_job(meta, logits, kv, tier, again=False)

    def _reserve(self, key: bytes, group: bytes, n_tokens: int, tier: str, size: int) -> tuple[int, str]:
        """Reserve in ``tier``, demoting its least recently used rows to make room, and
        waiting (up to ``room_wait_s``) for bytes already on their way out. A row larger
        than the tier's whole quota goes to the next slower configured tier; so does one
        that found no room in time (counted in ``saves_spilled``)."""
        slower = [t for t in TIERS[TIERS.index(tier):] if t in self.tiers]
        for candidate in slower:
            deadline = time.monotonic() + self.config.room_wait_s
            while True:
                try:
                    res = self._ask("reserve", key, group, n_tokens, candidate, size)
                except NoRoom:
                    break
                except Leaving:  # the key's old file there is being deleted: a moment
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.001)
                    continue
                if not isinstance(res, NeedRoom):
                    if candidate != tier and size <= self.config.quota(tier):
                        self.counters.add("saves_spilled")
                    return res, candidate
                if not self._make_room(res, candidate, deadline):
                    break
        raise NoRoom(f"no configured tier from {tier} on can take {size} bytes")

    def _make_room(self, need: NeedRoom, tier: str, deadline: float) -> bool:
        """Act on a :class:`NeedRoom` answer for ``tier``: demote its victims, or wait for
        the next release of bytes. ``False`` once ``deadline`` has passed."""
        for victim in need.victims:
            self._demote(victim.key, tier, deadline)
        if need.waiter is not None:
            self.counters.add("room_waits")
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(Exception):
                need.waiter.get(timeout=left)
        return time.monotonic() < deadline

    def _demote(self, key: bytes, source: str, deadline: float | None = None) -> bool:
        """Move a row out of ``source`` to the next slower tier that has or can make room
        (its least recently used rows go further down first), or drop it when none can.
        The meta server decides from the row's current state; ``False`` if the row had
        already left, was being read or was moving."""
        if deadline is None:
            deadline = time.monotonic() + self.config.room_wait_s
        while True:
            decision = self._ask("demote", key, source, time.monotonic() < deadline)
            if decision[0] == "busy":
                return False
            if decision[0] == "drop":
                self._delete(key, source)
                return True
            if decision[0] == "room":
                self._make_room(decision[2], decision[1], deadline)
                continue
            _, target, row = decision
            return self._move(row, target)

    def _move(self, row: Row, target: str) -> bool:
        """Copy a row whose move to ``target`` has begun, switch the index to the copy, then
        delete the old file and uncharge it."""
        try:
            with self._parts(row) as parts:
                location = self.tiers[target].put(row.key, parts)
        except (OSError, PublishError, KeyError, kvc.CorruptRow) as exc:
            logger.warning("moving %s from %s to %s failed: %s", row.key.hex()[:16], row.tier, target, exc)
            self._ask("abort_move", row.key, target)
            return False
        if self._ask("finish_move", row.key, location, target) is None:
            self._delete(row.key, target)  # the row went while it was copied
            return False
        self._delete(row.key, row.tier)
        return True

    def _delete(self, key: bytes, tier: str) -> None:
        """Delete a leaving row's bytes from ``tier``, then uncharge them. A file that
        cannot be deleted stays charged."""
        try:
            self.tiers[tier].delete(key)
        except OSError as exc:
            logger.warning("cannot delete %s from %s: %s", key.hex()[:16], tier, exc)
            return
        self._ask("released", [(key, tier)])

    # ---- finding ---------------------------------------------------------------------------------

    def lookup(self, meta: KeyMeta, tokens: Any, *, parent_key: bytes | None = None) -> Hit | None:
        """The best saved row for ``tokens``: the exact key, then ``parent_key`` (waiting up to
        ``parent_wait_s`` for a save of it in flight), then the longest saved prefix."""
        t0 = time.perf_counter_ns()
        toks = list(tokens)
        index = self.index
        key = cache_key(meta, toks)
        if index.lookup_exact(key) is not None:
            self.counters.add("hits_exact")
            return Hit("exact", key, len(toks))
        if parent_key is not None:
            row = self._wait_parent(parent_key)
            if row is not None and row.n_tokens <= len(toks) and row.group == group_of(meta) \
                    and cache_key(meta, toks[: row.n_tokens]) == parent_key:
                self.counters.add("hits_resume")
                return Hit("resume", parent_key, row.n_tokens)
        lengths = index.candidate_lengths(group_of(meta), len(toks) - 1)
        probes = 0
        found: Hit | None = None
        for n, k in prefix_keys(meta, toks, lengths):
            probes += 1
            if index.lookup_exact(k) is not None:
                found = Hit("partial", k, n)
                break
        self._prefix_stats(probes, t0)
        if self.shared is not None:
            found = self._shared_hit(meta, toks, found) or found
        if found is None:
            self.counters.add("misses")
        else:
            self.counters.add("hits_exact" if found.kind == "exact" else "hits_longest_prefix")
        return found

    def _shared_hit(self, meta: KeyMeta, toks: list[int], local: Hit | None) -> Hit | None:
        """A longer prefix than ``local`` from the shared tier, imported here first."""
        assert self.shared is not None
        best = self.shared.best(meta, toks, local.n_tokens if local is not None else 0)
        if best is None or not self._import_shared(best[1], group_of(meta), best[0]):
            return None
        n, key = best
        return Hit("exact" if n == len(toks) else "partial", key, n)

    def restore_failed(self, hit: Hit) -> None:
        """A hit whose row then did not restore: count it as the miss it turned into."""
        kind = {"exact": "hits_exact", "resume": "hits_resume", "partial": "hits_longest_prefix"}[hit.kind]
        self.counters.add(kind, -1)
        self.counters.add("misses")
        self.counters.add("restores_failed")

    def _prefix_stats(self, probes: int, t0: int) -> None:
        self.counters.add("longest_prefix_probes", probes)
        self.counters.add("longest_prefix_ns", time.perf_counter_ns() - t0)

    def _wait_parent(self, key: bytes) -> Row | None:
        """The parent row once it is readable: waits (up to ``parent_wait_s``) for a save of
        it that is queued or running; ``None`` when there is none or it did not land."""
        with self._queued_lock:
            entry = self._queued.get(key)
        if entry is not None:
            entry[0].wait(self.config.parent_wait_s)
            return self.index.lookup_exact(key)
        res = self._ask("wait_for", key)
        if res is None or isinstance(res, Row):
            return res
        try:
            return res.get(timeout=self.config.parent_wait_s)
        except Exception:
            return None

    def longest_prefix(self, meta: KeyMeta, tokens: Any) -> int:
        """Length of the longest saved prefix of ``tokens`` (the whole prompt counts)."""
        toks = list(tokens)
        lengths = self.index.candidate_lengths(group_of(meta), len(toks))
        for n, k in prefix_keys(meta, toks, lengths):
            if self.index.lookup_exact(k) is not None:
                return n
        return 0

    @contextlib.contextmanager
    def restore(self, key: bytes, holder: Any = None, *, verify_late: bool = False) -> Iterator[kvc.Row | None]:
        """Check the row out and yield it (``None`` if it is gone or turns out corrupt: a
        corrupt row is removed and never served). Views in the row are valid inside the
        ``with`` block only. A ``holder`` actor ref (the model actor) has its checkout
        released by the meta server should it die inside the block.

        ``verify_late``: a file row whose payload CRC runs on a helper thread is yielded as
        soon as it is read, its CRC still running, so the caller can copy the KV into llama
        meanwhile. Its payload may then be used for a result only after
        ``row.verified()`` returned ``True`` (``False``: corrupt, removed and counted;
        undo what was copied). A row left unverified is checked when the block ends, and
        a failure raises ``kvc.CorruptRow`` there."""
        t0 = time.perf_counter_ns()
        row = self._ask("checkout", key, holder)
        if row is None:
            yield None
            return
        try:
            with self._load(row, verify_late) as data:
                if data is not None:
                    self.counters.add("load_total_ns", time.perf_counter_ns() - t0)
                yield data
        finally:
            self._tell("checkin", key, holder)
        # promote disk rows to tmpfs, which survives a process restart; never into the
        # in-process ram tier, which would trade a durable copy for a volatile one
        if row.tier == "disk" and "ram_file" in self.tiers and self.index.free_bytes("ram_file") >= row.size:
            self.writer.try_submit(self._promote, row, "ram_file")

    def _promote(self, row: Row, tier: str) -> None:
        """Move a row hit on disk into the ``ram_file`` tier when it has free room."""
        if not self._ask("promote", row.key, tier):
            return
        current = self.index.get(row.key)
        self._move(current if current is not None else row, tier)

    @contextlib.contextmanager
    def _load(self, row: Row, late: bool = False) -> Iterator[kvc.Row | None]:
        """The row's bytes for the ``with`` block (``None`` when gone or corrupt), with the
        tier that served them; a file row is read into a buffer of the pool, given back
        after the block (and after a late CRC check has finished with it). A row moved
        between the check-out and the read is read where it went."""
        buf = None
        data = None
        for _ in range(2):
            tier = self.tiers[row.tier]
            buf = None if row.tier == "ram" else self.buffers.take(row.size)
            try:
                if buf is None:
                    data = tier.load(row.key)
                else:
                    data = tier.load(row.key, buf, late=late,
                                     on_corrupt=lambda r=row: self._ask("remove", r.key, r.tier))
                data = dataclasses.replace(data, tier=row.tier)
                break
            except (kvc.CorruptRow, FileNotFoundError, KeyError) as exc:
                if buf is not None:
                    self.buffers.give(buf)
                    buf = None
                moved = None if isinstance(exc, kvc.CorruptRow) else self._ask("lost", row.key, row.tier)
                if moved is None:
                    logger.warning("cache row %s in %s cannot be served: %s", row.key.hex()[:16], row.tier, exc)
                    if isinstance(exc, kvc.CorruptRow):
                        self._ask("remove", row.key, row.tier)
                    break
                row = moved
        try:
            if data is not None:
                self.counters.add(f"hits_{row.tier}")
            try:
                yield data
            except BaseException:
                if data is not None:
                    data.verified()  # the helper lets go of the buffer
                raise
            else:
                if data is not None and data.check is not None and data.check.result is None \
                        and not data.verified():
                    raise kvc.CorruptRow("crc_mismatch", f"cache row {row.key.hex()[:16]} failed its late CRC "
                                         "check after it was handed out unverified")
            finally:
                if data is not None:
                    data.release()
        finally:
            if buf is not None:
                self.buffers.give(buf)

    def _parts(self, row: Row) -> contextlib.AbstractContextManager[RowParts]:
        """The row's encoded parts for a move to another tier, valid inside the block."""
        source = self.tiers[row.tier]
        if row.tier == "ram":
            return contextlib.nullcontext(source.parts(row.key))
        return source.borrowed_parts(row.key, row.size)

    # ---- eviction ---------------------------------------------------------------------------------

    def evict_bytes(self, n_bytes: int, tiers: tuple[str, ...] | None = None) -> tuple[int, int]:
        """Evict least recently used unreferenced rows until ``n_bytes`` are freed."""
        rows = self._ask("evict", n_bytes, tuple(tiers) if tiers else None)
        gone = []
        try:
            for row in rows:
                try:
                    self.tiers[row.tier].delete(row.key)
                except OSError as exc:  # the file stays, and stays charged
                    logger.warning("cannot delete %s from %s: %s", row.key.hex()[:16], row.tier, exc)
                    continue
                gone.append((row.key, row.tier))
        finally:
            if gone:
                self._ask("released", gone)
        return len(rows), sum(r.size for r in rows)

    def gc(self) -> int:
        """Evict every unreferenced row; returns how many."""
        return self.evict_bytes(-1)[0]

    def pressure_status(self) -> dict[str, Any]:
        """The memory-pressure poller's status (enabled, last sample, last eviction, ...)."""
        return supervision.registry.ask(self._pressure_name, PressureStatus(), timeout=10.0)

    def check_pressure(self) -> dict[str, Any]:
        """Sample memory now and evict down to the low watermark if above the high one
        (a disabled poller answers ``skipped``/``disabled``)."""
        return supervision.registry.ask(self._pressure_name, CheckNow(), timeout=30.0)

    def reservations(self) -> int:
        """Live reservations (0 when no save is in flight)."""
        return self._ask("reservations")

    def stats(self) -> dict[str, Any]:
        """One consistent snapshot of the cache, taken by the meta server between two of
        its messages: per configured tier ``rows``, ``bytes``, ``quota``, the ``charged``
        bytes (rows + ``reserved`` + ``moving_in`` + ``leaving``; never above the quota)
        and the flows since this store started, for which
        ``rows == adopted + saves + moves_in - moves_out - evictions - removed`` always
        holds, and ``hits``; per key group (hex) rows, bytes and hits per tier; live
        ``reservations``; and the writer pool's ``threads``, ``busy``, ``queued`` and
        ``queued_bytes``. See ``docs/guides/caching.md``."""
        out = self._ask("stats")
        out["writer"] = self.writer.stats()
        return out

    def sync(self) -> None:
        """Wait until the meta server has handled every message this thread sent before,
        e.g. the check-in at the end of a ``restore`` block, which is not waited for."""
        self._ask("sync")
