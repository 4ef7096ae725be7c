"""A backend that lives in its own worker process (``isolation="process"``).

:class:`ProcessBackend` implements ``backend.protocol.Backend`` by calling a worker
(``python -m erllama.backend.worker``, started with ``subprocess.Popen``: fork+exec, safe
in a threaded host) over a socket of :mod:`erllama.backend.wire` frames. A native abort, a
segfault or an OOM kill takes only the worker down; every call after that raises
:class:`erllama.errors.WorkerDied` (a ``ModelCrashed``) naming the signal, and the model's
supervisor starts a new backend.

Costs are kept off the per-token path: KV states and logits travel through a shared memfd
(the frame carries only their length), the first sample of a token also brings its piece
and end-of-generation flag (both pure functions of the token, cached here), and aborts go
on a second channel so they never interleave with a call in flight.

A saved state of ``wire.BLOB_MIN`` bytes or more comes back as a read-only ``mmap`` of a
memfd the worker wrote and keeps mapped: the cache keeps that object as is, and restoring
it into the same worker sends only its id, so an exact hit from the RAM tier copies
nothing in the host. When the host drops such a state (its ``mmap`` is collected), the
worker is told on the control channel and reuses or frees the memfd.
"""

from __future__ import annotations

import collections
import logging
import mmap
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import erllama
from erllama import errors
from erllama.backend import selfcheck, wire
from erllama.backend.child import telling_line

__all__ = ["ProcessBackend", "RemoteHandle"]

logger = logging.getLogger("erllama.backend.process")

_TAIL_LINES = 40
_ROOT = str(Path(erllama.__file__).resolve().parents[1])


@dataclass(frozen=True)
class RemoteHandle:
    """A sampler or adapter living in the worker, named by an id the worker maps to it."""

    kind: str
    id: int
    path: str | None = None


def _signal_name(returncode: int | None) -> str | None:
    if returncode is None or returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _address(view: memoryview) -> int:
    return np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0]


