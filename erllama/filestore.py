"""Small JSON records kept in the cache directory, keyed by a file's identity (the
fingerprint and probe caches). Writes are atomic (a unique temporary name, then
``os.replace``), so a reader sees an old or a new file, never half of one. Both ends are
private (:mod:`erllama.private`): a record is read only from this user's own regular file
(anything else reads as empty, so a planted record is never believed) and written ``0600``
into a private directory (a directory that is not, or any other failure to write, is
logged and skipped: these are caches)."""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Any

from erllama import private

__all__ = ["file_identity", "read_json", "write_json"]

logger = logging.getLogger("erllama")


def file_identity(path: str | os.PathLike[str]) -> str:
    """``size|mtime_ns|inode|ctime_ns``: changes when the file is replaced or rewritten,
    even by someone who sets its mtime back (the kernel sets ctime; nobody but root can
    choose it)."""
    st = os.stat(path)
    return f"{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}"


def read_json(store: Path) -> dict[str, Any]:
    """The dict stored in ``store`` (empty when missing, unreadable, not this user's own
    regular file, or not a dict)."""
    try:
        with open(private.open_private(store), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(store: Path, data: dict[str, Any]) -> None:
    """Replace ``store`` with ``data`` atomically (mode ``0600``)."""
    tmp = store.with_suffix(f".{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        private.private_dir(store.parent)
        with open(private.create_private(tmp), "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, store)
    except OSError as exc:  # NotPrivate included
        tmp.unlink(missing_ok=True)
        logger.warning("not caching %s: %s", store.name, exc)
