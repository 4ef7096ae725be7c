"""The worker process of an ``isolation="process"`` model: ``python -m erllama.backend.worker``.

Started by :class:`erllama.backend.process.ProcessBackend` with three inherited file
descriptors: the call channel (a stream socket carrying :mod:`erllama.backend.wire`
frames), the control channel (``wire.CONTROL`` records: abort generations, read by a thread
so that an abort reaches the native flag while the main thread is inside a decode, and the
ids of saved states the host no longer holds) and the shared memfd. A state of at least
``wire.BLOB_MIN`` bytes is written into a memfd of its own (see :class:`SavedStates`),
sent to the host with the reply and kept mapped here, so that restoring it later needs
only its id.
The first frame is ``["open", path, pickled ModelConfig]``; the worker builds the configured
in-process backend (``factory.backend_class(config.backend)``) and replies with its
attributes, then serves one call at a time until ``["close"]`` or the end of the channel.

The worker exits by itself when its host is gone: the control thread sees the channel's
end, or notices that its parent changed (polled every second, for a host whose fork
copied the channel and keeps it open).
"""

from __future__ import annotations

import argparse
import logging
import mmap
import os
import pickle
import resource
import select
import signal
import socket
import sys
import threading
from typing import Any

import numpy as np

from erllama import errors
from erllama.backend import faults, wire

__all__ = ["ATTRIBUTES", "SavedStates", "Server", "main"]

ATTRIBUTES = ("n_vocab", "ftype_name", "n_ctx_seq", "n_seq_max", "n_batch", "n_embd", "resident_seqs")
"""The backend attributes the ready reply carries."""

ORPHAN_EXIT = 3
"""The exit status of a worker that found its host gone."""

SPARE_STATES = 2
"""Memfds of forgotten states kept for reuse."""

_ROUND = 1 << 20


class Attached:
    """A reply value sent with file descriptors (which stay open here)."""

    def __init__(self, value: Any, fds: list[int]) -> None:
        self.value = value
        self.fds = fds


def _native_context(backend: Any) -> Any:
    """The native context of the stock ``LlamaBackend`` (whose ``state_get`` is the context's),
    so that a state can be written straight into shared memory; else None."""
    cls = type(backend)
    if cls.__module__ == "erllama.backend.llama" and cls.__name__ == "LlamaBackend":
        return backend.ctx
    return None


class SavedStates:
    """The memfds holding saved states the host maps, by id.

    Each stays mapped here from its write to its last restore: a new mapping of 12.6 MB
    costs ~3,000 page faults (1.5-5 ms on this VM), more than the copy it saves. For the
    same reason the memfds (and maps) of forgotten states are kept for reuse, sized in
    whole MiB so that a slightly longer state still fits.
    """

    def __init__(self) -> None:
        self.live: dict[int, tuple[int, mmap.mmap]] = {}
        self._spare: list[tuple[int, mmap.mmap]] = []
        self._lock = threading.Lock()  # forget() runs on the control thread
        self._ids = 0

    def new(self, n: int, fill: Any) -> tuple[int, int]:
        """A state of ``n`` bytes written by ``fill``; returns ``(id, fd)``."""
        with self._lock:
            fits = [e for e in self._spare if len(e[1]) >= n]
            entry = min(fits, key=lambda e: len(e[1])) if fits else None
            if entry is not None:
                self._spare.remove(entry)
        if entry is None:
            fd = os.memfd_create("erllama-state", os.MFD_CLOEXEC)
            size = n + -n % _ROUND
            os.ftruncate(fd, size)
            entry = (fd, mmap.mmap(fd, size))
        try:
            with memoryview(entry[1])[:n] as view:
                fill(view)
        except BaseException:
            self._drop(entry)
            raise
        self._ids += 1
        self.live[self._ids] = entry
        return self._ids, entry[0]

    def view(self, ident: int, offset: int, n: int) -> memoryview:
        """Bytes ``[offset, offset + n)`` of state ``ident``."""
        try:
            return memoryview(self.live[ident][1])[offset:offset + n]
        except KeyError:
            raise errors.Released(f"saved state {ident} was forgotten or never existed") from None

    def forget(self, ident: int) -> None:
        """The host dropped state ``ident``: keep its memfd for reuse, or free it."""
        entry = self.live.pop(ident, None)
        if entry is None:
            return
        with self._lock:
            if len(self._spare) < SPARE_STATES:
                self._spare.append(entry)
                return
        self._drop(entry)

    @staticmethod
    def _drop(entry: tuple[int, mmap.mmap]) -> None:
        try:
            entry[1].close()
        except BufferError:  # a view is still alive: the map goes with it
            pass
        os.close(entry[0])


