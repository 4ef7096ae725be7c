"""The memory a host shares with one backend worker, and how long each piece lives.

Two kinds: the call buffer (a growable memfd both processes map, :class:`wire.SharedBuffer`)
that carries a call's large payload (logits, a state to restore), and saved states of
``wire.BLOB_MIN`` bytes or more, each a read-only ``mmap`` of a memfd the worker wrote and
keeps mapped. The host hands such a map to the cache as is; when the map is collected, its id
is queued to be forgotten and the worker is told (see :class:`SharedState`), so it can reuse
or free the memfd.
"""

from __future__ import annotations

import collections
import mmap
import os
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from erllama.backend import wire

__all__ = ["SharedState"]


def _address(view: memoryview) -> int:
    return np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0]


class SharedState:
    """The call buffer (a memfd named ``name``, passed to the worker as :attr:`fd`) and the
    saved states this host maps, by the worker's state ids.

    :attr:`on_forget` is called (from any thread, possibly inside a call, so it must never
    wait for a lock) when a saved state was collected and its id queued; whoever owns the
    control channel sends :meth:`forget_records` then.
    """

    def __init__(self, name: str) -> None:
        self.buffer = wire.SharedBuffer.create(name)
        self.on_forget: Callable[[], None] = lambda: None
        self._states: dict[int, tuple[weakref.ref[mmap.mmap], int, int]] = {}  # id(map) -> (ref, state id, base)
        self._forget: collections.deque[int] = collections.deque()

    @property
    def fd(self) -> int:
        """The call buffer's descriptor (the worker inherits it)."""
        return self.buffer.fd

    # ---- the call buffer ---------------------------------------------------------------------

    def write(self, data: Any) -> int:
        """Copy a bytes-like object into the call buffer; returns its length."""
        return self.buffer.write(data)

    def read(self, n: int) -> bytes:
        """The first ``n`` bytes of the call buffer, copied."""
        self.buffer.ensure(n)
        return self.buffer.map[:n]

    def floats(self, n: int) -> np.ndarray:
        """The first ``n`` float32 values of the call buffer (a view: copy before the next call)."""
        return self.buffer.floats(n)

    # ---- saved states ------------------------------------------------------------------------

    def adopt(self, fd: int, n: int, ident: int) -> mmap.mmap:
        """Map the ``n`` bytes of the saved state ``ident`` that the worker sent as ``fd``
        (closed here) read-only, and track it until it is collected."""
        try:
            state = mmap.mmap(fd, n, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        with memoryview(state) as view:
            base = _address(view)
        self._states[id(state)] = (weakref.ref(state), ident, base)
        weakref.finalize(state, self._dropped, id(state), ident)
        return state

    def _dropped(self, key: int, ident: int) -> None:
        """Finalizer of a saved state (runs in any thread, possibly inside a call: it never
        waits for a lock). The worker unmaps it once told."""
        self._states.pop(key, None)
        self._forget.append(ident)
        self.on_forget()

    def saved(self, view: memoryview) -> tuple[int, int] | None:
        """``(state id, offset)`` when ``view`` lies in a saved state this worker holds."""
        entry = self._states.get(id(view.obj))
        if entry is None or entry[0]() is not view.obj or not view.c_contiguous or not view.nbytes:
            return None
        return entry[1], _address(view.cast("B")) - entry[2]

    @property
    def forgotten(self) -> bool:
        """True while collected states wait to be told to the worker."""
        return bool(self._forget)

    def forget_records(self) -> bytes:
        """The control records (``wire.CONTROL``) telling the worker every state collected so
        far; the queue is empty afterwards. Call it under the control channel's lock."""
        records = []
        while self._forget:
            records.append(wire.CONTROL.pack(b"F", self._forget.popleft()))
        return b"".join(records)

    def close(self) -> None:
        """Close the call buffer's descriptor (idempotent; maps go with their last user)."""
        self.buffer.close()
