"""Model fingerprints for cache keys: a digest of the GGUF file, remembered per file identity.

``"file"``: SHA-256 of the bytes. ``"gguf_chunked"``: SHA-256 over the SHA-256 of each
64 MiB chunk, hashed on several threads. Digests are remembered in
``<cache dir>/fingerprints.json`` per (mode, real path, size, mtime, inode, ctime), so a file is
hashed once.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from erllama.filestore import file_identity, read_json, write_json

__all__ = ["file_fingerprint", "file_sha256"]

_CHUNK = 64 << 20
_lock = threading.Lock()


def file_sha256(path: str | os.PathLike[str]) -> bytes:
    """SHA-256 of the file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.digest()


def _chunked_digest(path: str, size: int) -> bytes:
    def one(offset: int) -> bytes:
        with open(path, "rb") as f:  # hashlib releases the GIL on large buffers
            f.seek(offset)
            return hashlib.sha256(f.read(_CHUNK)).digest()

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        parts = list(pool.map(one, range(0, max(size, 1), _CHUNK)))
    return hashlib.sha256(b"gguf_chunked\0" + b"".join(parts)).digest()


def file_fingerprint(path: str, mode: str, cache_dir: str | os.PathLike[str]) -> bytes:
    """The fingerprint of the model file ``path`` by ``mode`` (``"file"`` or
    ``"gguf_chunked"``), from ``<cache_dir>/fingerprints.json`` when known."""
    ident = f"{os.path.realpath(path)}|{file_identity(path)}"
    if mode != "file":
        ident = f"{mode}|{ident}"
    store = Path(cache_dir) / "fingerprints.json"
    with _lock:
        known = read_json(store).get(ident)
    if known is not None:
        return bytes.fromhex(known)
    digest = _chunked_digest(path, os.path.getsize(path)) if mode == "gguf_chunked" else file_sha256(path)
    with _lock:  # re-read: another load may have added its own entry meanwhile
        write_json(store, {**read_json(store), ident: digest.hex()})
    return digest
