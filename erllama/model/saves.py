"""The cache I/O of one model actor: restoring a saved row at admission, and the saves.

A plain object the model actor owns and calls from its own thread (no actor of its own).
An admission restores the exact prompt (sampling the first token from the row's stored
logits, no re-decode), or the longest saved prefix (then prefills only the rest); a cold
prompt is saved once prefilled (the whole prompt, and the policy's trimmed prefix), a long
generation gets continued saves, a finished request saves its context. The actor packs the
state (it owns the context) and the writer pool writes it. With the resident tier (in
process), a saved row is first kept in a spare sequence (shared cells, no copy) and a writer
copies the state out of that sequence while the actor goes on decoding: on a GPU, where the
copy is a device-to-host transfer of the whole state, the other sequences do not wait for it.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from erllama import errors
from erllama.backend.protocol import Backend
from erllama.cache import kvc
from erllama.cache.key import KeyMeta, cache_key
from erllama.cache.policy import SavePolicy, cold_save_split, should_continued_save, should_finish_save
from erllama.model.request import Request
from erllama.model.resident import Entry, Resident
from erllama.types import Done

__all__ = ["PARKED_REASONS", "Saves"]

PARKED_REASONS = (kvc.SaveReason.COLD, kvc.SaveReason.CONTINUED, kvc.SaveReason.FINISH)
"""Saves whose row is also kept resident, and then copied out by a writer thread."""

logger = logging.getLogger("erllama.model")


class Saves:
    """Restores and saves for one model's backend, through the cache store ``cache``."""

    def __init__(self, model_id: str, backend: Backend, cache: Any, policy: SavePolicy, tier: str,
                 resident_budget: int = 0) -> None:
        self.model_id = model_id
        self.backend = backend
        self.cache = cache
        self.policy = policy
        self.tier = tier
        seqs = getattr(backend, "resident_seqs", ())
        self.resident = Resident(backend, seqs, resident_budget, self._demote, self.cache.counters.add) \
            if seqs and resident_budget > 0 else None

    def warm(self, req: Request, holder: Any) -> tuple[bytes | None, np.ndarray | None]:
        """Restore the best saved row into the request's sequence, or arm the cold saves.

        Returns the restored row's key (None when cold) and, for an exact hit, the row's
        logits to sample the first token from."""
        st = req.state
        res = self.resident.find(st.key_meta, st.prompt) if self.resident is not None else None
        if res is not None and len(res.tokens) == len(st.prompt) and res.logits is not None:
            hit = None  # an exact resident hit: nothing slower can beat it
        else:
            hit = self.cache.lookup(st.key_meta, st.prompt, parent_key=req.params.parent_key)
        if res is not None and (hit is None or hit.n_tokens <= len(res.tokens)):
            warm = self._warm_resident(req, res)
            if warm is not None:
                return warm
        logits = None
        if hit is not None:
            # verify_late: a disk row's CRC runs while llama copies the KV; nothing restored
            # is used before row.verified() says the bytes are the ones saved
            with self.cache.restore(hit.key, holder=holder, verify_late=True) as row:
                restored = -1
                if row is not None and (row.logits is not None or hit.n_tokens < len(st.prompt)):
                    # an exact hit needs the row's logits: re-decoding would change them
                    try:
                        restored = self.backend.state_set(st.seq_id, row.kv)
                    except errors.StateError as exc:
                        logger.warning("model %s: cached row does not restore: %s", self.model_id, exc)
                    if restored >= 0 and not row.verified():
                        restored = -1  # corrupt: removed and counted by the store
                    if restored == hit.n_tokens:
                        st.cache_tier = row.tier
                    if restored == hit.n_tokens and hit.n_tokens == len(st.prompt):
                        logits = np.frombuffer(row.logits, dtype=np.float32).copy()
            if restored != hit.n_tokens:
                self.backend.seq_clear(st.seq_id)
                self.cache.restore_failed(hit)
                hit = None
        if hit is None:
            st.cache_hit = "cold"
            split = cold_save_split(self.policy, st.prompt)
            if split is not None and len(split[0]) >= self.policy.min_tokens and split[1]:
                st.cursor = list(split[0])
                st.cold_rest = list(split[1])
            return None, None
        st.cache_hit = "exact" if logits is not None else "partial"
        st.cache_read = hit.n_tokens
        st.context = list(st.prompt[: hit.n_tokens])
        st.cursor = list(st.prompt[hit.n_tokens:])
        return hit.key, logits

    def _warm_resident(self, req: Request, res: Entry) -> tuple[bytes, np.ndarray | None] | None:
        """Restore ``res`` into the request's sequence; None when it could not be."""
        assert self.resident is not None
        st, n = req.state, len(res.tokens)
        exact = n == len(st.prompt)
        if (exact and res.logits is None) or not self.resident.restore(res, st.seq_id):
            return None
        st.cache_hit, st.cache_tier, st.cache_read = ("exact" if exact else "partial"), "resident", n
        st.context = list(st.prompt[:n])
        st.cursor = list(st.prompt[n:])
        return res.key, (res.logits.copy() if exact and res.logits is not None else None)

    def _demote(self, e: Entry) -> None:
        """A resident row leaves: copy it out to the store unless a tier there holds it."""
        if self.cache.index.lookup_exact(e.key) is None:
            self.cache.counters.add("resident_demotions", 1)
            self.save(e.seq, e.tokens, e.meta, kvc.SaveReason.EVICT, e.logits, resident=False)

    def save(self, seq: int, tokens: list[int], km: KeyMeta, reason: kvc.SaveReason,
             logits: np.ndarray | None, *, wait: bool = False, resident: bool = True) -> Any:
        """Hand the sequence's state to the writer pool; returns the row's key (or, with
        ``wait``, the save's future), or None when nothing was saved. A cold or finish row
        is also kept in the resident tier when the model has one (``resident``)."""
        tokens = list(tokens)
        key = cache_key(km, tokens)
        t0 = time.perf_counter_ns()
        entry = None
        if resident and self.resident is not None and reason in PARKED_REASONS:
            if reason == kvc.SaveReason.CONTINUED and self.resident.copying():
                # a checkpoint while the last one is still being copied out: the next one
                # covers it (copies would pile up and take the cores decoding needs)
                self.cache.counters.add("continued_coalesced", 1)
                return None
            entry = self.resident.keep(key, seq, tokens, km, logits)
            if entry is not None and not entry.idle():  # this very row is being copied out
                return entry.copy if wait else key
        get_parked, size_of = getattr(self.backend, "state_get_parked", None), getattr(self.backend, "state_size", None)
        parked = entry is not None and get_parked is not None and size_of is not None
        kv: Any
        try:
            if parked:
                assert entry is not None and get_parked is not None and size_of is not None
                # the row's spare sequence is never decoded: a writer copies it out while
                # this actor goes on decoding (see Context.state_get_parked)
                kv, kv_size = functools.partial(get_parked, entry.seq), size_of(entry.seq)
            else:
                kv = self.backend.state_get(seq)
                kv_size = 0
        except errors.ModelCrashed:
            raise
        except errors.ErllamaError as exc:
            logger.warning("model %s: state_get failed, no %s save: %s", self.model_id, reason.name, exc)
            return None
        self.cache.counters.add("pack_total_ns", time.perf_counter_ns() - t0)
        meta = kvc.RowMeta(fingerprint=km.fingerprint, quant=km.quant, ctx_params_hash=km.ctx_params_hash,
                           namespace=km.namespace, tokens=kvc.encode_tokens(tokens), save_reason=reason,
                           context_size=self.backend.n_ctx_seq)
        try:
            fut = self.cache.save(meta, logits, kv, tier=self.tier, wait=wait, kv_size=kv_size)
        except errors.ErllamaError as exc:
            logger.warning("model %s: %s save refused: %s", self.model_id, reason.name.lower(), exc)
            return None
        if fut is None:
            return None
        if parked:
            assert entry is not None
            entry.copy = fut
        return fut if wait else key

    def save_req(self, req: Request, reason: kvc.SaveReason, logits: np.ndarray | None, *,
                 wait: bool = False) -> Any:
        """:meth:`save` of the request's context, counting what it added to the cache."""
        st = req.state
        out = self.save(st.seq_id, st.context, st.key_meta, reason, logits, wait=wait)
        if out is not None:  # SPEC 1.4: tokens this request added to the cache
            st.cache_created = max(st.cache_created, len(st.context) - st.cache_read)
        return out

    def save_live(self, live: Iterable[tuple[int, list[int], KeyMeta]], reason: kvc.SaveReason,
                  timeout: float = 60.0) -> int:
        """Synchronously save each ``(seq, tokens, key_meta)`` of ``live`` (``evict``/``shutdown``),
        and each resident row no store tier holds; returns how many rows were written or
        already present."""
        futures = []
        for seq, tokens, km in live:
            if not tokens:
                continue
            try:
                logits = self.backend.logits(seq)
            except errors.ModelCrashed:
                raise
            except errors.ErllamaError:
                logits = None
            fut = self.save(seq, tokens, km, reason, logits, wait=True)
            if fut is not None:
                futures.append(fut)
        for e in list(self.resident.entries.values()) if self.resident is not None else ():
            if self.cache.index.lookup_exact(e.key) is None:  # only resident: persist it too
                fut = self.save(e.seq, e.tokens, e.meta, reason, e.logits, wait=True, resident=False)
                if fut is not None:
                    futures.append(fut)
        done = 0
        for fut in futures:
            try:
                fut.result(timeout=timeout)
                done += 1
            except Exception as exc:
                logger.warning("model %s: %s save failed: %s", self.model_id, reason.name.lower(), exc)
        return done

    def continued(self, req: Request) -> None:
        """A decode step: a continued save when the policy's interval is reached."""
        st = req.state
        if should_continued_save(self.policy, len(st.context), st.last_save_at):
            self.save_req(req, kvc.SaveReason.CONTINUED, None)
            st.last_save_at = len(st.context)

    def cold_saves(self, req: Request) -> None:
        """A cold prefill reached a save point: the trimmed prefix, or the whole prompt."""
        st = req.state
        if len(st.context) < self.policy.min_tokens:
            return
        self.save_req(req, kvc.SaveReason.COLD, self.backend.logits(st.seq_id))
        if st.cold_rest is not None:
            st.cursor, st.cold_rest = st.cold_rest, None

    def prefilled(self, req: Request) -> Callable[[], None] | None:
        """``prefill_only``: the prompt is in the KV; make sure a row of it exists.

        Returns None when the request can finish now (its row exists, ``finish_key`` set;
        or none could be saved), else the ``done`` for the actor's finish: it delivers the
        ``Done`` (with a ``finish_key`` that is usable at once) when the row is published."""
        st = req.state
        key = cache_key(st.key_meta, st.context)
        if self.cache.index.lookup_exact(key) is not None:
            st.finish_key = key
            return None
        try:
            logits = self.backend.logits(st.seq_id)
        except errors.NoLogits:
            logits = None
        fut = self.save_req(req, kvc.SaveReason.COLD, logits, wait=True)
        if fut is None:
            return None

        def published(f: Any) -> None:  # in a writer thread
            st.finish_key = key if f.exception() is None else None
            req.sink(Done(req.completion("prefilled")))

        return lambda: fut.add_done_callback(published)

    def finish(self, req: Request) -> None:
        """A request that generated ends: save its context (its ``finish_key``) when the
        policy wants it and the row does not exist yet."""
        st = req.state
        if st.generated and len(st.context) > st.cache_read and should_finish_save(self.policy, len(st.context)):
            try:
                logits = self.backend.logits(st.seq_id)
            except errors.NoLogits:
                logits = None
            st.finish_key = self.save_req(req, kvc.SaveReason.FINISH, logits)
