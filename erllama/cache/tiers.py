"""Where row bytes live: ``ram`` (in process), ``ram_file`` (files on tmpfs) and ``disk``.

Every tier stores the same encoded row, a KVC prefix followed by the logits and the KV blob
(:class:`RowParts`), so demoting a row from one tier to the next moves the same bytes and
never re-encodes them. Tiers do no bookkeeping: quotas, LRU and refcounts live in the
index, which the meta server owns.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np

from erllama.cache import kvc, publish
from erllama.cache.counters import Counters, counters
from erllama.cache.key import key_from_parts

__all__ = ["FileTier", "RamTier", "RowParts", "ScannedRow", "encode_row"]

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
    lview = None if logits is None else memoryview(np.ascontiguousarray(logits, dtype="<f4")).cast("B")
    crc = kvc.payload_crc32c(lview, kv)
    prefix = kvc.build_prefix(meta, memoryview(kv).nbytes, lview, crc)
    return RowParts(prefix, lview if lview is not None else b"", kv)


class RamTier:
    """Rows held in this process's memory."""

    name = "ram"

    def __init__(self) -> None:
        self._rows: dict[bytes, RowParts] = {}
        self._lock = threading.Lock()

    def put(self, key: bytes, parts: RowParts) -> None:
        """Keep ``parts`` (no copy) under ``key``."""
        with self._lock:
            self._rows[key] = parts

    def parts(self, key: bytes) -> RowParts:
        """The stored parts of ``key`` (``KeyError`` when absent)."""
        with self._lock:
            return self._rows[key]

    def load(self, key: bytes) -> kvc.Row:
        """The row of ``key``: its header parsed, logits and KV as views of the stored bytes."""
        parts = self.parts(key)
        parsed = kvc.parse_header(parts.prefix, file_size=parts.size)
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


class FileTier:
    """Rows as ``<hex key>.kvc`` files in one directory (``ram_file`` on tmpfs, ``disk``)."""

    def __init__(self, name: str, directory: str | os.PathLike[str], stats: Counters = counters) -> None:
        self.name = name
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._stats = stats
        self._check_buffers = threading.local()

    def path(self, key: bytes) -> Path:
        """The final path of ``key``."""
        return publish.row_path(self.directory, key)

    def _valid(self, path: Path, key: bytes) -> bool:
        # a reused buffer: a fresh one per save cost 3-4x the read itself (bench/cache_io.py)
        buf = getattr(self._check_buffers, "buf", None)
        if buf is None:
            buf = self._check_buffers.buf = bytearray()
        try:
            with kvc.read_row(path, buffer=buf, expected_key=key, key_fn=key_from_parts):
                return True
        except (kvc.CorruptRow, OSError):
            return False

    def put(self, key: bytes, parts: RowParts) -> Path:
        """Write and publish ``parts`` crash-safely; returns the final path. Raises
        :class:`publish.PublishError` (nothing partial stays visible)."""
        tmp = publish.write_tmp(self.directory, key, parts.buffers())
        final = self.path(key)
        publish.publish(tmp, final, lambda p: self._valid(p, key))
        return final

    def load(self, key: bytes, buffer: bytearray | None = None) -> kvc.Row:
        """Read and fully verify the row of ``key`` (into ``buffer`` when given). A corrupt
        file is deleted, counted in ``corrupt_files`` and raised as ``kvc.CorruptRow``;
        a missing one raises ``FileNotFoundError``."""
        path = self.path(key)
        try:
            return kvc.read_row(path, buffer=buffer, expected_key=key, key_fn=key_from_parts)
        except kvc.CorruptRow:
            self._stats.add("corrupt_files")
            path.unlink(missing_ok=True)
            logger.warning("deleted corrupt cache row %s", path)
            raise

    def parts(self, key: bytes) -> RowParts:
        """The row of ``key`` as parts in fresh memory (for promotion to a faster tier)."""
        buf = bytearray()
        with self.load(key, buf) as row:
            po = row.parsed.payload_offset
            logits_len = row.parsed.logits_length
        data = bytes(buf[: row.parsed.file_size])
        view = memoryview(data)
        return RowParts(data[:po], view[po:po + logits_len], view[po + logits_len:])

    def delete(self, key: bytes) -> None:
        """Remove the row's file (idempotent)."""
        self.path(key).unlink(missing_ok=True)

    def write_hits(self, key: bytes, hits: int) -> None:
        """Persist the hit count in the file header (best effort)."""
        kvc.write_hit_count(self.path(key), hits)

    def scan(self) -> list[ScannedRow]:
        """Startup: remove temporaries, then check every row's header and file size.

        Rows whose header or name do not match are deleted and counted in
        ``corrupt_files``; payload CRCs are checked when a row is loaded.
        """
        publish.sweep_tmp(self.directory)
        found: list[ScannedRow] = []
        for path in sorted(self.directory.glob(f"*{publish.ROW_SUFFIX}")):
            try:
                parsed = kvc.read_header(path)
                m = parsed.meta
                key = key_from_parts(m.fingerprint, m.quant, m.ctx_params_hash, m.namespace, m.tokens)
                if path.name != publish.row_path(self.directory, key).name:
                    raise kvc.CorruptRow("key_mismatch", f"{path.name} holds the row of {key.hex()}")
            except kvc.CorruptRow as exc:
                self._stats.add("corrupt_files")
                path.unlink(missing_ok=True)
                logger.warning("deleted corrupt cache row %s: %s", path, exc)
                continue
            except OSError as exc:
                logger.warning("cannot read cache row %s: %s", path, exc)
                continue
            found.append(ScannedRow(key, parsed, parsed.file_size, path))
        return found