class Server:
    """Maps the frames of the call channel to one backend's methods."""

    def __init__(self, backend: Any, shm: wire.SharedBuffer) -> None:
        self.backend = backend
        self.shm = shm
        self.samplers: dict[int, Any] = {}
        self.adapters: dict[int, Any] = {}
        self.states = SavedStates()
        self._ctx = _native_context(backend)
        self._ids = 0
        self._sent: set[int] = set()  # tokens whose piece and eog flag the host already has
        self._abort_lock = threading.Lock()
        self._cleared = 0  # the last abort generation the host cleared

    def _new_id(self) -> int:
        self._ids += 1
        return self._ids

    def _lookup(self, table: dict[int, Any], ident: int, what: str) -> Any:
        try:
            return table[ident]
        except KeyError:
            raise errors.Released(f"{what} handle {ident} was freed or never existed") from None

    def _token(self, tok: int) -> Any:
        """``tok``, with its eog flag and piece the first time the host sees it."""
        if tok in self._sent:
            return tok
        try:
            extra = [tok, bool(self.backend.is_eog(tok)), bytes(self.backend.token_piece(tok))]
        except errors.ErllamaError:
            return tok
        self._sent.add(tok)
        return extra

    # ---- calls (one method per op; the op name is the method name without the prefix) ----

    def op_ping(self) -> None:
        return None

    def op_tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return self.backend.tokenize(text, add_special, parse_special)

    def op_detokenize(self, tokens: list[int]) -> str:
        return self.backend.detokenize(tokens)

    def op_token_piece(self, tok: int) -> bytes:
        return bytes(self.backend.token_piece(tok))

    def op_is_eog(self, tok: int) -> bool:
        return bool(self.backend.is_eog(tok))

    def op_apply_chat_template(self, messages: Any, template: str | None, add_assistant: bool) -> str:
        return self.backend.apply_chat_template(messages, template, add_assistant)

    def op_step(self, rows: list[list[Any]], abort_generation: int) -> list[int]:
        self.abort(abort_generation)
        return list(self.backend.step([tuple(r) if isinstance(r, list) else r for r in rows]))

    def op_logits(self, seq: int) -> int:
        n = self.backend.n_vocab
        self.backend.logits(seq, self.shm.floats(n))
        return n

    def op_new_sampler(self, params: dict[str, Any]) -> int:
        ident = self._new_id()
        self.samplers[ident] = self.backend.new_sampler(params)
        return ident

    def op_sample(self, sampler: int, seq: int) -> Any:
        return self._token(self.backend.sample(self._lookup(self.samplers, sampler, "sampler"), seq))

    def op_sample_logits(self, sampler: int, n: int) -> Any:
        s = self._lookup(self.samplers, sampler, "sampler")
        return self._token(self.backend.sample_logits(s, self.shm.floats(n)))

    def op_free_sampler(self, sampler: int) -> None:
        s = self.samplers.pop(sampler, None)
        if s is not None:
            self.backend.free_sampler(s)

    def _state(self, seq: int) -> tuple[int, Any]:
        """The size of ``seq``'s state and a function writing it into a buffer of that size."""
        ctx = self._ctx
        if ctx is not None:
            return ctx.state_size(seq), lambda buf: ctx.state_get(seq, buf)
        blob = memoryview(self.backend.state_get(seq)).cast("B")
        return blob.nbytes, lambda buf: buf.__setitem__(slice(None), blob)

    def op_state_get(self, seq: int) -> Any:
        n, fill = self._state(seq)
        if n < wire.BLOB_MIN:
            fill(self.shm.view(n))
            return n
        try:
            ident, fd = self.states.new(n, fill)
        except OSError:  # out of descriptors or memfd space: the shared buffer still works
            fill(self.shm.view(n))
            return n
        return Attached([ident, n], [fd])

    def op_state_set(self, seq: int, n: int) -> int:
        with self.shm.view(n) as view:
            return self.backend.state_set(seq, view)

    def op_state_set_saved(self, seq: int, ident: int, offset: int, n: int) -> int:
        with self.states.view(ident, offset, n) as view:
            return self.backend.state_set(seq, view)

    def op_seq_clear(self, seq: int) -> None:
        self.backend.seq_clear(seq)

    def op_n_past(self, seq: int) -> int:
        return self.backend.n_past(seq)

    def op_seq_copy(self, src: int, dst: int) -> int:
        return self.backend.seq_copy(src, dst)

    def op_embed(self, tokens: list[int], normalize: bool) -> bytes:
        return np.ascontiguousarray(self.backend.embed(tokens, normalize), dtype=np.float32).tobytes()

    def op_load_adapter(self, path: str) -> int:
        ident = self._new_id()
        self.adapters[ident] = self.backend.load_adapter(path)
        return ident

    def op_set_adapters(self, pairs: list[list[Any]]) -> None:
        self.backend.set_adapters([(self._lookup(self.adapters, a, "adapter"), s) for a, s in pairs])

    def op_free_adapter(self, adapter: int) -> None:
        a = self.adapters.pop(adapter, None)
        if a is not None:
            self.backend.free_adapter(a)

    def op_clear_abort(self, generation: int) -> None:
        with self._abort_lock:
            self._cleared = generation
            self.backend.clear_abort()

    # ---- control ----------------------------------------------------------------------------

    def forget(self, ident: int) -> None:
        """The host dropped saved state ``ident``."""
        self.states.forget(ident)

    def abort(self, generation: int) -> None:
        """An abort the host requested; ignored when a later ``clear_abort`` already covers it
        (the two travel on different channels, so a stale abort can arrive after the clear)."""
        with self._abort_lock:
            if generation > self._cleared:
                self.backend.request_abort()

    def close(self) -> None:
        """Free the samplers, the adapters and the backend."""
        for s in self.samplers.values():
            self.backend.free_sampler(s)
        self.samplers.clear()
        self.backend.close()


