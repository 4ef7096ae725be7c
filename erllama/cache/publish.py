"""The file half of the crash-safe publish protocol (SPEC 4.5, steps 4 and 6).

A row becomes visible only through ``link(2)`` of a fully written, fdatasync'ed temporary
file onto its final name, followed by an fsync of the directory. A crash at any point
leaves either no final file, or a complete one: never a partial row under a final name.
Temporary files are swept at startup. The reservation bookkeeping around these steps
belongs to the meta server.

Fault injection: when ``ERLLAMA_FAULT_STAGE`` names a stage (see :data:`STAGES`), the
process SIGKILLs itself on reaching it, so tests can crash a real child process at each
step of the protocol.
"""

from __future__ import annotations

import errno
import os
import signal
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from erllama import errors, private

__all__ = ["STAGES", "PublishError", "fsync_dir", "publish", "row_path", "sweep_tmp", "write_tmp"]

STAGES = ("tmp_opened", "tmp_half_written", "tmp_written", "tmp_synced", "linked", "dir_synced")

ROW_SUFFIX = ".kvc"
TMP_SUFFIX = ".tmp"


class PublishError(errors.CacheError):
    """Writing or publishing a row failed; nothing partial is visible. ``errno`` when an OS
    error caused it."""

    def __init__(self, message: str, err: int | None = None) -> None:
        super().__init__(message)
        self.errno = err


def _fault(stage: str) -> None:
    if os.environ.get("ERLLAMA_FAULT_STAGE") == stage:
        os.kill(os.getpid(), signal.SIGKILL)


def row_path(directory: Path, key: bytes) -> Path:
    """The final file name of the row with ``key`` in ``directory``."""
    return directory / (key.hex() + ROW_SUFFIX)


def fsync_dir(directory: Path) -> None:
    """Make the directory's entries (a new link, an unlink) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tmp(directory: Path, key: bytes, parts: Sequence[bytes | bytearray | memoryview]) -> Path:
    """Write ``parts`` in order to a new temporary file next to the row's final name,
    fdatasync it and return its path. On any error the temporary file is removed and
    :class:`PublishError` is raised."""
    tmp = directory / f"{key.hex()}{ROW_SUFFIX}.{os.getpid()}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"
    try:
        fd = private.create_private(tmp)
    except OSError as exc:
        raise PublishError(f"cannot create {tmp}: {exc.strerror}", exc.errno) from exc
    try:
        _fault("tmp_opened")
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        total = sum(len(v) for v in views)
        written = 0
        for i, view in enumerate(views):
            while view:
                n = os.write(fd, view)
                view = view[n:]
                written += n
            if i == 0 and len(views) > 1:
                _fault("tmp_half_written")
        if written != total:
            raise PublishError(f"short write to {tmp}: {written} of {total} bytes")
        _fault("tmp_written")
        os.fdatasync(fd)
        _fault("tmp_synced")
    except OSError as exc:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise PublishError(f"cannot write {tmp}: {exc.strerror}", exc.errno) from exc
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def publish(tmp: Path, final: Path, is_valid: Callable[[Path], bool]) -> str:
    """Link ``tmp`` onto ``final`` and make it durable; returns ``"linked"`` or ``"adopted"``.

    An existing ``final`` (another writer, or a crash after link) is validated with
    ``is_valid``: kept ("adopted") if valid, replaced once if not. The temporary file is
    always removed. A linked file that does not validate is removed and
    :class:`PublishError` raised.
    """
    directory = final.parent
    try:
        for attempt in (1, 2):
            try:
                os.link(tmp, final)
            except FileExistsError:
                if is_valid(final):
                    fsync_dir(directory)
                    return "adopted"
                if attempt == 2:
                    raise PublishError(f"{final} keeps reappearing invalid", errno.EEXIST) from None
                final.unlink(missing_ok=True)
                continue
            except OSError as exc:
                raise PublishError(f"cannot link {tmp} to {final}: {exc.strerror}", exc.errno) from exc
            _fault("linked")
            fsync_dir(directory)
            _fault("dir_synced")
            # drop the second name before the read-back: unlinking it changes the file's
            # ctime, which would void the identity the read-back records (tiers.FileTier)
            tmp.unlink(missing_ok=True)
            if not is_valid(final):
                final.unlink(missing_ok=True)
                raise PublishError(f"{final} does not read back valid after publishing")
            return "linked"
        raise AssertionError("unreachable")
    finally:
        tmp.unlink(missing_ok=True)


def sweep_tmp(directory: Path) -> int:
    """Remove every temporary file in ``directory`` (at startup: their writers are gone)."""
    n = 0
    for p in directory.glob(f"*{ROW_SUFFIX}.*{TMP_SUFFIX}"):
        try:
            p.unlink()
            n += 1
        except FileNotFoundError:
            pass
    return n
