"""The writer pool: supervised worker actors that do the cache's file work.

A save runs at once when a worker is free, else waits in a short queue bounded by jobs and
bytes; beyond that it is refused, not blocked (the caller counts it in
``saves_dropped``): decode must never wait for disk. Evict and shutdown saves, whose
callers wait for the result anyway, are always queued.

The workers are :class:`WriterWorker` actors under their own supervisor
(:meth:`WriterPool.child_spec`, a child of the cache supervisor). The pool object outlives
them: a worker that exits is replaced by its supervisor and announces itself to the pool
when it starts. A job handed to a worker that exits before running it fails with
``errors.CacheError`` (its save reserved nothing yet); a job it was running has finished
(a Python thread is never interrupted mid-job), so nothing is ever half-published.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pykka

import supervision
from erllama import errors

__all__ = ["WriterPool", "WriterWorker"]

T = TypeVar("T")


@dataclass(eq=False)
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    nbytes: int
    fut: Future[Any] = field(default_factory=Future)


class WriterWorker(supervision.Actor):
    """Runs the pool's jobs one at a time, in its own thread."""

    def __init__(self, pool: WriterPool, index: int) -> None:
        super().__init__()
        self._pool = pool
        self._index = index

    def on_start(self) -> None:
        """Tell the pool this worker (or its replacement) takes jobs."""
        self._pool._free(self._index, self.actor_ref)

    def on_receive(self, message: Any) -> Any:
        """Run one job, then ask the pool for the next."""
        if not isinstance(message, _Job):
            return None
        self._pool._started(message)
        try:
            result = message.fn(*message.args)
        except Exception as exc:
            message.fut.set_exception(exc)
        else:
            message.fut.set_result(result)
        self._pool._free(self._index, self.actor_ref)
        return None

    def on_undelivered(self, message: Any) -> None:
        """A job handed to this worker as it exited: it never ran, and fails cleanly."""
        if isinstance(message, _Job):
            self._pool._started(message)
            message.fut.set_exception(errors.CacheError(
                f"writer worker {self._index} exited before the job ran; nothing was written"))


class WriterPool:
    """``max_concurrent`` workers; up to ``queue`` more jobs holding at most
    ``queue_bytes`` bytes wait for one; :meth:`try_submit` refuses beyond that.

    Until the workers run (:meth:`child_spec` started by a supervisor) jobs wait in the
    queue."""

    def __init__(self, max_concurrent: int, *, queue: int = 0, queue_bytes: int = 0, name: str = "writer") -> None:
        for what, v, low in (("max_concurrent", max_concurrent, 1), ("queue", queue, 0),
                             ("queue_bytes", queue_bytes, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                msg = f"{what} must be an int >= {low}, got {v!r}"
                raise ValueError(msg)
        self.max_concurrent = max_concurrent
        self.queue = queue
        self.queue_bytes = queue_bytes
        self.name = name
        self._lock = threading.Condition()
        self._busy = 0  # submitted, not finished
        self._waiting_bytes = 0  # bytes of jobs not started
        self._pending: collections.deque[_Job] = collections.deque()
        self._idle: dict[int, pykka.ActorRef[Any]] = {}
        self._closed = False

    def child_spec(self, *, intensity: int = 10, period: float = 10.0) -> supervision.ChildSpec:
        """The workers' supervisor, as a child of the cache supervisor: a worker that
        exits is replaced (``ONE_FOR_ONE``)."""
        specs = [supervision.ChildSpec(f"worker-{i}", WriterWorker.start, args=(self, i),
                                       shutdown=supervision.INFINITY)
                 for i in range(self.max_concurrent)]
        flags = supervision.SupFlags(supervision.Strategy.ONE_FOR_ONE, intensity=intensity, period=period)
        return supervision.ChildSpec(self.name, lambda: supervision.Supervisor.start(flags, specs),
                                     type=supervision.ChildType.SUPERVISOR, shutdown=supervision.INFINITY)

    @property
    def busy(self) -> int:
        """Jobs running or queued."""
        return self._busy

    def stats(self) -> dict[str, int]:
        """``threads``, ``busy`` (running or queued), ``queued`` and ``queued_bytes`` (not started)."""
        with self._lock:
            return {"threads": self.max_concurrent, "busy": self._busy,
                    "queued": max(0, self._busy - self.max_concurrent), "queued_bytes": self._waiting_bytes}

    def try_submit(self, fn: Callable[..., T], *args: Any, nbytes: int = 0) -> Future[T] | None:
        """Run ``fn(*args)`` on a writer, or return ``None`` when every writer is busy and
        the queue is full (jobs, or ``nbytes`` more than its bytes allow), or the pool is
        shut down."""
        with self._lock:
            if self._closed or (self._busy >= self.max_concurrent and (
                    self._busy - self.max_concurrent >= self.queue or self._waiting_bytes + nbytes > self.queue_bytes)):
                return None
            return self._enqueue(fn, args, nbytes)

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` on a writer, queued behind the jobs before it however many
        there are (the caller waits for its result). Raises ``errors.CacheError`` once the
        pool is shut down."""
        with self._lock:
            if self._closed:
                raise errors.CacheError("the cache writer pool is shut down")
            return self._enqueue(fn, args, 0)

    def _enqueue(self, fn: Callable[..., Any], args: tuple[Any, ...], nbytes: int) -> Future[Any]:
        job = _Job(fn, args, nbytes)
        self._busy += 1
        self._waiting_bytes += nbytes
        job.fut.add_done_callback(self._done)
        self._pending.append(job)
        self._dispatch()
        return job.fut

    def _dispatch(self) -> None:
        """Hand pending jobs to idle workers (under the lock; a tell never blocks)."""
        while self._pending and self._idle:
            index, ref = self._idle.popitem()
            job = self._pending.popleft()
            try:
                ref.tell(job)
            except pykka.ActorDeadError:  # it exited while idle: its replacement will announce itself
                self._pending.appendleft(job)

    def _free(self, index: int, ref: pykka.ActorRef[Any]) -> None:
        with self._lock:
            self._idle[index] = ref
            self._dispatch()

    def _started(self, job: _Job) -> None:
        with self._lock:
            self._waiting_bytes -= job.nbytes
            job.nbytes = 0

    def _done(self, _fut: Future[Any]) -> None:
        with self._lock:
            self._busy -= 1
            self._lock.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no job runs or waits; ``False`` if ``timeout`` passed first."""
        with self._lock:
            return self._lock.wait_for(lambda: self._busy == 0, timeout)

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> None:
        """Refuse new jobs and (when ``wait``) let the queued ones finish; the workers
        themselves stop with their supervisor."""
        with self._lock:
            self._closed = True
        if wait:
            self.wait_idle(timeout)
