"""The writer pool: a bounded set of threads that do the cache's file work.

A save runs at once when a thread is free, else waits in a short queue bounded by jobs and
bytes; beyond that it is refused, not blocked (the caller counts it in
``saves_dropped``): decode must never wait for disk. Evict and shutdown saves, whose
callers wait for the result anyway, are always queued.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["WriterPool"]

T = TypeVar("T")


class WriterPool:
    """``max_concurrent`` threads; up to ``queue`` more jobs holding at most
    ``queue_bytes`` bytes wait for one; :meth:`try_submit` refuses beyond that."""

    def __init__(self, max_concurrent: int, *, queue: int = 0, queue_bytes: int = 0) -> None:
        for name, v, low in (("max_concurrent", max_concurrent, 1), ("queue", queue, 0),
                             ("queue_bytes", queue_bytes, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                msg = f"{name} must be an int >= {low}, got {v!r}"
                raise ValueError(msg)
        self.max_concurrent = max_concurrent
        self.queue = queue
        self.queue_bytes = queue_bytes
        self._pool = ThreadPoolExecutor(max_concurrent, thread_name_prefix="erllama-writer")
        self._lock = threading.Condition()
        self._busy = 0  # running or waiting
        self._waiting_bytes = 0

    @property
    def busy(self) -> int:
        """Jobs running or queued."""
        return self._busy

    def stats(self) -> dict[str, int]:
        """``threads``, ``busy`` (running or queued), ``queued`` and ``queued_bytes`` (not started)."""
        with self._lock:
            return {"threads": self.max_concurrent, "busy": self._busy, "queued": max(0, self._busy - self.max_concurrent),
                    "queued_bytes": self._waiting_bytes}

    def try_submit(self, fn: Callable[..., T], *args: Any, nbytes: int = 0) -> Future[T] | None:
        """Run ``fn(*args)`` on a writer thread, or return ``None`` when every thread is
        busy and the queue is full (jobs, or ``nbytes`` more than its bytes allow)."""
        with self._lock:
            if self._busy >= self.max_concurrent and (
                    self._busy - self.max_concurrent >= self.queue or self._waiting_bytes + nbytes > self.queue_bytes):
                return None
            self._enter(nbytes)
        return self._start(fn, args, nbytes)

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` on a writer thread, queued behind the jobs before it however
        many there are (the caller waits for its result)."""
        with self._lock:
            self._enter(0)
        return self._start(fn, args, 0)

    def _enter(self, nbytes: int) -> None:
        self._busy += 1
        self._waiting_bytes += nbytes

    def _start(self, fn: Callable[..., T], args: tuple[Any, ...], nbytes: int) -> Future[T]:
        try:
            fut = self._pool.submit(self._run, fn, args, nbytes)
        except BaseException:
            self._started(nbytes)
            self._release()
            raise
        fut.add_done_callback(lambda _f: self._release())
        return fut

    def _run(self, fn: Callable[..., T], args: tuple[Any, ...], nbytes: int) -> T:
        self._started(nbytes)
        return fn(*args)

    def _started(self, nbytes: int) -> None:
        with self._lock:
            self._waiting_bytes -= nbytes

    def _release(self) -> None:
        with self._lock:
            self._busy -= 1
            self._lock.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no job runs or waits; ``False`` if ``timeout`` passed first."""
        with self._lock:
            return self._lock.wait_for(lambda: self._busy == 0, timeout)

    def shutdown(self, wait: bool = True) -> None:
        """Finish queued jobs (when ``wait``) and stop the threads."""
        self._pool.shutdown(wait=wait)
