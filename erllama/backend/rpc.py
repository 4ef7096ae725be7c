"""Calling a backend that lives in another process: the channels and the call proxy.

:class:`Channel` is the host's end of the two sockets a worker inherits: the call channel
(one :mod:`erllama.backend.wire` frame out, one back, strictly one call at a time; a reply may
carry descriptors) and the control channel (``wire.CONTROL`` records: abort generations and
forgotten states, sent from any thread so they never interleave with a call in flight).

:class:`RemoteBackend` implements ``backend.protocol.Backend`` with one call per method over
a channel and a :class:`~erllama.backend.shared.SharedState`. Costs are kept off the
per-token path: KV states and logits travel through the shared memory (the frame carries only
their length), and the first sample of a token also brings its piece and end-of-generation
flag (both pure functions of the token, cached here). It does not know how its worker was
started; a subclass (``process.ProcessBackend``) says what a broken channel means.
"""

from __future__ import annotations

import mmap
import os
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from erllama import errors
from erllama.backend import wire
from erllama.backend.shared import SharedState

__all__ = ["Channel", "RemoteBackend", "RemoteHandle"]


@dataclass(frozen=True)
class RemoteHandle:
    """A sampler or adapter living in the worker, named by an id the worker maps to it."""

    kind: str
    id: int
    path: str | None = None


class Channel:
    """The host's ends of a worker's call and control sockets (:attr:`child_fds` are the
    worker's, closed here by :meth:`close_child_ends` once it inherited them).

    :attr:`lock` serializes calls (and the use of the shared call buffer that goes with
    them); :attr:`gone` is why calls fail: None while the worker serves them, else
    ``"died"`` or ``"closed"``."""

    def __init__(self) -> None:
        self.sock, self._child_sock = socket.socketpair()
        self._ctl, self._child_ctl = socket.socketpair()
        self._reader = wire.FrameReader(self.sock, fds=True)
        self.lock = threading.RLock()  # one call at a time on the call channel and the memfd
        self._ctl_lock = threading.Lock()
        self.abort_gen = 0
        self.gone: str | None = None

    @property
    def child_fds(self) -> tuple[int, int]:
        """The worker's ends: the call channel and the control channel."""
        return self._child_sock.fileno(), self._child_ctl.fileno()

    def close_child_ends(self) -> None:
        """Close the worker's ends here (it holds its own copies once started)."""
        self._child_sock.close()
        self._child_ctl.close()

    def exchange(self, frame: bytes) -> Any:
        """Send one request frame and read its reply (under :attr:`lock`); ``OSError`` or
        ``EOFError`` when the channel breaks."""
        self.sock.sendall(frame)
        return self._reader.read()

    def take_fd(self) -> int | None:
        """The next descriptor the last reply carried (the caller closes it), else None."""
        return self._reader.fds.pop(0) if self._reader.fds else None

    def drop_fds(self) -> None:
        """Close descriptors nobody took: they belong to an earlier reply."""
        while self._reader.fds:
            os.close(self._reader.fds.pop())

    def tell(self, records: Callable[[], bytes], wait: bool = True) -> None:
        """Send the control records ``records()`` builds under the control lock, while the
        worker serves calls. Without ``wait``, only when the lock is free (a finalizer may run
        inside the thread that holds it); what is not sent stays for the next call."""
        if not self._ctl_lock.acquire(blocking=wait):
            return
        try:
            data = records()
            if data and self.gone is None:
                try:
                    self._ctl.sendall(data)
                except OSError:
                    pass  # the worker is gone, and its maps with it
        finally:
            self._ctl_lock.release()

    def request_abort(self) -> None:
        """Raise the abort generation and send it (any thread; nothing once the worker is gone)."""
        with self._ctl_lock:
            if self.gone is not None:
                return
            self.abort_gen += 1
            try:
                self._ctl.sendall(wire.CONTROL.pack(b"A", self.abort_gen))
            except OSError:
                pass  # the worker is gone; the call channel reports it

    def abort_generation(self) -> int:
        """The abort generation requested so far."""
        with self._ctl_lock:
            return self.abort_gen

    def hang_up(self, timeout: float) -> None:
        """Ask the worker to exit (a ``close`` call, waiting up to ``timeout``); never raises
        for a broken channel."""
        try:
            self.sock.settimeout(timeout)
            wire.send(self.sock, ["close"])
            self._reader.read()
        except (OSError, EOFError):
            pass

    def close(self) -> None:
        """Close the host's ends and any descriptors received (idempotent)."""
        for s in (self.sock, self._ctl):
            s.close()
        self.drop_fds()


