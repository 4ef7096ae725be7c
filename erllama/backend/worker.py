"""The worker process of an ``isolation="process"`` model: ``python -m erllama.backend.worker``.

Started by :class:`erllama.backend.process.ProcessBackend` with three inherited file
descriptors: the call channel (a stream socket carrying :mod:`erllama.backend.wire`
frames), the control channel (8-byte abort generations, read by a thread so that an abort
reaches the native flag while the main thread is inside a decode) and the shared memfd.
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
import os
import pickle
import select
import signal
import socket
import struct
import sys
import threading
from typing import Any

import numpy as np

from erllama import errors
from erllama.backend import wire

__all__ = ["ATTRIBUTES", "Server", "main"]

ATTRIBUTES = ("n_vocab", "ftype_name", "n_ctx_seq", "n_seq_max", "n_batch", "n_embd")
"""The backend attributes the ready reply carries."""

ORPHAN_EXIT = 3
"""The exit status of a worker that found its host gone."""

_GEN = struct.Struct("<Q")


class Server:
    """Maps the frames of the call channel to one backend's methods."""

    def __init__(self, backend: Any, shm: wire.SharedBuffer) -> None:
        self.backend = backend
        self.shm = shm
        self.samplers: dict[int, Any] = {}
        self.adapters: dict[int, Any] = {}
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

    def op_state_get(self, seq: int) -> int:
        return self.shm.write(self.backend.state_get(seq))

    def op_state_set(self, seq: int, n: int) -> int:
        with self.shm.view(n) as view:
            return self.backend.state_set(seq, view)

    def op_seq_clear(self, seq: int) -> None:
        self.backend.seq_clear(seq)

    def op_n_past(self, seq: int) -> int:
        return self.backend.n_past(seq)

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
    """Control thread: feed aborts to the backend; exit the process when the host is gone."""
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
        while len(buf) >= _GEN.size:
            (generation,) = _GEN.unpack_from(buf)
            buf = buf[_GEN.size:]
            if holder.server is not None:
                holder.server.abort(generation)


def _open(msg: list[Any], shm: wire.SharedBuffer) -> Server:
    from erllama.backend.factory import backend_class

    if not msg or msg[0] != "open":
        raise errors.ErllamaError(f"the first frame must be 'open', got {msg!r:.80}")
    _, path, blob = msg
    config = pickle.loads(blob)
    return Server(backend_class(config.backend)(path, config), shm)


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
        try:
            if fn is None:
                raise errors.NotSupported(f"the worker has no operation {op!r}")
            reply = [0, fn(*msg[1:])]
        except Exception as exc:
            reply = wire.encode_error(exc)
        wire.send(chan, reply)


def main(argv: list[str] | None = None) -> None:
    """Entry point: serve the channels given on the command line, then exit."""
    p = argparse.ArgumentParser(prog="python -m erllama.backend.worker", description=__doc__.splitlines()[0])
    p.add_argument("--chan", type=int, required=True, help="fd of the call channel (stream socket)")
    p.add_argument("--ctl", type=int, required=True, help="fd of the control channel (stream socket)")
    p.add_argument("--shm", type=int, required=True, help="fd of the shared memfd")
    args = p.parse_args(argv)
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
