"""Paths that are this user's alone: the cache's directories, row files, temporaries and
locks (``docs/internals/security.md``).

A cached row holds the prompt's tokens next to its KV state, so other local users must not
read it, and a row they could plant would be restored as an exact hit. Every directory the
cache uses goes through :func:`private_dir` (created ``0700``; an existing one must be a
real directory owned by this user and writable by nobody else, under parents nobody else
can rename it in), every file it reads or rewrites through :func:`open_private` (never a
symbolic link, a FIFO or another user's file), and files are created ``0600`` with
``O_EXCL``. A path owned by this user that is merely readable by others (from an older
erllama) is tightened; anything that belongs to someone else is refused, never changed.

A leaf of the package: standard library and :mod:`erllama.errors` only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
from pathlib import Path

from erllama import errors

__all__ = ["DirLock", "create_private", "open_private", "private_dir"]

logger = logging.getLogger("erllama.cache")

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def _owner(uid: int) -> str:
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _writable_by_others(mode: int) -> str | None:
    who = [w for bit, w in ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "every user")) if mode & bit]
    return " and ".join(who) or None


def _check_parents(path: Path, what: str) -> None:
    """Nobody but this user or root can rename or replace ``path``: every parent (of its
    real path) is owned by one of them and, when writable by others, sticky (``/tmp``,
    ``/dev/shm``)."""
    me = os.geteuid()
    real = Path(os.path.realpath(path.parent))
    for parent in (real, *real.parents):
        st = os.stat(parent)
        if st.st_uid not in (0, me):
            raise errors.NotPrivate(
                f"{what} {path}: its parent {parent} is owned by {_owner(st.st_uid)}, who could replace it; "
                f"use a directory under one owned by you or root")
        others = _writable_by_others(st.st_mode)
        if others and not st.st_mode & stat.S_ISVTX:
            raise errors.NotPrivate(
                f"{what} {path}: its parent {parent} is writable by {others} (mode {stat.S_IMODE(st.st_mode):#o}) "
                f"without the sticky bit, so another user could replace it; use another directory")


def _check_dir(st: os.stat_result, path: Path, what: str) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise errors.NotPrivate(f"{what} {path} is a symbolic link (to {os.readlink(path)!r}); "
                                f"erllama uses only real directories: give the real path")
    if not stat.S_ISDIR(st.st_mode):
        raise errors.NotPrivate(f"{what} {path} exists and is not a directory")
    if st.st_uid != os.geteuid():
        raise errors.NotPrivate(
            f"{what} {path} is owned by {_owner(st.st_uid)}, not by this user ({_owner(os.geteuid())}): "
            f"it may hold rows planted by its owner; erllama will not use it (remove it, or choose another path)")
    mode = stat.S_IMODE(st.st_mode)
    others = _writable_by_others(mode)
    if others:
        raise errors.NotPrivate(
            f"{what} {path} is writable by {others} (mode {mode:#o}), so its rows could have been planted; "
            f"erllama will not use it: remove it, or check its contents and chmod 700 it")


def private_dir(path: str | os.PathLike[str], what: str = "cache directory") -> Path:
    """Create ``path`` (and missing parents) with mode ``0700``, or check the existing one:
    a directory, not a symbolic link, owned by this user, writable by nobody else, under
    parents nobody else can rename it in. Returns it; raises :class:`errors.NotPrivate`
    naming the path and the problem. An own directory readable by others is tightened to
    ``0700``; nothing that belongs to another user is changed."""
    path = Path(path)
    missing = []
    p = path
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another thread or process made it first
            os.mkdir(p, 0o700)
    try:
        _check_dir(os.lstat(path), path, what)  # first without opening: another user's 0700 cannot be opened
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)
    except errors.NotPrivate:
        raise
    except OSError as exc:
        raise errors.NotPrivate(f"{what} {path} cannot be opened: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        _check_dir(st, path, what)  # what was opened is what was checked
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            os.fchmod(fd, 0o700)
            logger.warning("%s %s was readable by others (mode %#o); now 0700", what, path, mode)
    finally:
        os.close(fd)
    _check_parents(path, what)
    return path


def open_private(path: str | os.PathLike[str], flags: int = os.O_RDONLY) -> int:
    """Open an existing file of this user's: never through a symbolic link, never a FIFO,
    device or directory, never another user's file (:class:`errors.NotPrivate`, which is
    also a ``PermissionError``). A file readable by others is tightened to ``0600``.
    Returns the descriptor (close-on-exec); ``FileNotFoundError`` when it is missing."""
    try:
        fd = os.open(path, flags | _NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the last component is a symbolic link
            raise errors.NotPrivate(f"{os.fsdecode(path)} is a symbolic link; refused") from None
        if exc.errno in (errno.EACCES, errno.EPERM):  # another user's file we may not even open
            try:
                uid = os.lstat(path).st_uid
            except OSError:
                raise exc from None
            if uid != os.geteuid():
                raise errors.NotPrivate(f"{os.fsdecode(path)} is owned by {_owner(uid)}, "
                                        f"not by this user; refused") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise errors.NotPrivate(f"{os.fsdecode(path)} is not a regular file (mode {st.st_mode:#o}); refused")
        if st.st_uid != os.geteuid():
            raise errors.NotPrivate(f"{os.fsdecode(path)} is owned by {_owner(st.st_uid)}, "
                                    f"not by this user; refused")
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o600)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_private(path: str | os.PathLike[str], flags: int = os.O_WRONLY) -> int:
    """Create a new file readable and writable by this user only (``0600``, ``O_EXCL``: an
    existing file or a symbolic link at ``path`` raises ``FileExistsError``)."""
    return os.open(path, flags | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)


class DirLock:
    """An exclusive ``flock`` on ``<directory>/.lock`` held while an application uses the
    directory, so a second application on it is refused (:class:`errors.CacheInUse`
    naming the holder's pid) instead of counting, evicting and rebuilding the first one's
    rows. The kernel drops the lock when the holder exits, SIGKILL included; the file
    (``0600``, the holder's pid) stays."""

    NAME = ".lock"

    def __init__(self, directory: str | os.PathLike[str], what: str = "cache directory") -> None:
        self.path = Path(directory) / self.NAME
        try:
            fd = create_private(self.path, os.O_RDWR)
        except FileExistsError:
            fd = open_private(self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise errors.CacheInUse(
                f"{what} {directory} is in use by another erllama application (pid {holder}); "
                f"applications cannot share a cache tier: give each its own cache_dir (and ram_file_dir)") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
