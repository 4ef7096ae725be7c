"""The writer pool: a bounded set of threads that do the cache's file work.

A save is refused at once, not queued, when every slot is busy (the caller counts it in
``saves_dropped``): decode must never wait for disk. Evict and shutdown saves wait for
their future instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["WriterPool"]

T = TypeVar("T")


class WriterPool:
    """At most ``max_concurrent`` jobs running or queued; :meth:`try_submit` refuses more."""

    def __init__(self, max_concurrent: int) -> None:
        if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int) or max_concurrent < 1:
            msg = f"max_concurrent must be an int >= 1, got {max_concurrent!r}"
            raise ValueError(msg)
        self.max_concurrent = max_concurrent
        self._pool = ThreadPoolExecutor(max_concurrent, thread_name_prefix="erllama-writer")
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._lock = threading.Condition()
        self._busy = 0

    @property
    def busy(self) -> int:
        """Jobs running or queued."""
        return self._busy

    def try_submit(self, fn: Callable[..., T], *args: Any) -> Future[T] | None:
        """Run ``fn(*args)`` on a writer thread, or return ``None`` when all slots are busy."""
        if not self._slots.acquire(blocking=False):
            return None
        with self._lock:
            self._busy += 1
        try:
            fut = self._pool.submit(fn, *args)
        except BaseException:
            self._release()
            raise
        fut.add_done_callback(lambda _f: self._release())
        return fut

    def submit(self, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> Future[T]:
        """Run ``fn(*args)`` on a writer thread, waiting up to ``timeout`` for a slot.
        Raises ``TimeoutError`` when no slot frees in time."""
        if not self._slots.acquire(timeout=timeout if timeout is not None else -1):
            msg = f"no writer slot within {timeout} s"
            raise TimeoutError(msg)
        with self._lock:
            self._busy += 1
        fut = self._pool.submit(fn, *args)
        fut.add_done_callback(lambda _f: self._release())
        return fut

    def _release(self) -> None:
        with self._lock:
            self._busy -= 1
            self._lock.notify_all()
        self._slots.release()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no job runs or waits; ``False`` if ``timeout`` passed first."""
        with self._lock:
            return self._lock.wait_for(lambda: self._busy == 0, timeout)

    def shutdown(self, wait: bool = True) -> None:
        """Finish queued jobs (when ``wait``) and stop the threads."""
        self._pool.shutdown(wait=wait)
