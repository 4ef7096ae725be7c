"""The cache as one object: tiers, the meta server under its own supervisor, the writer pool.

``save`` hands a row to the writer pool and returns at once; ``lookup`` finds the exact
key, a ``parent_key`` resume or the longest saved prefix without a message; ``restore``
checks a row out, reads it (files: into a paged-in buffer of the shared pool) and checks
it in (a message that is not waited for).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import supervision
from erllama import errors
from erllama.cache import kvc
from erllama.cache.counters import Counters, counters
from erllama.cache.index import TIERS, AlreadyPresent, Conflict, Index, NoRoom, Row
from erllama.cache.key import KeyMeta, cache_key, prefix_keys
from erllama.cache.meta import MetaServer, NeedRoom, group_of
from erllama.cache.pressure import CheckNow, PressureConfig
from erllama.cache.pressure import Status as PressureStatus
from erllama.cache.pressure import child_spec as pressure_child_spec
from erllama.cache.publish import PublishError
from erllama.cache.tiers import BufferPool, FileTier, RamTier, RowParts, encode_row
from erllama.cache.writer import WriterPool

__all__ = ["CacheConfig", "CacheStore", "Hit"]

logger = logging.getLogger("erllama.cache")

GiB = 1 << 30
_store_ids = itertools.count(1)


def _default_cache_dir() -> Path:
    env = os.environ.get("ERLLAMA_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "erllama"


@dataclass(frozen=True)
class CacheConfig:
    """Where rows go and how much each tier may hold (bytes; 0 disables a tier)."""

    ram_quota: int = 1 * GiB
    ram_file_dir: str | None = None
    ram_file_quota: int = 2 * GiB
    disk_dir: str | None = None
    disk_quota: int = 20 * GiB
    writer_max_concurrent: int = 4
    parent_wait_s: float = 0.5
    pressure: PressureConfig = field(default_factory=PressureConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.pressure, PressureConfig):
            raise errors.ConfigError(f"pressure must be a PressureConfig, got {self.pressure!r}")
        for name in ("ram_quota", "ram_file_quota", "disk_quota"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise errors.ConfigError(f"{name} must be an int >= 0 (bytes), got {v!r}")
        w = self.writer_max_concurrent
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise errors.ConfigError(f"writer_max_concurrent must be an int >= 1, got {w!r}")
        if not isinstance(self.parent_wait_s, int | float) or not 0 <= self.parent_wait_s <= 60:
            raise errors.ConfigError(f"parent_wait_s must be within [0, 60] seconds, got {self.parent_wait_s!r}")

    def resolved_ram_file_dir(self) -> Path:
        """The tmpfs directory (default ``/dev/shm/erllama-<uid>``)."""
        return Path(self.ram_file_dir) if self.ram_file_dir else Path("/dev/shm") / f"erllama-{os.getuid()}"

    def resolved_disk_dir(self) -> Path:
        """The disk directory (default ``<cache dir>/kv``)."""
        return Path(self.disk_dir) if self.disk_dir else _default_cache_dir() / "kv"


@dataclass(frozen=True)
class Hit:
    """A lookup result: ``kind`` is ``"exact"``, ``"resume"`` or ``"partial"``; the row holds
    the first ``n_tokens`` tokens of the prompt."""

    kind: str
    key: bytes
    n_tokens: int


class CacheStore:
    """The cache subsystem. Start with :meth:`start`, stop with :meth:`close`."""

    def __init__(self, config: CacheConfig, *, stats: Counters = counters) -> None:
        self.config = config
        self.stats = stats
        self.tiers: dict[str, Any] = {}
        # one pool of read buffers for publish read-backs, restores and moves between files
        self.buffers = BufferPool(keep=2)
        if config.ram_quota:
            self.tiers["ram"] = RamTier()
        if config.ram_file_quota:
            self.tiers["ram_file"] = FileTier("ram_file", config.resolved_ram_file_dir(), stats,
                                              buffers=self.buffers, trust_verified=True)
        if config.disk_quota:
            self.tiers["disk"] = FileTier("disk", config.resolved_disk_dir(), stats, buffers=self.buffers)
        quotas = {"ram": config.ram_quota, "ram_file": config.ram_file_quota, "disk": config.disk_quota}
        self._published: dict[str, Index] = {}
        self._name = f"erllama.cache.meta.{next(_store_ids)}"
        spec = supervision.ChildSpec(
            "meta", lambda: MetaServer.start(self.tiers, quotas, stats=stats, published=self._published),
            name=self._name)
        self._pressure_name = f"{self._name}.pressure"
        poller = pressure_child_spec(config.pressure, self.evict_bytes, name=self._pressure_name)
        self._sup = supervision.start_supervisor(
            supervision.SupFlags(supervision.Strategy.ONE_FOR_ONE, intensity=5, period=30.0), [spec, poller])
        self.writer = WriterPool(config.writer_max_concurrent)

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
        self.writer.shutdown(wait=True)
        if persist:
            self.persist_ram(timeout)
        supervision.stop_supervisor(self._sup, timeout)

    def persist_ram(self, timeout: float = 30.0) -> int:
        """Demote every ``ram`` row, most recently used first, to the next slower tier with
        room (a row with no room anywhere is dropped, as it would be with the process);
        stops after ``timeout`` seconds. Returns the rows moved."""
        if "ram" not in self.tiers or len(self.tiers) == 1:
            return 0
        deadline = time.monotonic() + timeout
        rows = sorted((r for r in list(self.index.rows.values()) if r.tier == "ram"),
                      key=lambda r: r.last_used, reverse=True)
        before = self.stats.get("demotions")
        for row in rows:
            if time.monotonic() > deadline:
                logger.warning("cache close: %d ram rows not persisted within %s s", len(rows), timeout)
                break
            try:
                self._demote(row)
            except Exception as exc:  # the meta server went away: nothing more to move
                logger.warning("cache close: persisting %s failed: %s", row.key.hex()[:16], exc)
                break
        return self.stats.get("demotions") - before

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

    def save(self, meta: kvc.RowMeta, logits: np.ndarray | None, kv: bytes | bytearray | memoryview, *,
             tier: str = "ram", wait: bool = False) -> Future[str] | None:
        """Save a row asynchronously; the future's result is ``"saved"`` or ``"duplicate"``.

        Returns ``None`` (and counts ``saves_dropped``) when every writer is busy, unless
        ``wait`` (evict/shutdown saves), which waits for a slot. ``kv`` and ``logits`` must
        not change until the future is done.
        """
        if tier not in self.tiers:
            raise errors.ConfigError(f"tier {tier!r} is not configured (have {sorted(self.tiers)})")
        if wait:
            return self.writer.submit(self._save_job, meta, logits, kv, tier)
        fut = self.writer.try_submit(self._save_job, meta, logits, kv, tier)
        if fut is None:
            self.stats.add("saves_dropped")
        return fut

    def _save_job(self, meta: kvc.RowMeta, logits: Any, kv: Any, tier: str) -> str:
        km = KeyMeta(meta.fingerprint, meta.quant, meta.ctx_params_hash, meta.namespace)
        key = cache_key(km, meta.token_ids)
        if self.index.lookup_exact(key) is not None:  # before the CRC: a finish save often repeats a row
            self.stats.add("duplicate_dropped")
            return "duplicate"
        parts = encode_row(meta, logits, kv)
        try:
            token, tier = self._reserve(key, group_of(km), meta.n_tokens, tier, parts.size)
        except AlreadyPresent:
            self.stats.add("duplicate_dropped")
            return "duplicate"
        except (Conflict, NoRoom):
            self.stats.add("saves_failed")
            raise
        try:
            location = self.tiers[tier].put(key, parts)
            self._ask("publish", key, token, location, parts.size)
        except BaseException:
            self.stats.add("saves_failed")
            with contextlib.suppress(Exception):
                self._ask("cancel", key, token)
            if tier != "ram":
                self.tiers[tier].delete(key)
            raise
        reason = kvc.SaveReason(meta.save_reason).name.lower()
        if reason != "unknown":
            self.stats.add(f"saves_{reason}")
        return "saved"

    def _reserve(self, key: bytes, group: bytes, n_tokens: int, tier: str, size: int) -> tuple[int, str]:
        """Reserve in ``tier``, demoting its LRU rows to make room; a row larger than the
        tier's whole quota goes to the next slower configured tier."""
        slower = [t for t in TIERS[TIERS.index(tier):] if t in self.tiers]
        for candidate in slower:
            for _ in range(16):
                try:
                    res = self._ask("reserve", key, group, n_tokens, candidate, size)
                except NoRoom:
                    break
                if not isinstance(res, NeedRoom):
                    return res, candidate
                for victim in res.victims:
                    self._demote(victim)
        raise NoRoom(f"no configured tier from {tier} on can take {size} bytes")

    def _demote(self, victim: Row) -> None:
        action, target = self._ask("demote", victim.key)
        source = self.tiers[victim.tier]
        if action == "drop":
            source.delete(victim.key)
            return
        if action != "move":
            return
        try:
            with self._parts(victim) as parts:
                location = self.tiers[target].put(victim.key, parts)
        except (OSError, PublishError, KeyError, kvc.CorruptRow) as exc:
            logger.warning("demotion of %s to %s failed: %s", victim.key.hex()[:16], target, exc)
            self._ask("abort_move", victim.key)
            return
        self._ask("finish_move", victim.key, location)
        source.delete(victim.key)
        self.stats.add("demotions")

    # ---- finding ---------------------------------------------------------------------------------

    def lookup(self, meta: KeyMeta, tokens: Any, *, parent_key: bytes | None = None) -> Hit | None:
        """The best saved row for ``tokens``: the exact key, then ``parent_key`` (waiting up to
        ``parent_wait_s`` for a save of it in flight), then the longest saved prefix."""
        t0 = time.perf_counter_ns()
        toks = list(tokens)
        index = self.index
        key = cache_key(meta, toks)
        if index.lookup_exact(key) is not None:
            self.stats.add("hits_exact")
            return Hit("exact", key, len(toks))
        if parent_key is not None:
            row = self._wait_parent(parent_key)
            if row is not None and row.n_tokens <= len(toks) and row.group == group_of(meta) \
                    and cache_key(meta, toks[: row.n_tokens]) == parent_key:
                self.stats.add("hits_resume")
                return Hit("resume", parent_key, row.n_tokens)
        lengths = index.candidate_lengths(group_of(meta), len(toks) - 1)
        probes = 0
        for n, k in prefix_keys(meta, toks, lengths):
            probes += 1
            if index.lookup_exact(k) is not None:
                self._prefix_stats(probes, t0)
                self.stats.add("hits_longest_prefix")
                return Hit("partial", k, n)
        self._prefix_stats(probes, t0)
        self.stats.add("misses")
        return None

    def restore_failed(self, hit: Hit) -> None:
        """A hit whose row then did not restore: count it as the miss it turned into."""
        kind = {"exact": "hits_exact", "resume": "hits_resume", "partial": "hits_longest_prefix"}[hit.kind]
        self.stats.add(kind, -1)
        self.stats.add("misses")
        self.stats.add("restores_failed")

    def _prefix_stats(self, probes: int, t0: int) -> None:
        self.stats.add("longest_prefix_probes", probes)
        self.stats.add("longest_prefix_ns", time.perf_counter_ns() - t0)

    def _wait_parent(self, key: bytes) -> Row | None:
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
                    self.stats.add("load_total_ns", time.perf_counter_ns() - t0)
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
        source = self.tiers[row.tier]
        try:
            with self._parts(row) as parts:
                location = self.tiers[tier].put(row.key, parts)
        except (OSError, PublishError, KeyError, kvc.CorruptRow) as exc:
            logger.warning("promotion of %s failed: %s", row.key.hex()[:16], exc)
            self._ask("abort_move", row.key)
            return
        self._ask("finish_move", row.key, location)
        source.delete(row.key)
        self.stats.add("promotions")

    @contextlib.contextmanager
    def _load(self, row: Row, late: bool = False) -> Iterator[kvc.Row | None]:
        """The row's bytes for the ``with`` block (``None`` when gone or corrupt); a file
        row is read into a buffer of the pool, given back after the block (and after a
        late CRC check has finished with it)."""
        tier = self.tiers[row.tier]
        buf = None if row.tier == "ram" else self.buffers.take(row.size)
        try:
            try:
                if buf is None:
                    data = tier.load(row.key)
                else:
                    data = tier.load(row.key, buf, late=late, on_corrupt=lambda: self._ask("remove", row.key))
            except (kvc.CorruptRow, FileNotFoundError, KeyError) as exc:
                logger.warning("cache row %s in %s cannot be served: %s", row.key.hex()[:16], row.tier, exc)
                self._ask("remove", row.key)
                data = None
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
        for row in rows:
            self.tiers[row.tier].delete(row.key)
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

    def sync(self) -> None:
        """Wait until the meta server has handled every message this thread sent before,
        e.g. the check-in at the end of a ``restore`` block, which is not waited for."""
        self._ask("sync")
