"""The life of one backend worker process: its start, its output, its end.

:class:`WorkerProcess` starts ``python -m erllama.backend.worker`` with ``subprocess.Popen``
(fork+exec, safe in a threaded host) and the descriptors it inherits, drains its stdout and
stderr into a short tail, and records how it ended: reaped after its channel broke
(:meth:`~WorkerProcess.reap`) or stopped on purpose (:meth:`~WorkerProcess.stop`). It knows
nothing of what travels on the channels (:mod:`erllama.backend.rpc`).
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import sys
import threading

from erllama.backend.child import child_env, telling_line

__all__ = ["WorkerProcess"]

# the worker's output keeps the logger name users were told to enable (docs/internals/isolation.md)
logger = logging.getLogger("erllama.backend.process")

_TAIL_LINES = 40


def _signal_name(returncode: int | None) -> str | None:
    if returncode is None or returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


class WorkerProcess:
    """A started worker process (``args`` after ``-m erllama.backend.worker``, ``pass_fds``
    inherited). ``pid`` is its process id; once it is gone, ``exit_signal`` (a signal name or
    None), ``exitcode`` (the exit status, None when killed by a signal) and ``how`` (those two
    in words) say how it ended. ``tail`` holds its last lines of output."""

    def __init__(self, args: list[str], pass_fds: tuple[int, ...]) -> None:
        self.exit_signal: str | None = None
        self.exitcode: int | None = None
        self.how = ""
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        err_r, err_w = os.pipe()
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "erllama.backend.worker", *args],
                                          pass_fds=pass_fds, stdin=subprocess.DEVNULL, stdout=err_w,
                                          stderr=err_w, env=child_env())
        except BaseException:
            os.close(err_r)
            raise
        finally:
            os.close(err_w)
        self.pid = self._proc.pid
        self._drain = threading.Thread(target=self._read_output, args=(err_r,), daemon=True,
                                       name=f"erllama-worker-{self.pid}-stderr")
        self._drain.start()

    def _read_output(self, fd: int) -> None:
        with open(fd, "rb") as f:
            for raw in f:
                line = raw.decode("utf-8", "replace").rstrip()
                if line:
                    self.tail.append(line)
                    logger.debug("worker %d: %s", self.pid, line)

    def last_line(self) -> str | None:
        """The line of its output that best names a failure (see ``child.telling_line``)."""
        return telling_line(list(self.tail))

    def kill(self) -> None:
        """SIGKILL it (a channel out of step cannot be used again); :meth:`reap` follows."""
        self._proc.kill()

    def reap(self, timeout: float = 5.0) -> None:
        """Its channel broke: make sure it is gone (killed after ``timeout``), reap it, record
        how it ended."""
        proc = self._proc
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # alive but the channel is unusable: end it
            proc.kill()
            proc.wait()
        self.exit_signal = _signal_name(proc.returncode)
        self.exitcode = proc.returncode if proc.returncode >= 0 else None
        self.how = f"was killed by {self.exit_signal}" if self.exit_signal else f"exited with status {self.exitcode}"
        self._drain.join(timeout=2)

    def stop(self, timeout: float) -> None:
        """Wait ``timeout`` for it to exit (it was asked to), then SIGTERM, then SIGKILL after
        2 s each; reap it and record how it ended, keeping what :meth:`reap` recorded."""
        proc = self._proc
        for stop in (None, proc.terminate, proc.kill):
            if stop is not None:
                stop()
            try:
                proc.wait(timeout=timeout if stop is None else 2.0)
                break
            except subprocess.TimeoutExpired:
                continue
        if proc.returncode is None:
            proc.wait()
        self.exit_signal = self.exit_signal or _signal_name(proc.returncode)
        if self.exitcode is None and proc.returncode >= 0:
            self.exitcode = proc.returncode
        self._drain.join(timeout=2)
