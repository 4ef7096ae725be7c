"""The per-model actor: admission, batched multi-sequence ticks, sampling, stop handling.

All decoding happens on this actor's thread. A tick is a message the actor sends itself,
so other messages (new requests, observability reads) interleave between ticks. Cancel is
out of band: a flag on the request, honoured at the next tick, queued or running. A
request that fails (bad input, a failed step) gets its error; the model goes on.

Cache (when given a store and the model's key meta): an admission restores the exact
prompt (sampling the first token from the row's stored logits, no re-decode), or the
longest saved prefix (then prefills only the rest); a cold prompt is saved once prefilled
(the whole prompt, and the policy's trimmed prefix), a finished request saves its context.
Saves go to the writer pool and never block decoding.

Not yet here (issue 5): sticky sessions, embeddings, adapters.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

import supervision
from erllama import errors
from erllama.backend.protocol import Backend
from erllama.cache import kvc
from erllama.cache.key import KeyMeta, cache_key
from erllama.cache.policy import SavePolicy, cold_save_split, should_continued_save, should_finish_save
from erllama.model.request import Request
from erllama.model.scheduler import SeqWork, plan_tick
from erllama.types import Done, Token

__all__ = ["ModelActor", "Submit"]

logger = logging.getLogger("erllama.model")


@dataclass(frozen=True)
class Submit:
    """Admit a request (its events go to ``request.sink``)."""

    request: Request


class _Tick:
    pass


class ModelActor(supervision.Actor):
    """Serves one backend: up to ``n_seq_max`` requests decoded together, the rest queued
    in FIFO order."""

    def __init__(self, model_id: str, backend: Backend, prefill_chunk: int | None = None, *,
                 cache: Any = None, key_meta: KeyMeta | None = None, policy: SavePolicy | None = None,
                 tier: str = "ram") -> None:
        super().__init__()
        self.model_id = model_id
        self.backend = backend
        self.prefill_chunk = prefill_chunk
        self.cache = cache if key_meta is not None else None
        self.key_meta = key_meta
        self.policy = policy or SavePolicy()
        self.tier = tier
        self.free_seqs = deque(range(backend.n_seq_max))
        self.running: dict[int, Request] = {}
        self.pending: deque[Request] = deque()
        self._ticking = False
        self._tick_no = 0

    # ---- messages --------------------------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        """``Submit`` requests, ticks, and the observability reads."""
        if isinstance(message, _Tick):
            self._ticking = False
            self._tick()
            return None
        if isinstance(message, Submit):
            self._submit(message.request)
            return None
        if message == "phase":
            return self.phase()
        if message == "queue_depth":
            return len(self.pending)
        if isinstance(message, tuple) and message[:1] == ("tokenize",):
            return self.backend.tokenize(*message[1:])
        if isinstance(message, tuple) and message[:1] == ("detokenize",):
            return self.backend.detokenize(message[1])
        if message in ("evict", "shutdown"):
            return self.save_live(kvc.SaveReason.EVICT if message == "evict" else kvc.SaveReason.SHUTDOWN)
        if message == "crash":  # fault injection for supervision tests
            raise RuntimeError(f"model {self.model_id!r}: injected crash")
        logger.warning("model %s ignores an unexpected message %r", self.model_id, message)
        return None

    def on_stop(self) -> None:
        """Save every live sequence (``shutdown``), fail what is left, free the backend."""
        self.save_live(kvc.SaveReason.SHUTDOWN)
        self._end(errors.ModelCrashed(f"model {self.model_id!r} was unloaded or stopped"))

    def save_live(self, reason: kvc.SaveReason, timeout: float = 60.0) -> int:
        """Synchronously save the context of every running request (``evict``/``shutdown``);
        returns how many rows were written or already present."""
        if self.cache is None:
            return 0
        futures = []
        for req in list(self.running.values()):
            if not req.context:
                continue
            try:
                logits = self.backend.logits(req.seq)
            except errors.ErllamaError:
                logits = None
            fut = self._save(req, reason, logits, wait=True)
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

    def on_failure(self, *exc_info: Any) -> None:
        """An unexpected failure: every request in flight or queued gets ``ModelCrashed``."""
        self._end(errors.ModelCrashed(f"model {self.model_id!r} crashed: {exc_info[1]!r}"))

    def on_undelivered(self, message: Any) -> None:
        """A request submitted just before the actor died gets ``ModelCrashed``."""
        if isinstance(message, Submit):
            self._fail(message.request, errors.ModelCrashed(f"model {self.model_id!r} stopped before the request ran"))

    def _end(self, exc: errors.ErllamaError) -> None:
        for req in list(self.running.values()) + list(self.pending):
            self._fail(req, exc)
        self.pending.clear()
        self.backend.close()

    def phase(self) -> str:
        """``idle``, ``prefilling`` or ``generating`` (the dominant phase of running requests)."""
        phases = [r.phase for r in self.running.values()]
        if not phases:
            return "idle"
        return "prefilling" if phases.count("prefilling") >= phases.count("generating") else "generating"

    # ---- admission ----------------------------------------------------------------------------

    def _submit(self, req: Request) -> None:
        try:
            if isinstance(req.prompt, str):
                req.prompt = self.backend.tokenize(req.prompt)
            self._validate(req)
        except errors.ErllamaError as exc:
            req.finished = True
            req.sink(exc)
            return
        self.pending.append(req)
        self._schedule()

    def _validate(self, req: Request) -> None:
        if not req.prompt:
            raise errors.EmptyPrompt("the prompt holds no tokens")
        n_vocab = self.backend.n_vocab
        for i, t in enumerate(req.prompt):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_vocab:
                raise errors.InvalidToken(f"prompt[{i}] = {t!r} is outside the vocabulary [0, {n_vocab})")
        if len(req.prompt) + 1 > self.backend.n_ctx_seq:
            raise errors.ContextOverflow(
                f"the prompt holds {len(req.prompt)} tokens; a sequence holds {self.backend.n_ctx_seq}")

    def _admit(self) -> None:
        while self.pending and self.free_seqs:
            req = self.pending.popleft()
            if req.cancelled.is_set():
                self._finish(req, "cancelled")
                continue
            try:
                req.sampler = self.backend.new_sampler(req.params.sampler())
            except errors.ErllamaError as exc:
                self._fail(req, exc)
                continue
            req.seq = self.free_seqs.popleft()
            req.t_admit = time.perf_counter()
            self.backend.seq_clear(req.seq)
            req.cursor = list(req.prompt)
            self.running[req.seq] = req
            if self.cache is not None:
                self._warm(req)

    # ---- the cache ------------------------------------------------------------------------------

    def _warm(self, req: Request) -> None:
        """Restore the best saved row into the request's sequence, or arm the cold saves."""
        hit = self.cache.lookup(self.key_meta, req.prompt, parent_key=req.params.parent_key)
        logits = None
        if hit is not None:
            with self.cache.restore(hit.key, holder=self.actor_ref) as row:
                restored = -1
                if row is not None and (row.logits is not None or hit.n_tokens < len(req.prompt)):
                    # an exact hit needs the row's logits: re-decoding would change them
                    try:
                        restored = self.backend.state_set(req.seq, row.kv)
                    except errors.StateError as exc:
                        logger.warning("model %s: cached row does not restore: %s", self.model_id, exc)
                    if restored == hit.n_tokens and hit.n_tokens == len(req.prompt):
                        logits = np.array(row.logits, dtype=np.float32)
            if restored != hit.n_tokens:
                self.backend.seq_clear(req.seq)
                hit = None
        if hit is None:
            req.cache_hit = "cold"
            split = cold_save_split(self.policy, req.prompt)
            if split is not None and len(split[0]) >= self.policy.min_tokens and split[1]:
                req.cursor = list(split[0])
                req.cold_rest = list(split[1])
            return
        req.cache_hit = "exact" if logits is not None else "partial"
        req.cache_read = hit.n_tokens
        req.context = list(req.prompt[: hit.n_tokens])
        req.cursor = list(req.prompt[hit.n_tokens:])
        if req.params.prefill_only and not req.cursor:
            req.finish_key = hit.key
            self._finish(req, "prefilled")
        elif logits is not None:
            self._sample(req, logits)

    def _save(self, req: Request, reason: kvc.SaveReason, logits: np.ndarray | None, *,
              wait: bool = False) -> Any:
        """Hand the sequence's state to the writer pool; returns the row's key (or, with
        ``wait``, the save's future)."""
        km = self.key_meta
        tokens = list(req.context)
        try:
            kv = self.backend.state_get(req.seq)
        except errors.ErllamaError as exc:
            logger.warning("model %s: state_get failed, no %s save: %s", self.model_id, reason.name, exc)
            return None
        meta = kvc.RowMeta(fingerprint=km.fingerprint, quant=km.quant, ctx_params_hash=km.ctx_params_hash,
                           namespace=km.namespace, tokens=tokens, save_reason=reason,
                           context_size=self.backend.n_ctx_seq)
        fut = self.cache.save(meta, logits, kv, tier=self.tier, wait=wait)
        if fut is None:
            return None
        req.cache_created = max(req.cache_created, len(tokens))
        return fut if wait else cache_key(km, tokens)

    # ---- the tick -------------------------------------------------------------------------------

    def _schedule(self) -> None:
        if not self._ticking:
            self._ticking = True
            self.actor_ref.tell(_Tick())

    def _tick(self) -> None:
        for req in [r for r in self.pending if r.cancelled.is_set()]:
            self.pending.remove(req)
            self._finish(req, "cancelled")
        for req in [r for r in self.running.values() if r.cancelled.is_set()]:
            self._finish(req, "cancelled")
        self._admit()
        work = [SeqWork(r.seq, r.order, decode=r.next_token is not None, prefill=len(r.cursor))
                for r in self.running.values()]
        plan = plan_tick(work, self.backend.n_batch, self.prefill_chunk, self._tick_no)
        self._tick_no += 1
        if plan:
            self._run(plan)
        if self.running or self.pending:
            self._schedule()

    def _run(self, plan: list[tuple[int, int]]) -> None:
        rows = []
        for seq, n in plan:
            req = self.running[seq]
            if req.next_token is not None:
                rows.append((seq, [req.next_token], True))
            else:
                rows.append((seq, req.cursor[:n], n == len(req.cursor)))
        try:
            self.backend.step(rows)
        except errors.ErllamaError as exc:
            for seq, _ in plan:
                self._fail(self.running[seq], exc)
            return
        for seq, toks, want in rows:
            req = self.running.get(seq)
            if req is None:
                continue
            req.context.extend(toks)
            prefill_row = req.next_token is None
            if prefill_row:
                del req.cursor[: len(toks)]
                if not req.cursor:
                    req.last_save_at = len(req.context)  # the prompt is saved (or deliberately not)
            else:
                req.next_token = None
                if self.cache is not None and should_continued_save(self.policy, len(req.context),
                                                                    req.last_save_at):
                    self._save(req, kvc.SaveReason.CONTINUED, None)
                    req.last_save_at = len(req.context)
            if not want:
                continue
            if self.cache is not None and prefill_row and not req.cursor and req.cache_hit == "cold":
                self._cold_saves(req)
                if req.cursor:
                    continue  # the trimmed prefix was saved; prefill the rest
            if req.params.prefill_only and not req.cursor:
                self._prefilled(req)
                continue
            self._sample(req)

    def _prefilled(self, req: Request) -> None:
        """``prefill_only``: the prompt is in the KV; make sure a row of it exists, finish."""
        if self.cache is not None:
            key = cache_key(self.key_meta, req.context)
            if self.cache.index.lookup_exact(key) is None:
                try:
                    logits = self.backend.logits(req.seq)
                except errors.ErllamaError:
                    logits = None
                fut = self._save(req, kvc.SaveReason.COLD, logits, wait=True)
                key = key if fut is not None and not fut.exception(timeout=60) else None
            req.finish_key = key
        self._finish(req, "prefilled")

    def _cold_saves(self, req: Request) -> None:
        """A cold prefill reached a save point: the trimmed prefix, or the whole prompt."""
        if len(req.context) < self.policy.min_tokens:
            return
        self._save(req, kvc.SaveReason.COLD, self.backend.logits(req.seq))
        if req.cold_rest is not None:
            req.cursor, req.cold_rest = req.cold_rest, None

    def _sample(self, req: Request, logits: np.ndarray | None = None) -> None:
        if req.params.max_tokens == 0:
            self._finish(req, "length")
            return
        try:
            if logits is not None:
                tok = self.backend.sample_logits(req.sampler, logits)
            else:
                tok = self.backend.sample(req.sampler, req.seq)
        except errors.ErllamaError as exc:
            self._fail(req, exc)
            return
        if not req.t_first:
            req.t_first = time.perf_counter()
        if self.backend.is_eog(tok):
            self._finish(req, "stop")
            return
        req.generated.append(tok)
        text = req.text.feed(self.backend.token_piece(tok))
        req.parts.append(text)
        req.sink(Token(text, tok))
        if req.text.matched is not None:
            self._finish(req, "stop")
        elif len(req.generated) >= req.params.max_tokens or len(req.context) >= self.backend.n_ctx_seq:
            self._finish(req, "length")  # max_tokens, or the sequence's context is full
        else:
            req.next_token = tok

    # ---- endings --------------------------------------------------------------------------------

    def _release(self, req: Request) -> None:
        if req.seq is not None and self.running.get(req.seq) is req:
            del self.running[req.seq]
            self.backend.seq_clear(req.seq)
            self.free_seqs.append(req.seq)
        if req.sampler is not None:
            self.backend.free_sampler(req.sampler)
            req.sampler = None

    def _finish(self, req: Request, reason: str) -> None:
        if req.finished:
            return
        req.finished = True
        if (self.cache is not None and req.seq is not None and self.running.get(req.seq) is req
                and req.generated and should_finish_save(self.policy, len(req.context))):
            try:
                logits = self.backend.logits(req.seq)
            except errors.NoLogits:
                logits = None
            req.finish_key = self._save(req, kvc.SaveReason.FINISH, logits)
        self._release(req)
        tail = req.text.flush()
        if tail:
            req.parts.append(tail)
            req.sink(Token(tail, -1))
        req.sink(Done(req.completion(reason)))

    def _fail(self, req: Request, exc: BaseException) -> None:
        if req.finished:
            return
        req.finished = True
        self._release(req)
        req.sink(exc)
