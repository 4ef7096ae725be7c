"""The sequences of one model actor: which are free, which are pinned to a sticky session,
and which session is busy serving a request.

A plain object the model actor owns and calls from its own thread (no actor, no lock).
Sticky sessions: a request with a ``session_id`` keeps its sequence when it ends; the
session's next request, when its prompt extends what that sequence holds, prefills only the
new tokens (``cache_hit="sticky"``). Any other prompt drops the pin and takes the cache
path. A session that idles while others wait for a sequence gives its sequence up (least
recently used first): the finish save already holds its state.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass

from erllama import errors
from erllama.backend.protocol import Backend
from erllama.model.request import Request

__all__ = ["SeqPool", "Session"]


@dataclass
class Session:
    """An idle session's pinned sequence, the tokens in its KV, and the cache namespace of
    the request that left them (only a request of the same namespace reuses them)."""

    seq: int
    tokens: list[int]
    last_used: float
    namespace: bytes | None = None


class SeqPool:
    """Free sequences (a heap), pinned sessions, and the sessions serving a request."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        # lowest id first, and each step's rows in id order: llama.cpp batches only
        # consecutive increasing sequence ids into one ubatch (kv_unified=False), so a
        # rotated order splits a 4-row step (measured 41 ms against 33 ms)
        self.free_seqs: list[int] = list(range(backend.n_seq_max))
        self.sessions: dict[str, Session] = {}
        self.session_busy: dict[str, Request] = {}
        self.ending_sessions: set[str] = set()

    def has_room(self) -> bool:
        """Whether a sequence can be had: a free one, or an idle session's."""
        return bool(self.free_seqs or self.sessions)

    def claim(self, req: Request) -> None:
        """Mark ``req``'s session busy (``errors.SessionBusy`` when it serves another)."""
        sid = req.params.session_id
        if sid is None:
            return
        if sid in self.session_busy:
            raise errors.SessionBusy(
                f"session {sid!r} is serving request {self.session_busy[sid].id}; wait for it to end")
        self.session_busy[sid] = req

    def end_session(self, session_id: str) -> None:
        """Unpin a session's sequence; a busy session is unpinned when its request ends."""
        if session_id in self.session_busy:
            self.ending_sessions.add(session_id)
        elif session_id in self.sessions:
            self.drop_session(session_id)

    def drop_session(self, session_id: str) -> None:
        """Unpin an idle session: its sequence is cleared and free again."""
        sess = self.sessions.pop(session_id)
        self.backend.seq_clear(sess.seq)
        heapq.heappush(self.free_seqs, sess.seq)

    def drop_sessions(self) -> None:
        """Unpin every idle session (their KV was computed under the old adapters)."""
        for sid in list(self.sessions):
            self.drop_session(sid)

    def seq_for(self, req: Request) -> int:
        """A sequence for ``req``: its session's, a free one, or the least recently used idle
        session's (the caller checked that one of these exists)."""
        st = req.state
        sid = req.params.session_id
        if sid is not None and (sess := self.sessions.get(sid)) is not None:
            n = len(sess.tokens)
            if 0 < n < len(st.prompt) and st.prompt[:n] == sess.tokens and sess.namespace == req.params.namespace:
                del self.sessions[sid]
                st.context = list(sess.tokens)
                st.cursor = list(st.prompt[n:])
                st.cache_hit, st.cache_read = "sticky", n
                return sess.seq
            self.drop_session(sid)  # diverged (or nothing new to prefill): the cache path
        if not self.free_seqs:
            self.drop_session(min(self.sessions, key=lambda s: self.sessions[s].last_used))
        return heapq.heappop(self.free_seqs)

    def put_back(self, req: Request, keep_session: bool) -> None:
        """The request's sequence is no longer running: pin it to its session, or free it."""
        st = req.state
        sid = req.params.session_id
        if keep_session and sid is not None and sid not in self.ending_sessions and st.context:
            self.sessions[sid] = Session(st.seq_id, list(st.context), time.monotonic(), req.params.namespace)
        else:
            heapq.heappush(self.free_seqs, st.seq_id)
            self.backend.seq_clear(st.seq_id)

    def unclaim(self, req: Request) -> None:
        """``req`` ended: its session is no longer busy (and no longer ending)."""
        sid = req.params.session_id
        if sid is not None and self.session_busy.get(sid) is req:
            del self.session_busy[sid]
            self.ending_sessions.discard(sid)