class _Holder:
    """The server once it exists (aborts that arrive while loading are dropped)."""

    server: Server | None = None


def _watch(ctl: socket.socket, ppid: int, holder: _Holder) -> None:
    """Control thread: feed aborts to the backend, unmap forgotten states; exit the process
    when the host is gone."""
    buf = b""
    while True:
        ready, _, _ = select.select([ctl], [], [], 1.0)
        if os.getppid() != ppid:
            os._exit(ORPHAN_EXIT)
        if not ready:
            continue
        try:
            data = ctl.recv(4096)
        except OSError:
            data = b""
        if not data:
            os._exit(ORPHAN_EXIT)
        buf += data
        while len(buf) >= wire.CONTROL.size:
            kind, value = wire.CONTROL.unpack_from(buf)
            buf = buf[wire.CONTROL.size:]
            server = holder.server
            if server is None:
                continue
            if kind == b"A":
                server.abort(value)
            elif kind == b"F":
                server.forget(value)


def _open(msg: list[Any], shm: wire.SharedBuffer) -> Server:
    from erllama.backend.factory import backend_class

    if not msg or msg[0] != "open":
        raise errors.ErllamaError(f"the first frame must be 'open', got {msg!r:.80}")
    _, path, blob = msg
    config = pickle.loads(blob)
    backend = backend_class(config.backend)(path, config)
    if config.backend == "llama":
        _first_decode(backend)
    return Server(backend, shm)


def _first_decode(backend: Any) -> None:
    """What a probe does, before the worker reports ready: tokenize with BOS, decode, sample
    and decode the sampled token. A file that aborts llama.cpp there kills the worker while
    it loads, so ``load_model`` raises ``MalformedGGUF`` instead of the first request
    finding a dead model."""
    tokens = backend.tokenize("Hello, world", True, False)[: backend.n_batch]
    if not tokens:
        return
    sampler = backend.new_sampler({})
    try:
        faults.crash_point("decode")
        backend.step([(0, tokens, True)])
        backend.step([(0, [backend.sample(sampler, 0)], True)])
    finally:
        backend.free_sampler(sampler)
        backend.seq_clear(0)


def serve(chan: socket.socket, shm: wire.SharedBuffer, holder: _Holder) -> int:
    """Open the backend, then answer calls until ``close`` or the channel's end; the exit status."""
    reader = wire.FrameReader(chan)
    try:
        first = reader.read()
    except EOFError:
        return ORPHAN_EXIT
    try:
        server = _open(first, shm)
    except Exception as exc:
        wire.send(chan, wire.encode_error(exc))
        return 0
    holder.server = server
    backend = server.backend
    wire.send(chan, [0, {name: getattr(backend, name) for name in ATTRIBUTES}])
    ops = {name[3:]: getattr(server, name) for name in dir(server) if name.startswith("op_")}
    while True:
        try:
            msg = reader.read()
        except EOFError:
            return ORPHAN_EXIT
        op = msg[0]
        if op == "close":
            server.close()
            wire.send(chan, [0, None])
            return 0
        fn = ops.get(op)
        fds: list[int] = []
        try:
            if fn is None:
                raise errors.NotSupported(f"the worker has no operation {op!r}")
            result = fn(*msg[1:])
            if isinstance(result, Attached):
                result, fds = result.value, result.fds
            reply = [0, result]
        except Exception as exc:
            reply = wire.encode_error(exc)
        wire.send(chan, reply, fds)


def main(argv: list[str] | None = None) -> None:
    """Entry point: serve the channels given on the command line, then exit."""
    p = argparse.ArgumentParser(prog="python -m erllama.backend.worker", description=__doc__.splitlines()[0])
    p.add_argument("--chan", type=int, required=True, help="fd of the call channel (stream socket)")
    p.add_argument("--ctl", type=int, required=True, help="fd of the control channel (stream socket)")
    p.add_argument("--shm", type=int, required=True, help="fd of the shared memfd")
    args = p.parse_args(argv)
    # every saved state the host holds keeps two descriptors here (ours and the map's)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):  # an unlimited hard limit: keep the soft one
        pass
    # Ctrl-C in a terminal reaches the whole process group: the host decides when we stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(name)s: %(message)s")
    ppid = os.getppid()
    chan = socket.socket(fileno=args.chan)
    ctl = socket.socket(fileno=args.ctl)
    holder = _Holder()
    threading.Thread(target=_watch, args=(ctl, ppid, holder), name="erllama-worker-control", daemon=True).start()
    try:
        status = serve(chan, wire.SharedBuffer(args.shm), holder)
    except OSError:  # the host went away mid-reply
        status = ORPHAN_EXIT
    sys.stderr.flush()
    # skip interpreter teardown: the backend is closed, and the native library's atexit
    # hooks have nothing left to do
    os._exit(status)


if __name__ == "__main__":
    main()
