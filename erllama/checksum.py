"""CRC32C (Castagnoli), the checksum of the cache's row files.

:func:`crc32c` uses the compiled extension's hardware-accelerated routine when the
extension imports, and a table-driven pure-Python one (correct, slow: about 10 MB/s)
when it does not, so the cache format and everything that only reads or checks rows
works without the compiled module. Both give the same values.
"""

from __future__ import annotations

from typing import Any

__all__ = ["NATIVE", "crc32c", "crc32c_py"]

_POLY = 0x82F63B78  # CRC-32C, reflected


def _table() -> tuple[int, ...]:
    out = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ (_POLY if c & 1 else 0)
        out.append(c)
    return tuple(out)


_TABLE = _table()


def crc32c_py(data: Any, crc: int = 0) -> int:
    """CRC32C of the bytes-like ``data``, continuing from ``crc`` (pure Python)."""
    table = _TABLE
    c = crc ^ 0xFFFFFFFF
    with memoryview(data) as view, view.cast("B") if view.format != "B" or view.ndim != 1 else view as b:
        for byte in b:
            c = table[(c ^ byte) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


try:  # the only importer of the compiled module besides backend/llama.py (tests/test_build.py)
    from erllama._native import crc32c as _native_crc32c
except ImportError:
    _native_crc32c = None  # type: ignore[assignment]

NATIVE: bool = _native_crc32c is not None
"""Whether :func:`crc32c` runs the compiled routine."""


def crc32c(data: Any, crc: int = 0) -> int:
    """CRC32C of the bytes-like ``data``, continuing from ``crc`` (0 to start):
    ``crc32c(b, crc32c(a)) == crc32c(a + b)``."""
    if _native_crc32c is not None:
        return _native_crc32c(data, crc)
    return crc32c_py(data, crc)
