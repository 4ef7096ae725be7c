"""Row files on disk: read a row (or only its prefix) into a reusable buffer, and rewrite
a row's hit count in place.

The format itself, pure and I/O-free, is :mod:`erllama.cache.kvc`, which re-exports these
functions under their old names.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable

from erllama import errors, private
from erllama.cache.kvc import (
    _PAYLOAD_OFFSET_AT,
    _U32,
    _U32_MAX,
    _U64,
    HEADER_SIZE,
    HIT_COUNT_OFFSET,
    CorruptRow,
    KeyFn,
    Parsed,
    Row,
    ensure_capacity,
    parse,
    parse_header,
)

__all__ = ["open_row", "read_header", "read_into", "read_row", "write_hit_count"]

_HEADER_READ = 64 << 10


def open_row(path: str | os.PathLike[str]) -> io.FileIO:
    """Open a row file for reading, unbuffered: only a regular file of this user's, never
    through a symbolic link (else :class:`CorruptRow` ``not_private``, nothing read);
    ``OSError`` such as ``FileNotFoundError`` propagates."""
    try:
        fd = private.open_private(path)
    except errors.NotPrivate as exc:
        raise CorruptRow("not_private", str(exc)) from None
    return io.FileIO(fd, "rb", closefd=True)


def read_into(f: io.RawIOBase, size: int, buffer: bytearray | None = None, *, chunk: int = 0,
              on_chunk: Callable[[int], object] | None = None) -> memoryview:
    """Read up to ``size`` bytes of the open, unbuffered file ``f`` from its current
    position into ``buffer`` (grown in 1 MiB steps when too small; a new one when
    ``None``). Returns a view of the bytes read (fewer at EOF); the caller releases it.
    With ``chunk``, reads at most that many bytes at a time and calls ``on_chunk(n)``
    after each, ``n`` being the bytes read so far."""
    if buffer is None:
        buffer = bytearray(size)
    else:
        ensure_capacity(buffer, size)
    got = 0
    with memoryview(buffer) as whole:
        while got < size:
            n = f.readinto(whole[got:size if chunk <= 0 else min(size, got + chunk)])
            if not n:
                break
            got += n
            if on_chunk is not None:
                on_chunk(got)
        return whole[:got]


def read_row(path: str | os.PathLike[str], *, buffer: bytearray | None = None,
             expected_key: bytes | None = None, key_fn: KeyFn | None = None) -> Row:
    """Read and fully parse the row file at ``path``.

    The file is read with ``readinto`` into ``buffer``, which is grown (in 1 MiB steps)
    only when the file does not fit, so a buffer reused across reads costs no allocation;
    without one a buffer of the file's size is allocated. The row's views point into the
    buffer. ``OSError`` (e.g. ``FileNotFoundError``) propagates; a bad file raises
    :class:`CorruptRow` naming the path.
    """
    with open_row(path) as f:
        view = read_into(f, os.fstat(f.fileno()).st_size, buffer)
    try:
        return parse(view, expected_key=expected_key, key_fn=key_fn)
    except CorruptRow as exc:
        raise exc.with_path(os.fsdecode(path)) from None
    finally:
        view.release()


def read_header(path: str | os.PathLike[str]) -> Parsed:
    """Meta-only parse of the row file at ``path`` (reads only its prefix), checking the
    file size as :func:`parse_header` does. Raises :class:`CorruptRow` or ``OSError``."""
    with open_row(path) as f:
        size = os.fstat(f.fileno()).st_size
        data = os.pread(f.fileno(), min(size, _HEADER_READ), 0)
        if len(data) >= HEADER_SIZE:
            po = _U64.unpack_from(data, _PAYLOAD_OFFSET_AT)[0]
            if len(data) < po <= size:
                data = os.pread(f.fileno(), po, 0)
    try:
        return parse_header(data, file_size=size)
    except CorruptRow as exc:
        raise exc.with_path(os.fsdecode(path)) from None


def write_hit_count(path: str | os.PathLike[str] | int, hits: int) -> bool:
    """Persist ``hits`` (saturated to u32) into the row file's header, in place; best
    effort: returns whether it was written, never raises for I/O errors. The header CRC
    does not cover these bytes, so the row stays valid. ``path`` may be an open file
    descriptor (left open)."""
    if hits < 0:
        raise errors.InvalidParameter(f"hits must be >= 0, got {hits}")
    own = not isinstance(path, int)
    if isinstance(path, int):
        fd = path
    else:
        try:
            fd = private.open_private(path, os.O_WRONLY)
        except OSError:  # NotPrivate included: never write through a link or into another's file
            return False
    try:
        return os.pwrite(fd, _U32.pack(min(hits, _U32_MAX)), HIT_COUNT_OFFSET) == 4
    except OSError:
        return False
    finally:
        if own:
            os.close(fd)
