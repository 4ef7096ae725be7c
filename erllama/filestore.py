"""Small JSON records kept in the cache directory, keyed by a file's identity (the
fingerprint and probe caches). Writes are atomic (a unique temporary name, then
``os.replace``), so a reader sees an old or a new file, never half of one."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

__all__ = ["file_identity", "read_json", "write_json"]


def file_identity(path: str | os.PathLike[str]) -> str:
    """``size|mtime_ns|inode``: changes when the file is replaced or rewritten."""
    st = os.stat(path)
    return f"{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def read_json(store: Path) -> dict[str, Any]:
    """The dict stored in ``store`` (empty when missing, unreadable or not a dict)."""
    try:
        data = json.loads(store.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(store: Path, data: dict[str, Any]) -> None:
    """Replace ``store`` with ``data`` atomically."""
    store.parent.mkdir(parents=True, exist_ok=True)
    tmp = store.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, store)
