"""What the host and a backend worker process share: frames, a shared-memory buffer, errors.

A frame is a 4-byte little-endian length and a msgpack body. A request is ``[op, *args]``; a
reply is ``[0, result]`` or ``[1, class name, message, module]``. Payloads too big for a
frame (KV states, logits) travel through one memfd both processes map; the frame carries
only their length (the payload always starts at offset 0: calls are strictly one at a time).
A reply may carry file descriptors (``SCM_RIGHTS``): the memfds of saved states.
"""

from __future__ import annotations

import array
import builtins
import mmap
import os
import socket
import struct
from typing import Any

import msgpack
import numpy as np

from erllama import errors

__all__ = ["BLOB_MIN", "CONTROL", "FrameReader", "SharedBuffer", "decode_error", "encode_error", "pack", "send"]

_HEADER = struct.Struct("<I")
MAX_FRAME = 1 << 30  # a corrupt length would otherwise make the reader wait for ever

BLOB_MIN = 1 << 20
"""States at least this large travel as a memfd of their own that both processes map
read-only, so that a restore from the RAM tier copies nothing in the host."""

CONTROL = struct.Struct("<cQ")
"""A control-channel record: ``b"A"`` + abort generation, or ``b"F"`` + a state id the host forgot."""


def _default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, memoryview | bytearray):
        return bytes(obj)
    raise TypeError(f"cannot send a {type(obj).__name__} to a worker process")


_packer = msgpack.Packer(use_bin_type=True, default=_default, autoreset=True)


def pack(obj: Any) -> bytes:
    """One frame (header and body) holding ``obj``. Not thread-safe: callers serialize."""
    body = _packer.pack(obj)
    return _HEADER.pack(len(body)) + body


def send(sock: socket.socket, obj: Any, fds: list[int] | None = None) -> None:
    """Write one frame, with ``fds`` attached to its first byte."""
    frame = pack(obj)
    if fds:
        sent = sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        frame = frame[sent:]
    if frame:
        sock.sendall(frame)


_MAX_FDS = 4


class FrameReader:
    """Reads frames from a stream socket; :meth:`read` raises ``EOFError`` when the peer is gone.
    With ``fds``, descriptors that arrive with the data are collected in :attr:`fds` (the
    caller takes them: they belong to the frame it just read)."""

    def __init__(self, sock: socket.socket, fds: bool = False) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._anc = socket.CMSG_SPACE(_MAX_FDS * 4) if fds else 0
        self.fds: list[int] = []

    def _recv(self, n: int) -> bytes:
        if not self._anc:
            return self.sock.recv(n)
        data, anc, _flags, _addr = self.sock.recvmsg(n, self._anc)
        for level, kind, blob in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(blob[: len(blob) - len(blob) % 4])
                self.fds.extend(fds)
        return data

    def read(self) -> Any:
        """The next frame's object (blocks)."""
        buf = self._buf
        while True:
            if len(buf) >= 4:
                (n,) = _HEADER.unpack_from(buf)
                if n > MAX_FRAME:
                    raise EOFError(f"corrupt frame length {n}")
                if len(buf) >= 4 + n:
                    body = bytes(buf[4:4 + n])
                    del buf[:4 + n]
                    return msgpack.unpackb(body, raw=False, strict_map_key=False)
                want = 4 + n - len(buf)
            else:
                want = 4 - len(buf)
            chunk = self._recv(max(want, 65536))
            if not chunk:
                raise EOFError("the peer closed the channel")
            buf += chunk


class SharedBuffer:
    """A growable memfd mapped by both processes. Whoever writes a payload makes the file
    large enough first; the reader remaps when its mapping is shorter than the payload."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.map = mmap.mmap(fd, max(os.fstat(fd).st_size, mmap.PAGESIZE))

    @classmethod
    def create(cls, name: str, size: int = 1 << 20) -> SharedBuffer:
        """A new memfd of ``size`` bytes (pages are only allocated when touched)."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return cls(fd)

    def ensure(self, n: int) -> None:
        """Make the mapping cover ``n`` bytes, growing the file (by doubling) if needed."""
        if n <= len(self.map):
            return
        size = os.fstat(self.fd).st_size
        if size < n:
            size = max(n, 2 * size)
            size += -size % mmap.PAGESIZE
            os.ftruncate(self.fd, size)
        # the old mapping is dropped, not closed: arrays viewing it may still be alive
        self.map = mmap.mmap(self.fd, size)

    def write(self, data: Any) -> int:
        """Copy a bytes-like object to offset 0; returns its length."""
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        n = view.nbytes
        self.ensure(n)
        self.map[:n] = view
        return n

    def view(self, n: int) -> memoryview:
        """A writable view of the first ``n`` bytes."""
        self.ensure(n)
        return memoryview(self.map)[:n]

    def floats(self, n: int) -> np.ndarray:
        """The first ``n`` float32 values, as an array viewing the buffer."""
        self.ensure(4 * n)
        return np.frombuffer(self.map, dtype=np.float32, count=n)

    def close(self) -> None:
        """Close the file descriptor (the mapping goes with its last user)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def encode_error(exc: BaseException) -> list[Any]:
    """The error reply for ``exc``."""
    return [1, type(exc).__name__, str(exc), type(exc).__module__]


def decode_error(name: str, message: str, module: str) -> BaseException:
    """The exception a worker raised, as the same class when it is an ``erllama.errors``
    class or a builtin exception, else a ``RuntimeError`` naming the class."""
    cls = getattr(errors, name, None) if module == errors.__name__ else None
    if cls is None and module == "builtins":
        cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception) and cls is not errors.WorkerDied:
        try:
            return cls(message)
        except TypeError:  # a builtin with a different constructor
            pass
    return RuntimeError(f"{module}.{name} in the worker: {message}")
