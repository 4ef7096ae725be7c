"""A backend that lives in its own worker process (``isolation="process"``).

:class:`ProcessBackend` implements ``backend.protocol.Backend`` by calling a worker
(``python -m erllama.backend.worker``, started with ``subprocess.Popen``: fork+exec, safe
in a threaded host) over a socket of :mod:`erllama.backend.wire` frames. A native abort, a
segfault or an OOM kill takes only the worker down; every call after that raises
:class:`erllama.errors.WorkerDied` (a ``ModelCrashed``) naming the signal, and the model's
supervisor starts a new backend.

Costs are kept off the per-token path: KV states and logits travel through a shared memfd
(the frame carries only their length), the first sample of a token also brings its piece
and end-of-generation flag (both pure functions of the token, cached in the host), and aborts
go on a second channel so they never interleave with a call in flight.

A saved state of ``wire.BLOB_MIN`` bytes or more comes back as a read-only ``mmap`` of a
memfd the worker wrote and keeps mapped: the cache keeps that object as is, and restoring
it into the same worker sends only its id, so an exact hit from the RAM tier copies
nothing in the host. When the host drops such a state (its ``mmap`` is collected), the
worker is told on the control channel and reuses or frees the memfd.

The pieces, each with one job: :mod:`~erllama.backend.workerproc` (the worker process's
start, output and end), :mod:`~erllama.backend.rpc` (the channels, and the ``Backend`` proxy
with one call per method) and :mod:`~erllama.backend.shared` (the memory shared with the
worker and its lifetime). This module ties them together: the start, the handshake, what a
broken channel means, and the orderly close.
"""

from __future__ import annotations

import logging
import os
import pickle
from typing import Any

from erllama import errors
from erllama.backend import selfcheck, wire
from erllama.backend.rpc import Channel, RemoteBackend, RemoteHandle
from erllama.backend.shared import SharedState
from erllama.backend.workerproc import WorkerProcess

__all__ = ["ProcessBackend", "RemoteHandle"]

logger = logging.getLogger("erllama.backend.process")


class ProcessBackend(RemoteBackend):
    """A backend in a dedicated worker process (see the module docstring).

    ``pid`` is the worker's process id; once it is gone, ``exit_signal`` (a signal name or
    None) and ``exitcode`` (the exit status, None when killed by a signal) say how it ended.
    Construction waits for the worker to load the model: a worker that dies while loading
    raises ``MalformedGGUF`` naming the signal and the last llama.cpp line it printed.
    """

    def __init__(self, path: str | os.PathLike[str], config: Any) -> None:
        path = os.fspath(path)
        self.config = config
        blob = pickle.dumps(config)  # before any resource: an unpicklable config fails cleanly
        shared = SharedState(f"erllama:{os.path.basename(path)}")
        channel = Channel()
        super().__init__(path, channel, shared)
        call_fd, ctl_fd = channel.child_fds
        try:
            self._worker = WorkerProcess(["--chan", str(call_fd), "--ctl", str(ctl_fd), "--shm", str(shared.fd)],
                                         (call_fd, ctl_fd, shared.fd))
        except BaseException:
            self._release()
            raise
        finally:
            channel.close_child_ends()
        self.pid = self._worker.pid
        try:
            self._open(blob)
        except BaseException:
            self.close(timeout=5)
            raise

    @property
    def exit_signal(self) -> str | None:
        """The name of the signal that ended the worker (None while it runs or if it exited)."""
        return self._worker.exit_signal

    @property
    def exitcode(self) -> int | None:
        """The worker's exit status (None while it runs or when a signal killed it)."""
        return self._worker.exitcode

    def _open(self, blob: bytes) -> None:
        """The handshake: the worker loads the model and replies with the backend attributes."""
        try:
            reply = self._chan.exchange(wire.pack(["open", self.path, blob]))
        except (OSError, EOFError):
            self._reap()
            worker = self._worker
            line = worker.last_line()
            said = f"; llama.cpp said: {line}" if line else ""
            if worker.exit_signal is not None:
                # before blaming the file, know that this build decodes a known-good model here
                selfcheck.blame(f"model {self.path!r} (its worker, pid {self.pid})", worker.exit_signal, "load")
                raise errors.MalformedGGUF(f"model {self.path!r} killed its worker process (pid {self.pid}) "
                                           f"while loading: {worker.exit_signal}{said}") from None
            raise errors.LoadFailed(f"the worker process of model {self.path!r} (pid {self.pid}) "
                                    f"{worker.how} while loading{said}") from None
        if reply[0] != 0:
            raise wire.decode_error(*reply[1:])
        for name, value in reply[1].items():
            setattr(self, name, tuple(value) if isinstance(value, list) else value)

    def _release(self) -> None:
        self._chan.close()
        self._shared.close()

    def _reap(self) -> None:
        """The channel broke: make sure the worker is gone, reap it, record how it ended."""
        self._worker.reap()
        if self._chan.gone is None:
            self._chan.gone = "died"
            logger.warning("the worker process of model %r (pid %d) %s", self.path, self.pid, self._worker.how)
        self._release()

    def _broken(self, interrupted: bool = False) -> None:
        if interrupted:  # the channel is out of step for good
            self._worker.kill()
        self._reap()

    def _error(self) -> errors.ErllamaError:
        if self._chan.gone == "closed":
            return errors.Released(f"the worker process of model {self.path!r} was closed")
        line = self._worker.last_line()
        said = f"; its last output: {line}" if line else ""
        return errors.WorkerDied(f"the worker process of model {self.path!r} (pid {self.pid}) "
                                 f"{self._worker.how}{said}", signal=self.exit_signal, exitcode=self.exitcode)

    def close(self, timeout: float = 10.0) -> None:
        """End the worker cleanly (a ``close`` call, then SIGTERM, then SIGKILL after
        ``timeout``) and reap it. Idempotent; never raises for a dead worker."""
        chan = self._chan
        if chan.gone == "closed":
            return
        locked = chan.lock.acquire(timeout=timeout)
        try:
            if chan.gone == "closed":
                return
            if chan.gone is None and locked:
                chan.hang_up(timeout)
            chan.gone = "closed"
            self._worker.stop(timeout)
            self._release()
        finally:
            if locked:
                chan.lock.release()

    def __repr__(self) -> str:
        chan = getattr(self, "_chan", None)  # a constructor that failed early leaves none
        state = "alive" if chan is None or chan.gone is None else chan.gone
        pid = getattr(self, "pid", None)
        return f"<ProcessBackend {os.path.basename(self.path)!r} pid={pid} {state}>"
