"""Backends for the isolation tests, importable by a worker process (``tests`` on PYTHONPATH)."""

from __future__ import annotations

import threading
from typing import Any

from erllama import errors
from erllama.backend.stub import StubBackend

BLOCK = 258
"""A step whose first row starts with this token blocks until ``request_abort``."""


class BlockingStub(StubBackend):
    """The stub backend, with a step that models a long native decode: it blocks until
    ``request_abort`` is called (from the worker's control thread), then raises ``Aborted``."""

    def __init__(self, path: Any, config: Any) -> None:
        super().__init__(path, config)
        self._woken = threading.Event()

    def step(self, rows: Any) -> list[int]:
        rows = list(rows)
        if rows and list(rows[0][1])[:1] == [BLOCK]:
            if not self._woken.wait(30):
                raise errors.DecodeFailed("nobody aborted the blocking step within 30 s")
        return super().step(rows)

    def request_abort(self) -> None:
        super().request_abort()
        self._woken.set()

    def clear_abort(self) -> None:
        super().clear_abort()
        self._woken.clear()
