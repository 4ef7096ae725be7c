"""The resident tier of one model: hot rows kept as live KV in the context's spare sequences.

A plain object the model actor owns (through ``Saves``) and calls from its own thread. The
tier sits above ``ram``: a row saved from a working sequence is also copied into a spare
sequence, and a later prompt that starts with it is restored by copying that sequence back.
Both copies share KV cells inside the context's one unified stream (``seq_copy``): no bytes
move, so a resident hit costs the same whatever the row's length, on a CPU or a GPU.

Quotas: ``seqs`` spare sequences and ``budget`` tokens (KV cells, reserved in the context at
load: bytes are tokens times the model's KV bytes per token). Least recently used rows leave
first; a row leaving is demoted to the store's tiers when they no longer hold it (its state
is copied out once and written by the writer pool), so evicting never loses a row.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from erllama import errors
from erllama.backend.protocol import Backend
from erllama.cache.key import KeyMeta

__all__ = ["Entry", "Resident"]


@dataclass
class Entry:
    """One resident row: the spare sequence holding it, its tokens and key metadata, the
    logits of its last token (an exact hit samples from them), and the save copying it out
    to the store from a writer thread, if one is running (``copy``)."""

    key: bytes
    seq: int
    tokens: list[int]
    meta: KeyMeta
    logits: np.ndarray | None
    copy: Future[Any] | None = None

    def idle(self) -> bool:
        """No copy-out is reading the row's sequence."""
        return self.copy is None or self.copy.done()


class Resident:
    """The resident rows of one backend's spare sequences, in LRU order."""

    def __init__(self, backend: Backend, seqs: Sequence[int], budget: int,
                 demote: Callable[[Entry], None], count: Callable[[str, int], None]) -> None:
        self.backend = backend
        self.budget = budget
        self.free: list[int] = list(seqs)
        self.entries: OrderedDict[bytes, Entry] = OrderedDict()
        self.tokens = 0
        self._demote = demote
        self._count = count

    def find(self, meta: KeyMeta, prompt: Sequence[int]) -> Entry | None:
        """The longest resident row that ``prompt`` starts with, saved under ``meta``."""
        best = None
        for e in self.entries.values():
            n = len(e.tokens)
            if e.meta == meta and n <= len(prompt) and (best is None or n > len(best.tokens)) \
                    and list(prompt[:n]) == e.tokens:
                best = e
        return best

    def restore(self, entry: Entry, seq: int) -> bool:
        """Make working sequence ``seq`` hold ``entry``'s row; False (the row dropped) when
        the copy did not yield its length."""
        try:
            got = self.backend.seq_copy(entry.seq, seq)
        except errors.ModelCrashed:
            raise
        except errors.ErllamaError:
            got = -1
        if got != len(entry.tokens):
            self.backend.seq_clear(seq)
            self.evict(entry, demote=False)
            return False
        self.entries.move_to_end(entry.key)
        self._count("hits_resident", 1)
        return True

    def keep(self, key: bytes, seq: int, tokens: Sequence[int], meta: KeyMeta,
             logits: np.ndarray | None) -> Entry | None:
        """Copy working sequence ``seq`` (holding exactly ``tokens``) into a spare sequence as
        row ``key``, making room by LRU demotion (rows being copied out stay); returns the
        row, or None when it cannot be kept."""
        n = len(tokens)
        if n == 0 or n > self.budget:
            return None
        if (old := self.entries.get(key)) is not None:
            self.entries.move_to_end(key)
            if old.logits is None and logits is not None:
                old.logits = logits
            return old
        while not self.free or self.tokens + n > self.budget:
            victim = next((e for e in self.entries.values() if e.idle()), None)
            if victim is None:
                return None
            self.evict(victim)
        spare = self.free.pop()
        try:
            got = self.backend.seq_copy(seq, spare)
        except errors.ModelCrashed:
            raise
        except errors.ErllamaError:
            got = -1
        if got != n:
            self.backend.seq_clear(spare)
            self.free.append(spare)
            return None
        entry = self.entries[key] = Entry(key, spare, list(tokens), meta, logits)
        self.tokens += n
        self._count("resident_kept", 1)
        return entry

    def copying(self) -> bool:
        """Whether a copy-out of some row is running."""
        return any(not e.idle() for e in self.entries.values())

    def evict(self, entry: Entry, demote: bool = True) -> None:
        """Remove ``entry`` (demoted first unless ``demote`` is False) and free its sequence;
        the caller checked that no copy-out reads it (:meth:`Entry.idle`)."""
        if self.entries.pop(entry.key, None) is None:
            return
        self.tokens -= len(entry.tokens)
        try:
            if demote:
                self._count("resident_evictions", 1)
                self._demote(entry)
        finally:
            self.backend.seq_clear(entry.seq)
            self.free.append(entry.seq)

    def clear(self, demote: bool = False) -> None:
        """Remove every row that no copy-out is reading."""
        for e in list(self.entries.values()):
            if e.idle():
                self.evict(e, demote=demote)

    def stats(self) -> dict[str, Any]:
        """Rows, tokens held, and the quotas."""
        return {"rows": len(self.entries), "tokens": self.tokens, "budget_tokens": self.budget,
                "seqs": len(self.entries) + len(self.free), "free_seqs": len(self.free)}