class ProcessBackend:
    """A backend in a dedicated worker process (see the module docstring).

    ``pid`` is the worker's process id; once it is gone, ``exit_signal`` (a signal name or
    None) and ``exitcode`` (the exit status, None when killed by a signal) say how it ended.
    Construction waits for the worker to load the model: a worker that dies while loading
    raises ``MalformedGGUF`` naming the signal and the last llama.cpp line it printed.
    """

    n_vocab: int
    ftype_name: str
    n_ctx_seq: int
    n_seq_max: int
    n_batch: int
    n_embd: int

    def __init__(self, path: str | os.PathLike[str], config: Any) -> None:
        self.path = os.fspath(path)
        self.config = config
        self.exit_signal: str | None = None
        self.exitcode: int | None = None
        self._lock = threading.RLock()  # one call at a time on the call channel and the memfd
        self._ctl_lock = threading.Lock()
        self._abort_gen = 0
        self._gone: str | None = None  # why calls fail: "died" or "closed"
        self._how = ""
        self._eog: dict[int, bool] = {}
        self._piece: dict[int, bytes] = {}
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._states: dict[int, tuple[weakref.ref[mmap.mmap], int, int]] = {}  # id(map) -> (ref, state id, base)
        self._forget: collections.deque[int] = collections.deque()
        blob = pickle.dumps(config)  # before any resource: an unpicklable config fails cleanly
        self._shm = wire.SharedBuffer.create(f"erllama:{os.path.basename(self.path)}")
        self._chan, chan_child = socket.socketpair()
        self._ctl, ctl_child = socket.socketpair()
        self._reader = wire.FrameReader(self._chan, fds=True)
        err_r, err_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = _ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("GGML_NO_BACKTRACE", "1")  # ggml would run gdb on abort: slow and noisy
        fds = (chan_child.fileno(), ctl_child.fileno(), self._shm.fd)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "erllama.backend.worker", "--chan", str(fds[0]), "--ctl", str(fds[1]),
                 "--shm", str(fds[2])],
                pass_fds=fds, stdin=subprocess.DEVNULL, stdout=err_w, stderr=err_w, env=env)
        except BaseException:
            os.close(err_r)
            self._release_fds()
            raise
        finally:
            os.close(err_w)
            chan_child.close()
            ctl_child.close()
        self.pid = self._proc.pid
        self._drain = threading.Thread(target=self._read_stderr, args=(err_r,), daemon=True,
                                       name=f"erllama-worker-{self.pid}-stderr")
        self._drain.start()
        try:
            self._open(blob)
        except BaseException:
            self.close(timeout=5)
            raise

    # ---- lifetime ---------------------------------------------------------------------------

    def _open(self, blob: bytes) -> None:
        try:
            wire.send(self._chan, ["open", self.path, blob])
            reply = self._reader.read()
        except (OSError, EOFError):
            self._reap()
            line = telling_line(list(self._tail))
            said = f"; llama.cpp said: {line}" if line else ""
            if self.exit_signal is not None:
                # before blaming the file, know that this build decodes a known-good model here
                selfcheck.blame(f"model {self.path!r} (its worker, pid {self.pid})", self.exit_signal, "load")
                raise errors.MalformedGGUF(f"model {self.path!r} killed its worker process (pid {self.pid}) "
                                           f"while loading: {self.exit_signal}{said}") from None
            raise errors.LoadFailed(f"the worker process of model {self.path!r} (pid {self.pid}) "
                                    f"{self._how} while loading{said}") from None
        if reply[0] != 0:
            raise wire.decode_error(*reply[1:])
        for name, value in reply[1].items():
            setattr(self, name, value)

    def _read_stderr(self, fd: int) -> None:
        with open(fd, "rb") as f:
            for raw in f:
                line = raw.decode("utf-8", "replace").rstrip()
                if line:
                    self._tail.append(line)
                    logger.debug("worker %d: %s", self.pid, line)

    def _release_fds(self) -> None:
        for s in (self._chan, self._ctl):
            s.close()
        self._shm.close()
        self._close_received()

    def _close_received(self) -> None:
        while self._reader.fds:
            os.close(self._reader.fds.pop())

    def _reap(self, timeout: float = 5.0) -> None:
        """The channel broke: make sure the worker is gone, reap it, record how it ended."""
        proc = self._proc
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # alive but the channel is unusable: end it
            proc.kill()
            proc.wait()
        self.exit_signal = _signal_name(proc.returncode)
        self.exitcode = proc.returncode if proc.returncode >= 0 else None
        self._how = f"was killed by {self.exit_signal}" if self.exit_signal else f"exited with status {self.exitcode}"
        self._drain.join(timeout=2)
        if self._gone is None:
            self._gone = "died"
            logger.warning("the worker process of model %r (pid %d) %s", self.path, self.pid, self._how)
        self._release_fds()

    def _error(self) -> errors.ErllamaError:
        if self._gone == "closed":
            return errors.Released(f"the worker process of model {self.path!r} was closed")
        line = telling_line(list(self._tail))
        said = f"; its last output: {line}" if line else ""
        return errors.WorkerDied(f"the worker process of model {self.path!r} (pid {self.pid}) {self._how}{said}",
                                 signal=self.exit_signal, exitcode=self.exitcode)

    @property
    def alive(self) -> bool:
        """True while the worker serves calls."""
        return self._gone is None

    def close(self, timeout: float = 10.0) -> None:
        """End the worker cleanly (a ``close`` call, then SIGTERM, then SIGKILL after
        ``timeout``) and reap it. Idempotent; never raises for a dead worker."""
        if self._gone == "closed":
            return
        locked = self._lock.acquire(timeout=timeout)
        try:
            if self._gone == "closed":
                return
            if self._gone is None and locked:
                try:
                    self._chan.settimeout(timeout)
                    wire.send(self._chan, ["close"])
                    self._reader.read()
                except (OSError, EOFError):
                    pass
            self._gone = "closed"
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
            self._release_fds()
        finally:
            if locked:
                self._lock.release()

    # ---- calls ------------------------------------------------------------------------------

    def _call(self, *msg: Any) -> Any:
        try:
            frame = wire.pack(list(msg))
        except TypeError as exc:
            raise errors.InvalidParameter(f"{msg[0]}: {exc}") from None
        with self._lock:
            if self._gone is not None:
                raise self._error()
            self._close_received()  # descriptors nobody took belong to an earlier reply
            if self._forget:
                self._flush_forget()
            try:
                self._chan.sendall(frame)
                reply = self._reader.read()
            except (OSError, EOFError):
                self._reap()
                raise self._error() from None
            except BaseException:  # interrupted mid-call: the channel is out of step for good
                self._proc.kill()
                self._reap()
                raise
        if reply[0] == 0:
            return reply[1]
        raise wire.decode_error(*reply[1:])

    def ping(self) -> None:
        """One empty round trip (to measure the call overhead)."""
        self._call("ping")

    def _token(self, reply: Any) -> int:
        if type(reply) is list:  # first sight of this token: its eog flag and piece came along
            tok, eog, piece = reply
            self._eog[tok] = eog
            self._piece[tok] = piece
            return tok
        return reply

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Text to token ids."""
        return self._call("tokenize", text, add_special, parse_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Token ids to text."""
        return self._call("detokenize", tokens)

    def token_piece(self, token: int) -> bytes:
        """The bytes one token renders as (cached per token)."""
        try:
            return self._piece[token]
        except (KeyError, TypeError):
            pass
        piece = self._call("token_piece", token)
        self._piece[int(token)] = piece
        return piece

    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens (cached per token)."""
        try:
            return self._eog[token]
        except (KeyError, TypeError):
            pass
        eog = self._call("is_eog", token)
        self._eog[int(token)] = eog
        return eog

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], template: str | None = None,
                            add_assistant: bool = True) -> str:
        """Render chat messages with the model's template or a named one."""
        try:
            return self._call("apply_chat_template", messages, template, add_assistant)
        except errors.InvalidParameter as exc:  # not encodable: content that is not text
            raise errors.InvalidContent(str(exc)) from None

    def step(self, rows: Iterable[tuple[Any, ...]]) -> list[int]:
        """One decode of several sequences' rows."""
        # the abort generation rides along: an abort requested before this step must stop it
        # even if the control thread has not read it yet
        return self._call("step", rows if isinstance(rows, list) else list(rows), self._abort_gen)

    def logits(self, seq_id: int, out: np.ndarray | None = None) -> np.ndarray:
        """Copy of the last-token logits of ``seq_id`` (through the shared memory)."""
        with self._lock:
            n = self._call("logits", seq_id)
            src = self._shm.floats(n)
            if out is None:
                return src.copy()
            if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != (n,):
                raise errors.InvalidParameter(f"out must be a float32 array of n_vocab={n} values")
            out[:] = src
            return out

    def new_sampler(self, params: dict[str, Any]) -> RemoteHandle:
        """A sampler chain for one request, living in the worker."""
        return RemoteHandle("sampler", self._call("new_sampler", params))

    def _id(self, handle: Any, kind: str) -> int:
        if not isinstance(handle, RemoteHandle) or handle.kind != kind:
            raise errors.InvalidParameter(f"expected a {kind} of this backend, got {handle!r:.80}")
        return handle.id

    def sample(self, sampler: RemoteHandle, seq_id: int) -> int:
        """Sample the next token of ``seq_id`` from the last step's logits."""
        return self._token(self._call("sample", self._id(sampler, "sampler"), seq_id))

    def sample_logits(self, sampler: RemoteHandle, logits: np.ndarray) -> int:
        """Sample from a stored logits buffer (copied through the shared memory)."""
        ident = self._id(sampler, "sampler")
        arr = np.ascontiguousarray(logits, dtype=np.float32).reshape(-1)
        with self._lock:
            if self._gone is not None:
                raise self._error()
            n = self._shm.write(arr)
            return self._token(self._call("sample_logits", ident, n // 4))

    def free_sampler(self, sampler: RemoteHandle) -> None:
        """Release a sampler (idempotent; nothing to do once the worker is gone)."""
        if self._gone is None:
            self._call("free_sampler", self._id(sampler, "sampler"))

    def state_get(self, seq_id: int) -> bytes | mmap.mmap:
        """The KV state of ``seq_id``: ``bytes`` copied out of the shared memory, or, from
        ``wire.BLOB_MIN`` bytes on, a read-only ``mmap`` of the memfd the worker wrote it into."""
        with self._lock:
            reply = self._call("state_get", seq_id)
            if type(reply) is int:
                self._shm.ensure(reply)
                return self._shm.map[:reply]
            ident, n = reply
            if not self._reader.fds:
                raise errors.StateError(f"the worker sent saved state {ident} of seq {seq_id} without its memory")
            fd = self._reader.fds.pop(0)
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
        """Finalizer of a saved state (runs in any thread, possibly inside a call of this
        one: it never waits for a lock). The worker unmaps it once told."""
        self._states.pop(key, None)
        self._forget.append(ident)
        if self._ctl_lock.acquire(blocking=False):
            try:
                self._send_forget()
            finally:
                self._ctl_lock.release()

    def _flush_forget(self) -> None:
        with self._ctl_lock:
            self._send_forget()

    def _send_forget(self) -> None:
        records = []
        while self._forget:
            records.append(wire.CONTROL.pack(b"F", self._forget.popleft()))
        if records and self._gone is None:
            try:
                self._ctl.sendall(b"".join(records))
            except OSError:
                pass  # the worker is gone, and its maps with it

    def _saved(self, view: memoryview) -> tuple[int, int] | None:
        """``(state id, offset)`` when ``view`` lies in a saved state this worker holds."""
        entry = self._states.get(id(view.obj))
        if entry is None or entry[0]() is not view.obj or not view.c_contiguous or not view.nbytes:
            return None
        return entry[1], _address(view.cast("B")) - entry[2]

    def state_set(self, seq_id: int, data: Any) -> int:
        """Restore a state into ``seq_id``; the positions restored. A state this worker
        saved is named by its id; anything else is copied through the shared memory."""
        try:
            view = memoryview(data)
        except TypeError:
            raise errors.StateError(f"state data must be a bytes-like object, got {type(data).__name__}") from None
        with view, self._lock:
            saved = self._saved(view)
            if saved is not None:
                return self._call("state_set_saved", seq_id, saved[0], saved[1], view.nbytes)
            if self._gone is not None:
                raise self._error()
            n = self._shm.write(view)
            return self._call("state_set", seq_id, n)

    def seq_clear(self, seq_id: int) -> None:
        """Empty ``seq_id``."""
        self._call("seq_clear", seq_id)

    def n_past(self, seq_id: int) -> int:
        """Positions ``seq_id`` holds."""
        return self._call("n_past", seq_id)

    def embed(self, tokens: Sequence[int], normalize: bool = True) -> np.ndarray:
        """The pooled embedding of ``tokens`` (float32, ``(n_embd,)``)."""
        return np.frombuffer(self._call("embed", tokens, normalize), dtype=np.float32).copy()

    def load_adapter(self, path: str) -> RemoteHandle:
        """Load a LoRA adapter in the worker; returns a handle naming it (not yet applied)."""
        path = os.fspath(path)
        return RemoteHandle("adapter", self._call("load_adapter", path), path)

    def set_adapters(self, adapters: Sequence[tuple[RemoteHandle, float]]) -> None:
        """Apply exactly these ``(handle, scale)`` pairs (empty: none)."""
        self._call("set_adapters", [(self._id(h, "adapter"), scale) for h, scale in adapters])

    def free_adapter(self, adapter: RemoteHandle) -> None:
        """Release a loaded adapter (idempotent; nothing to do once the worker is gone)."""
        if self._gone is None:
            self._call("free_adapter", self._id(adapter, "adapter"))

    def request_abort(self) -> None:
        """Interrupt the running decode (any thread; on the control channel, so it never
        interleaves with the call in flight). Nothing to do once the worker is gone."""
        with self._ctl_lock:
            if self._gone is not None:
                return
            self._abort_gen += 1
            try:
                self._ctl.sendall(wire.CONTROL.pack(b"A", self._abort_gen))
            except OSError:
                pass  # the worker is gone; the call channel reports it

    def clear_abort(self) -> None:
        """Let decodes run again (covers every abort requested before this call)."""
        with self._ctl_lock:
            generation = self._abort_gen
        self._call("clear_abort", generation)

    def __repr__(self) -> str:
        state = "alive" if self._gone is None else self._gone
        return f"<ProcessBackend {os.path.basename(self.path)!r} pid={self.pid if hasattr(self, 'pid') else None} {state}>"