class RemoteBackend:
    """``Backend`` over a :class:`Channel` to a worker at ``path``, sharing ``shared`` with it
    (see the module docstring). A subclass implements :meth:`_broken` and :meth:`_error`."""

    n_vocab: int
    ftype_name: str
    n_ctx_seq: int
    n_seq_max: int
    n_batch: int
    n_embd: int
    resident_seqs: tuple[int, ...] = ()

    def __init__(self, path: str, channel: Channel, shared: SharedState) -> None:
        self.path = path
        self._chan = channel
        self._shared = shared
        self._eog: dict[int, bool] = {}
        self._piece: dict[int, bytes] = {}
        shared.on_forget = self._tell_forgotten

    def _tell_forgotten(self) -> None:
        self._chan.tell(self._shared.forget_records, wait=False)

    def _broken(self, interrupted: bool = False) -> None:
        """The call channel broke (``interrupted``: a call was interrupted mid-way and the
        channel is out of step for good): end the peer, mark the channel gone, release it."""
        raise NotImplementedError

    def _error(self) -> errors.ErllamaError:
        """What a call raises once the channel is gone."""
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        """True while the worker serves calls."""
        return self._chan.gone is None

    def _call(self, *msg: Any) -> Any:
        try:
            frame = wire.pack(list(msg))
        except TypeError as exc:
            raise errors.InvalidParameter(f"{msg[0]}: {exc}") from None
        chan = self._chan
        with chan.lock:
            if chan.gone is not None:
                raise self._error()
            chan.drop_fds()
            if self._shared.forgotten:
                chan.tell(self._shared.forget_records)
            try:
                reply = chan.exchange(frame)
            except (OSError, EOFError):
                self._broken()
                raise self._error() from None
            except BaseException:
                self._broken(interrupted=True)
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
        return self._call("step", rows if isinstance(rows, list) else list(rows), self._chan.abort_gen)

    def logits(self, seq_id: int, out: np.ndarray | None = None) -> np.ndarray:
        """Copy of the last-token logits of ``seq_id`` (through the shared memory)."""
        with self._chan.lock:
            n = self._call("logits", seq_id)
            src = self._shared.floats(n)
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
        with self._chan.lock:
            if self._chan.gone is not None:
                raise self._error()
            n = self._shared.write(arr)
            return self._token(self._call("sample_logits", ident, n // 4))

    def free_sampler(self, sampler: RemoteHandle) -> None:
        """Release a sampler (idempotent; nothing to do once the worker is gone)."""
        if self._chan.gone is None:
            self._call("free_sampler", self._id(sampler, "sampler"))

    def state_get(self, seq_id: int) -> bytes | mmap.mmap:
        """The KV state of ``seq_id``: ``bytes`` copied out of the shared memory, or, from
        ``wire.BLOB_MIN`` bytes on, a read-only ``mmap`` of the memfd the worker wrote it into."""
        with self._chan.lock:
            reply = self._call("state_get", seq_id)
            if type(reply) is int:
                return self._shared.read(reply)
            ident, n = reply
            fd = self._chan.take_fd()
            if fd is None:
                raise errors.StateError(f"the worker sent saved state {ident} of seq {seq_id} without its memory")
            return self._shared.adopt(fd, n, ident)

    def state_set(self, seq_id: int, data: Any) -> int:
        """Restore a state into ``seq_id``; the positions restored. A state this worker
        saved is named by its id; anything else is copied through the shared memory."""
        try:
            view = memoryview(data)
        except TypeError:
            raise errors.StateError(f"state data must be a bytes-like object, got {type(data).__name__}") from None
        with view, self._chan.lock:
            saved = self._shared.saved(view)
            if saved is not None:
                return self._call("state_set_saved", seq_id, saved[0], saved[1], view.nbytes)
            if self._chan.gone is not None:
                raise self._error()
            n = self._shared.write(view)
            return self._call("state_set", seq_id, n)

    def seq_clear(self, seq_id: int) -> None:
        """Empty ``seq_id``."""
        self._call("seq_clear", seq_id)

    def n_past(self, seq_id: int) -> int:
        """Positions ``seq_id`` holds."""
        return self._call("n_past", seq_id)

    def seq_copy(self, src: int, dst: int) -> int:
        """Share ``src``'s cells with ``dst``."""
        return self._call("seq_copy", src, dst)

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
        if self._chan.gone is None:
            self._call("free_adapter", self._id(adapter, "adapter"))

    def request_abort(self) -> None:
        """Interrupt the running decode (any thread; on the control channel, so it never
        interleaves with the call in flight). Nothing to do once the worker is gone."""
        self._chan.request_abort()

    def clear_abort(self) -> None:
        """Let decodes run again (covers every abort requested before this call)."""
        self._call("clear_abort", self._chan.abort_generation())
