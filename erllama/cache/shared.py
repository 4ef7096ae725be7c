"""The shared cold tier: one directory that several nodes mount (NFS, a cluster file
system), holding rows every node may read.

Each node writes every row it saves here too, with the same crash-safe protocol as its own
tiers (a fully written, fdatasync'ed temporary file linked onto its final name,
:mod:`erllama.cache.publish`): a half-written row never has a final name. Two nodes
publishing the same key resolve by adoption (the second finds the first's file, checks it
and keeps it); keys are content-addressed, so both hold the same bytes. A node looks here
when its own tiers miss or hold a shorter prefix, verifies the row in full (header,
key, both CRCs), and imports it into its own disk tier: it is then an ordinary local disk
hit. A corrupt row is deleted and counted, never served.

What is not done here: a quota or garbage collection of the shared directory (it grows
until an operator prunes it: ``find <dir> -name '*.kvc' -atime +7 -delete`` is safe, a
reader that loses a row falls back to prefill), and no lock: several nodes write at once.
Temporary files of other nodes are removed only when older than an hour.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from erllama.cache import kvc, kvcfile, publish
from erllama.cache.counters import Counters
from erllama.cache.key import KeyMeta, group_of, key_from_parts, prefix_keys
from erllama.cache.tiers import BufferPool, FileTier, RowParts

__all__ = ["SharedTier"]

logger = logging.getLogger("erllama.cache")

STALE_TMP_S = 3600.0


class SharedTier:
    """The rows of a shared directory, listed lazily (at most every ``scan_s`` seconds a
    lookup lists the directory again and reads the headers of the files it has not seen)."""

    def __init__(self, directory: str | os.PathLike[str], stats: Counters, *, buffers: BufferPool | None = None,
                 scan_s: float = 1.0) -> None:
        self.files = FileTier("shared", directory, stats, buffers=buffers)
        self.directory = self.files.directory
        self.scan_s = scan_s
        self._stats = stats
        self._lock = threading.Lock()
        self._names: dict[str, tuple[bytes, int, bytes] | None] = {}  # file name -> (key, tokens, group)
        self._lengths: dict[bytes, set[int]] = {}  # group -> token counts present
        self._keys: set[bytes] = set()
        self._listed = -float("inf")
        self.sweep_stale_tmp()

    def sweep_stale_tmp(self, older_than_s: float = STALE_TMP_S) -> int:
        """Remove temporary files older than ``older_than_s`` (their writers are gone; a
        younger one may be another node's write in progress)."""
        n, now = 0, time.time()
        for p in self.directory.glob(f"*{publish.ROW_SUFFIX}.*{publish.TMP_SUFFIX}"):
            try:
                if now - p.stat().st_mtime > older_than_s:
                    p.unlink()
                    n += 1
            except FileNotFoundError:
                pass
        return n

    def refresh(self, force: bool = False) -> None:
        """List the directory again (rate-limited unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._listed < self.scan_s:
            return
        with self._lock:
            self._listed = now
            try:
                names = {e.name for e in os.scandir(self.directory)
                         if e.name.endswith(publish.ROW_SUFFIX)}
            except OSError as exc:
                logger.warning("cannot list the shared cache tier %s: %s", self.directory, exc)
                return
            for gone in set(self._names) - names:
                self._forget(gone)
            for name in names - set(self._names):
                self._names[name] = self._read_header(name)
                entry = self._names[name]
                if entry is not None:
                    key, n, group = entry
                    self._keys.add(key)
                    self._lengths.setdefault(group, set()).add(n)

    def _read_header(self, name: str) -> tuple[bytes, int, bytes] | None:
        path = self.directory / name
        try:
            parsed = kvcfile.read_header(path)
        except kvc.CorruptRow as exc:
            self.files._discard(path, exc.reason, exc)
            return None
        except OSError:
            return None
        m = parsed.meta
        key = key_from_parts(m.fingerprint, m.quant, m.ctx_params_hash, m.namespace, m.tokens)
        if name != publish.row_path(self.directory, key).name:
            self.files._discard(path, "key_mismatch", f"{name} holds the row of {key.hex()}")
            return None
        return key, m.n_tokens, group_of(KeyMeta(m.fingerprint, m.quant, m.ctx_params_hash, m.namespace))

    def _forget(self, name: str) -> None:
        entry = self._names.pop(name, None)
        if entry is not None:
            self._keys.discard(entry[0])  # lengths stay: a stale length only costs a probe

    def publish(self, key: bytes, parts: RowParts) -> None:
        """Write the row here (crash-safe; a row another node published first is adopted)."""
        self.files.put(key, parts)

    def best(self, meta: KeyMeta, tokens: Sequence[int], longer_than: int) -> tuple[int, bytes] | None:
        """The longest row here that is a prefix of ``tokens`` with more than
        ``longer_than`` tokens, as ``(tokens, key)``."""
        self.refresh()
        with self._lock:  # another model's lookup may be listing the directory
            lengths = [n for n in self._lengths.get(group_of(meta), ()) if longer_than < n <= len(tokens)]
        if not lengths:
            return None
        for n, key in prefix_keys(meta, tokens, lengths):
            if key in self._keys:
                return n, key
        return None

    def parts(self, key: bytes) -> RowParts:
        """The row of ``key``, fully verified (a corrupt file is deleted and raises
        ``kvc.CorruptRow``; a vanished one ``FileNotFoundError``)."""
        try:
            return self.files.parts(key)
        except (kvc.CorruptRow, FileNotFoundError):
            with self._lock:
                self._forget(publish.row_path(self.directory, key).name)
            raise

    def path(self, key: bytes) -> Path:
        """The shared file of ``key``."""
        return self.files.path(key)
