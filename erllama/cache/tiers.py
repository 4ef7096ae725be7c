"""Where row bytes live: ``ram`` (in process), ``ram_file`` (files on tmpfs) and ``disk``.

Every tier stores the same encoded row, a KVC prefix followed by the logits and the KV blob
(:class:`RowParts`), so demoting a row from one tier to the next moves the same bytes and
never re-encodes them. Tiers do no bookkeeping: quotas, LRU and refcounts live in the
index, which the meta server owns.

File rows are read into buffers of one :class:`BufferPool` shared by every thread (the
publish read-back of a save and the restores), so a restore reads into memory that is
already paged in. A ``FileTier`` made with ``trust_verified`` (``ram_file``) skips the
payload CRC of a row it has fully verified itself while the file's identity (inode, size,
mtime and ctime, in nanoseconds) is unchanged; see ``docs/internals/cache-design.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from erllama import private
from erllama.cache import kvc, kvcfile, publish
from erllama.cache.counters import Counters, counters
from erllama.cache.key import key_from_parts

__all__ = ["BufferPool", "FileTier", "RamTier", "RowParts", "ScannedRow", "encode_row", "fine_ctime"]

logger = logging.getLogger("erllama.cache")

Buffer = bytes | bytearray | memoryview


class RowParts(NamedTuple):
    """An encoded row: write ``prefix``, then ``logits`` (may be empty), then ``kv``."""

    prefix: bytes
    logits: Buffer
    kv: Buffer

    @property
    def size(self) -> int:
        """Bytes of the whole row (its file size)."""
        return len(self.prefix) + memoryview(self.logits).nbytes + memoryview(self.kv).nbytes

    def buffers(self) -> list[Buffer]:
        """The parts in file order."""
        return [self.prefix, self.logits, self.kv]


class ScannedRow(NamedTuple):
    """A valid row found by a startup scan."""

    key: bytes
    parsed: kvc.Parsed
    size: int
    path: Path


def encode_row(meta: kvc.RowMeta, logits: np.ndarray | Buffer | None, kv: Buffer) -> RowParts:
    """Encode a row without copying ``logits`` or ``kv``."""
    lview = None if logits is None else np.ascontiguousarray(logits, dtype="<f4").data.cast("B")
    crc = kvc.payload_crc32c(lview, kv)
    prefix = kvc.build_prefix(meta, memoryview(kv).nbytes, lview, crc)
    return RowParts(prefix, lview if lview is not None else b"", kv)


_ROUND = 1 << 20


class BufferPool:
    """Read buffers shared by every thread, so that reading a row file lands in memory
    that is already paged in.

    A fresh buffer costs its page faults on first touch: 3-10x the read itself
    (``bench/cache_io.py``); the first restore of each size into a per-thread buffer paid
    15-30 ms at 15 MB. Here the publish read-back of every file save leaves a paged-in
    buffer of that row's size in the pool, and the restore that follows takes it. At most
    ``keep`` free buffers are kept (the smallest go first); a buffer is never shared while
    taken.
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> bytearray:
        """The smallest free buffer of at least ``size`` bytes, else a new one (rounded up
        to 1 MiB). Give it back with :meth:`give` once no view of it is left."""
        with self._lock:  # by index: list.remove would compare the contents of equal-sized buffers
            fits = [i for i, b in enumerate(self._free) if len(b) >= size]
            if fits:
                return self._free.pop(min(fits, key=lambda i: len(self._free[i])))
        return bytearray(-(-max(size, 1) // _ROUND) * _ROUND)

    def give(self, buf: bytearray) -> None:
        """Return a buffer taken from :meth:`take`."""
        with self._lock:
            self._free.append(buf)
            if len(self._free) > self.keep:
                self._free.pop(min(range(len(self._free)), key=lambda i: len(self._free[i])))

    @contextlib.contextmanager
    def buffer(self, size: int) -> Iterator[bytearray]:
        """:meth:`take` for the ``with`` block, then :meth:`give`."""
        buf = self.take(size)
        try:
            yield buf
        finally:
            self.give(buf)

    def sizes(self) -> list[int]:
        """Sizes of the free buffers (for tests)."""
        with self._lock:
            return sorted(len(b) for b in self._free)


def _readonly(buf: Buffer) -> Buffer:
    with memoryview(buf) as view:
        return buf if view.readonly else bytes(view.cast("B"))


class RamTier:
    """Rows held in this process's memory.

    A row keeps only read-only buffers: a writable ``logits`` or ``kv`` handed to
    :meth:`put` is copied, so a caller reusing its buffer can never change a stored row.
    Rows are not CRC-checked on load (it would cost ~1.4 ms per 14 MB, about 60 % of a
    whole warm start; docs/internals/cache-design.md).
    """

    name = "ram"

    def __init__(self) -> None:
        self._rows: dict[bytes, tuple[RowParts, kvc.Parsed]] = {}
        self._lock = threading.Lock()

    def put(self, key: bytes, parts: RowParts) -> None:
        """Keep ``parts`` under ``key`` (read-only buffers without a copy) with its parsed header."""
        parts = RowParts(bytes(parts.prefix), _readonly(parts.logits), _readonly(parts.kv))
        parsed = kvc.parse_header(parts.prefix, file_size=parts.size)
        with self._lock:
            self._rows[key] = (parts, parsed)

    def parts(self, key: bytes) -> RowParts:
        """The stored parts of ``key`` (``KeyError`` when absent)."""
        with self._lock:
            return self._rows[key][0]

    def load(self, key: bytes) -> kvc.Row:
        """The row of ``key``: its header (parsed once, at :meth:`put`), logits and KV as
        views of the stored bytes."""
        with self._lock:
            parts, parsed = self._rows[key]
        logits = memoryview(parts.logits).cast("B").cast("f") if parsed.n_logits else None
        return kvc.Row(parsed, logits, memoryview(parts.kv).cast("B"))

    def delete(self, key: bytes) -> None:
        """Drop ``key`` (idempotent)."""
        with self._lock:
            self._rows.pop(key, None)

    def keys(self) -> list[bytes]:
        """Keys held."""
        with self._lock:
            return list(self._rows)


PIPELINE_MIN = 4 << 20
"""Files at least this large are CRC-checked on a helper thread while they are read."""
PIPELINE_CHUNK = 2 << 20


class _CrcPipe:
    """One read whose payload CRC runs on a helper thread, a chunk behind the reader."""

    def __init__(self, jobs: queue.SimpleQueue[int | None], result: Future[kvc.PayloadCrc | None]) -> None:
        self.jobs = jobs
        self.result = result

    def finish(self) -> kvc.PayloadCrc | None:
        """Wait for the helper; its CRCs, or ``None`` when it gave up (the caller checks)."""
        self.jobs.put(None)
        try:
            return self.result.result()
        except Exception:  # the helper failed: the caller computes the CRCs itself
            return None


def _crc_job(crc: kvc.PayloadCrc, jobs: queue.SimpleQueue[int | None]) -> kvc.PayloadCrc | None:
    ok = True
    while (got := jobs.get()) is not None:
        if ok:
            try:
                crc.feed(got)
            except Exception:  # a bad prefix: the reader's parse reports it
                ok = False
    return crc if ok else None


class _LateCheck:
    """The end of a payload check still running when its row was handed out."""

    def __init__(self, tier: FileTier, path: Path, key: bytes, row: kvc.Row, pipe: _CrcPipe,
                 ident: tuple[int, ...] | None, on_corrupt: Callable[[], object] | None) -> None:
        self._args = (tier, path, key, row, pipe, ident, on_corrupt)
        self.result: bool | None = None
        self._lock = threading.Lock()

    def __call__(self) -> bool:
        with self._lock:
            if self.result is None:
                tier, path, key, row, pipe, ident, on_corrupt = self._args
                try:
                    kvc.check_payload(row, pipe.finish())
                    self.result = True
                except kvc.CorruptRow:
                    self.result = False
                if self.result and tier.trusting and ident is not None:
                    tier._verified[key] = ident
                elif not self.result:
                    tier._corrupt(path, key)
                    if on_corrupt is not None:
                        on_corrupt()
            return self.result


class _CrcHelpers:
    """At most ``n`` helper threads for :class:`_CrcPipe` (none free: the read is checked
    on its own thread, as before)."""

    def __init__(self, n: int = 2) -> None:
        self._n = n
        self._slots = threading.BoundedSemaphore(n)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def start(self, buffer: bytearray) -> _CrcPipe | None:
        if not self._slots.acquire(blocking=False):
            return None
        try:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self._n, thread_name_prefix="erllama-crc")
            jobs: queue.SimpleQueue[int | None] = queue.SimpleQueue()
            fut = self._pool.submit(_crc_job, kvc.PayloadCrc(buffer), jobs)
        except BaseException:
            self._slots.release()
            raise
        fut.add_done_callback(lambda _f: self._slots.release())
        return _CrcPipe(jobs, fut)


_helpers = _CrcHelpers()


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def fine_ctime(directory: Path, trials: int = 3) -> bool:
    """Whether a write to a file in ``directory`` right after an ``fstat`` always changes
    its ctime (Linux multigrain timestamps, tmpfs and ext4 since 6.13; older kernels
    stamp with a coarse clock, so a write in the same tick could go unseen)."""
    # named like a temporary row file, so a leftover is swept at the next start
    probe = directory / f"ctime-probe{publish.ROW_SUFFIX}.{os.getpid()}.{uuid.uuid4().hex[:12]}{publish.TMP_SUFFIX}"
    try:
        fd = private.create_private(probe, os.O_RDWR)
    except OSError:
        return False
    try:
        for i in range(trials):
            before = os.fstat(fd).st_ctime_ns
            os.pwrite(fd, bytes((i,)), 0)
            if os.fstat(fd).st_ctime_ns == before:
                return False
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


class FileTier:
    """Rows as ``<hex key>.kvc`` files in one directory (``ram_file`` on tmpfs, ``disk``).

    With ``trust_verified`` a load skips the payload CRCs of a row this tier has fully
    verified itself (at its publish read-back or an earlier load) when the file's identity
    (device, inode, size, mtime and ctime in ns) is the one it had then, before and after
    the read; the header, its CRC, the size and the key are always checked. Any write,
    truncation or replacement through the file system changes the identity, and the row
    is fully verified again. It is only honoured when :func:`fine_ctime` holds for the
    directory. Meant for tmpfs, where nothing but a write can change the bytes; ``disk``
    keeps the full check because an evicted page comes back from the medium.
    """

    def __init__(self, name: str, directory: str | os.PathLike[str], stats: Counters = counters, *,
                 buffers: BufferPool | None = None, trust_verified: bool = False) -> None:
        self.name = name
        self.directory = private.private_dir(directory, f"{name} tier directory")
        self._stats = stats
        self.buffers = buffers if buffers is not None else BufferPool()
        self.trusting = trust_verified and fine_ctime(self.directory)
        if trust_verified and not self.trusting:
            logger.info("%s: timestamps are coarse on %s; every load checks the payload CRC", name, directory)
        self._verified: dict[bytes, tuple[int, ...]] = {}
        self._lock = threading.Lock()

    def path(self, key: bytes) -> Path:
        """The final path of ``key``."""
        return publish.row_path(self.directory, key)

    def _read(self, path: Path, key: bytes, buffer: bytearray | None, late: bool = False,
              on_corrupt: Callable[[], object] | None = None) -> kvc.Row:
        crcs = pipe = None
        with kvcfile.open_row(path) as f:
            st = os.fstat(f.fileno())
            ident = _identity(st)
            trusted = self.trusting and self._verified.get(key) == ident
            if not trusted and st.st_size >= PIPELINE_MIN:
                if buffer is None:
                    buffer = bytearray(st.st_size)
                kvc.ensure_capacity(buffer, st.st_size)  # never grown while the helper views it
                pipe = _helpers.start(buffer)
            try:
                view = kvcfile.read_into(f, st.st_size, buffer, chunk=PIPELINE_CHUNK if pipe else 0,
                                     on_chunk=pipe.jobs.put if pipe else None)
            except BaseException:
                if pipe is not None:
                    pipe.finish()
                raise
            if pipe is not None and not late:
                crcs = pipe.finish()
            steady = _identity(os.fstat(f.fileno())) == ident
        late = late and pipe is not None
        try:
            row = kvc.parse(view, expected_key=key, key_fn=key_from_parts,
                            verify_payload=not late and not (trusted and steady), crcs=crcs)
        except kvc.CorruptRow as exc:
            if late and pipe is not None:
                pipe.finish()  # the helper is done with the buffer before anyone reuses it
            self._verified.pop(key, None)
            raise exc.with_path(os.fsdecode(path)) from None
        finally:
            view.release()
        if late and pipe is not None:
            check = _LateCheck(self, path, key, row, pipe, ident if steady else None, on_corrupt)
            return dataclasses.replace(row, check=check)
        if trusted and steady:
            self._stats.add("loads_crc_skipped")
        elif self.trusting and steady:
            self._verified[key] = ident  # these exact bytes passed every check
        return row

    def _corrupt(self, path: Path, key: bytes, reason: str = "") -> None:
        self._verified.pop(key, None)
        self._discard(path, reason)

    def _discard(self, path: Path, reason: str, why: object = "") -> None:
        """Remove a row file that must not be served: corrupt, or not this user's own
        regular file (``foreign_files``: a planted row is deleted, never read)."""
        foreign = reason == "not_private"
        self._stats.add("foreign_files" if foreign else "corrupt_files")
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:  # e.g. a directory planted under a row's name
            logger.warning("cannot remove cache row %s: %s", path, exc)
        logger.warning("deleted %s cache row %s%s", "refused" if foreign else "corrupt", path,
                       f": {why}" if why else "")

    def _valid(self, path: Path, key: bytes, size: int) -> bool:
        # a pooled buffer: a fresh one per save cost 3-4x the read itself (bench/cache_io.py),
        # and the restore that follows a save reuses it paged in
        try:
            with self.buffers.buffer(size) as buf, self._read(path, key, buf):
                return True
        except (kvc.CorruptRow, OSError):
            return False

    def put(self, key: bytes, parts: RowParts) -> Path:
        """Write and publish ``parts`` crash-safely; returns the final path. Raises
        :class:`publish.PublishError` (nothing partial stays visible)."""
        tmp = publish.write_tmp(self.directory, key, parts.buffers())
        final = self.path(key)
        publish.publish(tmp, final, lambda p: self._valid(p, key, parts.size))
        return final

    def load(self, key: bytes, buffer: bytearray | None = None, *, late: bool = False,
             on_corrupt: Callable[[], object] | None = None) -> kvc.Row:
        """Read and verify the row of ``key`` (into ``buffer`` when given). A corrupt
        file is deleted, counted in ``corrupt_files`` and raised as ``kvc.CorruptRow``;
        a missing one raises ``FileNotFoundError``.

        ``late``: when the payload CRC runs on a helper thread, return as soon as the bytes
        are read, with ``row.check`` set; ``row.verified()`` waits for the CRC and answers
        (a corrupt file is then deleted and counted, and ``on_corrupt()`` called). The
        caller may copy the payload meanwhile, but must not use it before ``True``."""
        path = self.path(key)
        try:
            return self._read(path, key, buffer, late, on_corrupt)
        except kvc.CorruptRow as exc:
            self._corrupt(path, key, exc.reason)
            raise

    def parts(self, key: bytes) -> RowParts:
        """The row of ``key`` as parts in fresh memory."""
        buf = bytearray()
        with self.load(key, buf) as row:
            po = row.parsed.payload_offset
            logits_len = row.parsed.logits_length
        data = bytes(buf[: row.parsed.file_size])
        view = memoryview(data)
        return RowParts(data[:po], view[po:po + logits_len], view[po + logits_len:])

    @contextlib.contextmanager
    def borrowed_parts(self, key: bytes, size: int) -> Iterator[RowParts]:
        """The row of ``key`` as parts viewing a pooled buffer, valid inside the ``with``
        block (to copy it to another file tier without fresh memory)."""
        with self.buffers.buffer(size) as buf, self.load(key, buf) as row, memoryview(buf) as whole:
            po, ko, end = row.parsed.payload_offset, row.parsed.kv_offset, row.parsed.file_size
            with whole[:po] as prefix, whole[po:ko] as logits, whole[ko:end] as kv:
                yield RowParts(bytes(prefix), logits, kv)

    def delete(self, key: bytes) -> None:
        """Remove the row's file (idempotent)."""
        self._verified.pop(key, None)
        self.path(key).unlink(missing_ok=True)

    def write_hits(self, key: bytes, hits: int) -> None:
        """Persist the hit count in the file header (best effort). The bytes it writes are
        outside both CRCs; a trusted row stays trusted when its identity was the verified
        one right before this write."""
        path = self.path(key)
        if not self.trusting or key not in self._verified:
            kvcfile.write_hit_count(path, hits)
            return
        with self._lock:
            try:
                fd = private.open_private(path, os.O_WRONLY)
            except OSError:
                return
            try:
                ok = _identity(os.fstat(fd)) == self._verified.get(key)
                kvcfile.write_hit_count(fd, hits)
                if ok:
                    self._verified[key] = _identity(os.fstat(fd))
                else:
                    self._verified.pop(key, None)
            except OSError:
                self._verified.pop(key, None)
            finally:
                os.close(fd)

    def scan(self) -> list[ScannedRow]:
        """Startup: remove temporaries, then check every row's header and file size.

        Rows whose header or name do not match are deleted and counted in
        ``corrupt_files``; payload CRCs are checked when a row is loaded.
        """
        publish.sweep_tmp(self.directory)
        found: list[ScannedRow] = []
        for path in sorted(self.directory.glob(f"*{publish.ROW_SUFFIX}")):
            try:
                parsed = kvcfile.read_header(path)
                m = parsed.meta
                key = key_from_parts(m.fingerprint, m.quant, m.ctx_params_hash, m.namespace, m.tokens)
                if path.name != publish.row_path(self.directory, key).name:
                    raise kvc.CorruptRow("key_mismatch", f"{path.name} holds the row of {key.hex()}")
            except kvc.CorruptRow as exc:
                self._discard(path, exc.reason, exc)
                continue
            except OSError as exc:
                logger.warning("cannot read cache row %s: %s", path, exc)
                continue
            found.append(ScannedRow(key, parsed, parsed.file_size, path))
        return found
