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

Sticky sessions: a request with a ``session_id`` keeps its sequence when it ends; the
session's next request, when its prompt extends what that sequence holds, prefills only the
new tokens (``cache_hit="sticky"``). Any other prompt drops the pin and takes the cache
path. A session that idles while others wait for a sequence gives its sequence up (least
recently used first): the finish save already holds its state.

Adapters change only between requests (``model.adapters``); embeddings run on the backend's
dedicated embeddings context. A ``ModelCrashed`` from the backend (its worker process died)
fails the actor, so the supervisor starts a new backend.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

import supervision
from erllama import errors
from erllama import messages as msg
from erllama.backend.protocol import Backend
from erllama.cache import kvc
from erllama.cache.key import KeyMeta, cache_key, group_of
from erllama.cache.policy import SavePolicy, cold_save_split, should_continued_save, should_finish_save
from erllama.messages import Submit
from erllama.model.adapters import AdapterSet
from erllama.model.request import Request
from erllama.model.scheduler import SeqWork, plan_tick
from erllama.types import Done, Token

__all__ = ["ModelActor", "Observed", "Submit"]

logger = logging.getLogger("erllama.model")


class _Tick:
    pass


@dataclass(frozen=True)
class _Die:
    exc: BaseException


@dataclass
class Observed:
    """What the actor publishes for lock-free reads (plain attribute reads from any thread)."""

    phase: str = "idle"
    pending_len: int = 0
    last_cache_hit: tuple[str, int] | None = None
    key_group: bytes | None = None
    """The cache key group of the model's current key (fingerprint with adapters, quant,
    context shape, namespace): ``erllama.cache.stats()`` reports its rows per model."""
    last_failure: str | None = None
    last_exit_signal: str | None = None


@dataclass
class _Session:
    seq: int
    tokens: list[int]
    last_used: float


class ModelActor(supervision.Actor):
    """Serves one backend: up to ``n_seq_max`` requests decoded together, the rest queued
    in FIFO order. The messages are those of ``erllama.messages``."""

    def __init__(self, model_id: str, backend: Backend, prefill_chunk: int | None = None, *,
                 cache: Any = None, key_meta: KeyMeta | None = None, policy: SavePolicy | None = None,
                 tier: str = "ram", observed: Observed | None = None,
                 redirect: Any = None) -> None:
        super().__init__()
        self.model_id = model_id
        self.backend = backend
        self.prefill_chunk = prefill_chunk
        self.cache = cache if key_meta is not None else None
        self.key_meta = key_meta
        self.base_fingerprint = key_meta.fingerprint if key_meta is not None else None
        self.policy = policy or SavePolicy()
        self.tier = tier
        self.observed = observed or Observed()
        self.observed.key_group = group_of(key_meta) if key_meta is not None else None
        self.redirect = redirect
        # lowest id first, and each step's rows in id order: llama.cpp batches only
        # consecutive increasing sequence ids into one ubatch (kv_unified=False), so a
        # rotated order splits a 4-row step (measured 41 ms against 33 ms)
        self.free_seqs: list[int] = list(range(backend.n_seq_max))
        self.running: dict[int, Request] = {}
        self.pending: deque[Request] = deque()
        self.sessions: dict[str, _Session] = {}
        self.session_busy: dict[str, Request] = {}
        self.ending_sessions: set[str] = set()
        self.adapters = AdapterSet(backend)
        self._ticking = False
        self._tick_no = 0
        self._queries = {
            msg.Phase: lambda m: self.phase(),
            msg.QueueDepth: lambda m: len(self.pending),
            msg.LastCacheHit: lambda m: self.observed.last_cache_hit,
            msg.Tokenize: lambda m: self.backend.tokenize(m.text, m.add_special, m.parse_special),
            msg.Detokenize: lambda m: self.backend.detokenize(list(m.tokens)),
            msg.ApplyChatTemplate: self._chat_tokens,
            msg.Embed: self._embed,
            msg.LoadAdapter: lambda m: self.adapters.load(m.path, m.sha256),
            msg.UnloadAdapter: lambda m: self._adapter_change(self.adapters.unload, m.handle),
            msg.SetAdapterScale: lambda m: self._adapter_change(self.adapters.set_scale, m.handle, m.scale),
            msg.ListAdapters: lambda m: self.adapters.listing(),
            msg.EndSession: lambda m: self.end_session(m.session_id),
            msg.LongestPrefix: self._longest_prefix,
            msg.Evict: lambda m: self.save_live(kvc.SaveReason.EVICT),
            msg.Shutdown: lambda m: self.save_live(kvc.SaveReason.SHUTDOWN),
        }

    # ---- messages --------------------------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        """``Submit`` requests, ticks, and the queries of ``erllama.messages``."""
        if isinstance(message, _Tick):
            self._ticking = False
            self._tick()
            self._publish()
            return None
        if isinstance(message, Submit):
            self._submit(message.request)
            self._publish()
            return None
        if isinstance(message, _Die):
            raise message.exc
        handler = self._queries.get(type(message))
        if handler is not None:
            try:
                return handler(message)
            except errors.ModelCrashed as exc:
                # an ask returns its error to the caller and pykka keeps the actor: fail it
                # with a message of its own, so the supervisor brings up a new backend
                self.actor_ref.tell(_Die(exc))
                raise
        if message == "crash":  # fault injection for supervision tests
            raise RuntimeError(f"model {self.model_id!r}: injected crash")
        logger.warning("model %s ignores an unexpected message %r", self.model_id, message)
        return None

    def _publish(self) -> None:
        obs = self.observed
        obs.phase = self.phase()
        obs.pending_len = len(self.pending)

    def on_stop(self) -> None:
        """Save every live sequence (``shutdown``), fail what is left, free the backend."""
        self.save_live(kvc.SaveReason.SHUTDOWN)
        self._end(errors.ModelCrashed(f"model {self.model_id!r} was unloaded or stopped"))

    def _chat_tokens(self, m: msg.ApplyChatTemplate) -> list[int]:
        text = self.backend.apply_chat_template(list(m.messages), None, m.add_assistant)
        tokens = self.backend.tokenize(text, False, True)
        bos = self.backend.tokenize("", True, False)  # [] or [BOS]: add it unless the template did
        return tokens if tokens[: len(bos)] == bos else bos + tokens

    def _embed(self, m: msg.Embed) -> Any:
        tokens = self.backend.tokenize(m.input) if isinstance(m.input, str) else list(m.input)
        return self.backend.embed(tokens, m.normalize)

    def _longest_prefix(self, m: msg.LongestPrefix) -> int:
        if self.cache is None:
            return 0
        return self.cache.longest_prefix(self.key_meta, list(m.tokens))

    def _adapter_change(self, change: Any, *args: Any) -> None:
        change(*args)
        self._schedule()  # the barrier is taken in the tick

    def _apply_adapters(self) -> None:
        """The barrier: nothing runs; put the staged adapters on and re-key new requests."""
        for sid in list(self.sessions):  # their KV was computed under the old adapters
            self._drop_session(sid)
        self.adapters.apply()
        if self.key_meta is not None:
            self.key_meta = dataclasses.replace(self.key_meta,
                                                fingerprint=self.adapters.fingerprint(self.base_fingerprint))
            self.observed.key_group = group_of(self.key_meta)

    # ---- sessions ---------------------------------------------------------------------------

    def end_session(self, session_id: str) -> None:
        """Unpin a session's sequence; a busy session is unpinned when its request ends."""
        if session_id in self.session_busy:
            self.ending_sessions.add(session_id)
        elif session_id in self.sessions:
            self._drop_session(session_id)

    def _drop_session(self, session_id: str) -> None:
        sess = self.sessions.pop(session_id)
        self.backend.seq_clear(sess.seq)
        heapq.heappush(self.free_seqs, sess.seq)

    def _seq_for(self, req: Request) -> int:
        """A sequence for ``req``: its session's, a free one, or the least recently used idle
        session's (the caller checked that one of these exists)."""
        sid = req.params.session_id
        sess = self.sessions.get(sid) if sid is not None else None
        if sess is not None:
            n = len(sess.tokens)
            if 0 < n < len(req.prompt) and req.prompt[:n] == sess.tokens:
                del self.sessions[sid]
                req.context = list(sess.tokens)
                req.cursor = list(req.prompt[n:])
                req.cache_hit, req.cache_read = "sticky", n
                return sess.seq
            self._drop_session(sid)  # diverged (or nothing new to prefill): the cache path
        if not self.free_seqs:
            self._drop_session(min(self.sessions, key=lambda s: self.sessions[s].last_used))
        return heapq.heappop(self.free_seqs)

    def save_live(self, reason: kvc.SaveReason, timeout: float = 60.0) -> int:
        """Synchronously save the context of every running request and idle session
        (``evict``/``shutdown``); returns how many rows were written or already present."""
        if self.cache is None:
            return 0
        futures = []
        live = [(r.seq, r.context, r.key_meta) for r in self.running.values()]
        live += [(s.seq, s.tokens, self.key_meta) for s in self.sessions.values()]
        for seq, tokens, km in live:
            if not tokens:
                continue
            try:
                logits = self.backend.logits(seq)
            except errors.ModelCrashed:
                raise
            except errors.ErllamaError:
                logits = None
            fut = self._save(seq, tokens, km, reason, logits, wait=True)
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
        exc = exc_info[1]
        self.observed.last_failure = repr(exc)
        self.observed.last_exit_signal = getattr(exc, "signal", None)
        crash = exc if isinstance(exc, errors.ModelCrashed) else errors.ModelCrashed(
            f"model {self.model_id!r} crashed: {exc!r}")
        self._end(crash)

    def on_undelivered(self, message: Any) -> None:
        """A request submitted just before the actor died never ran: it goes to the
        ``redirect`` hook (the application resubmits it to the restarted model), else it
        gets ``ModelCrashed``."""
        if isinstance(message, Submit):
            if self.redirect is not None and not message.request.finished:
                self.redirect(message.request)
                return
            self._fail(message.request, errors.ModelCrashed(f"model {self.model_id!r} stopped before the request ran"))

    def _end(self, exc: errors.ErllamaError) -> None:
        for req in list(self.running.values()) + list(self.pending):
            self._fail(req, exc)
        self.pending.clear()
        self.sessions.clear()
        try:
            self.backend.close()
        except errors.ErllamaError as close_exc:  # a dead worker: nothing left to free
            logger.warning("model %s: backend close failed: %s", self.model_id, close_exc)

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
            sid = req.params.session_id
            if sid is not None:
                if sid in self.session_busy:
                    raise errors.SessionBusy(
                        f"session {sid!r} is serving request {self.session_busy[sid].id}; wait for it to end")
                self.session_busy[sid] = req
        except errors.ModelCrashed as exc:
            self._fail(req, exc)  # not queued yet: on_failure would not see it
            raise
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
        try:
            arr = np.asarray(req.prompt)
            ok = arr.dtype.kind in "iu" and arr.ndim == 1 and 0 <= int(arr.min()) and int(arr.max()) < n_vocab
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:  # find the first bad one for the message
            for i, t in enumerate(req.prompt):
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_vocab:
                    raise errors.InvalidToken(f"prompt[{i}] = {t!r} is outside the vocabulary [0, {n_vocab})")
        if len(req.prompt) + 1 > self.backend.n_ctx_seq:
            raise errors.ContextOverflow(
                f"the prompt holds {len(req.prompt)} tokens; a sequence holds {self.backend.n_ctx_seq}")

    def _admit(self) -> None:
        while self.pending:
            req = self.pending[0]
            if req.cancelled.is_set():
                self.pending.popleft()
                self._finish(req, "cancelled")
                continue
            if self.adapters.dirty:
                if self.running:
                    return  # admissions wait until the running requests end (model.adapters)
                self._apply_adapters()
            if not (self.free_seqs or self.sessions):
                return
            try:  # still queued while the backend is asked: a crash here fails it from pending
                sampler = self.backend.new_sampler(req.params.sampler())
            except errors.ModelCrashed:
                raise
            except errors.ErllamaError as exc:
                self.pending.popleft()
                self._fail(req, exc)
                continue
            seq = self._seq_for(req)
            self.pending.popleft()
            req.sampler, req.seq, req.key_meta = sampler, seq, self.key_meta
            req.t_admit = time.perf_counter()
            self.running[seq] = req
            if req.cache_hit == "sticky":
                self.observed.last_cache_hit = ("sticky", req.cache_read)
                continue
            self.backend.seq_clear(seq)
            req.cursor = list(req.prompt)
            if self.cache is not None:
                self._warm(req)
            self.observed.last_cache_hit = (req.cache_hit, req.cache_read)

    # ---- the cache ------------------------------------------------------------------------------

    def _warm(self, req: Request) -> None:
        """Restore the best saved row into the request's sequence, or arm the cold saves."""
        hit = self.cache.lookup(req.key_meta, req.prompt, parent_key=req.params.parent_key)
        logits = None
        if hit is not None:
            # verify_late: a disk row's CRC runs while llama copies the KV; nothing restored
            # is used before row.verified() says the bytes are the ones saved
            with self.cache.restore(hit.key, holder=self.actor_ref, verify_late=True) as row:
                restored = -1
                if row is not None and (row.logits is not None or hit.n_tokens < len(req.prompt)):
                    # an exact hit needs the row's logits: re-decoding would change them
                    try:
                        restored = self.backend.state_set(req.seq, row.kv)
                    except errors.StateError as exc:
                        logger.warning("model %s: cached row does not restore: %s", self.model_id, exc)
                    if restored >= 0 and not row.verified():
                        restored = -1  # corrupt: removed and counted by the store
                    if restored == hit.n_tokens:
                        req.cache_tier = row.tier
                    if restored == hit.n_tokens and hit.n_tokens == len(req.prompt):
                        logits = np.frombuffer(row.logits, dtype=np.float32).copy()
            if restored != hit.n_tokens:
                self.backend.seq_clear(req.seq)
                self.cache.restore_failed(hit)
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

    def _save(self, seq: int, tokens: list[int], km: KeyMeta, reason: kvc.SaveReason,
              logits: np.ndarray | None, *, wait: bool = False) -> Any:
        """Hand the sequence's state to the writer pool; returns the row's key (or, with
        ``wait``, the save's future), or None when nothing was saved."""
        tokens = list(tokens)
        t0 = time.perf_counter_ns()
        try:
            kv = self.backend.state_get(seq)
        except errors.ModelCrashed:
            raise
        except errors.ErllamaError as exc:
            logger.warning("model %s: state_get failed, no %s save: %s", self.model_id, reason.name, exc)
            return None
        self.cache.counters.add("pack_total_ns", time.perf_counter_ns() - t0)
        meta = kvc.RowMeta(fingerprint=km.fingerprint, quant=km.quant, ctx_params_hash=km.ctx_params_hash,
                           namespace=km.namespace, tokens=tokens, save_reason=reason,
                           context_size=self.backend.n_ctx_seq)
        try:
            fut = self.cache.save(meta, logits, kv, tier=self.tier, wait=wait)
        except errors.ErllamaError as exc:
            logger.warning("model %s: %s save refused: %s", self.model_id, reason.name.lower(), exc)
            return None
        if fut is None:
            return None
        return fut if wait else cache_key(km, tokens)

    def _save_req(self, req: Request, reason: kvc.SaveReason, logits: np.ndarray | None, *,
                  wait: bool = False) -> Any:
        out = self._save(req.seq, req.context, req.key_meta, reason, logits, wait=wait)
        if out is not None:  # SPEC 1.4: tokens this request added to the cache
            req.cache_created = max(req.cache_created, len(req.context) - req.cache_read)
        return out

    # ---- the tick -------------------------------------------------------------------------------

    def _schedule(self) -> None:
        if not self._ticking:
            self._ticking = True
            self.actor_ref.tell(_Tick())

    def _tick(self) -> None:
        now = time.perf_counter()
        for req in [r for r in (*self.pending, *self.running.values())
                    if r.cancelled.is_set() or r.deadline < now]:
            if req.seq is None:
                self.pending.remove(req)
            if req.cancelled.is_set():
                self._finish(req, "cancelled")
            else:
                self._fail(req, errors.RequestTimeout(
                    f"request {req.id} did not finish within timeout={req.params.timeout} s "
                    f"({req.phase}, {len(req.generated)} tokens generated)"))
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
        rows.sort(key=lambda row: row[0])
        try:
            self.backend.step(rows)
        except errors.ModelCrashed:
            raise
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
                    self._save_req(req, kvc.SaveReason.CONTINUED, None)
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
        """``prefill_only``: the prompt is in the KV; make sure a row of it exists, finish.
        The sequence is freed once its state is copied; the caller gets its ``Done`` (with a
        ``finish_key`` that is usable at once) when the row is published."""
        if self.cache is None:
            self._finish(req, "prefilled")
            return
        key = cache_key(req.key_meta, req.context)
        if self.cache.index.lookup_exact(key) is not None:
            req.finish_key = key
            self._finish(req, "prefilled")
            return
        try:
            logits = self.backend.logits(req.seq)
        except errors.NoLogits:
            logits = None
        fut = self._save_req(req, kvc.SaveReason.COLD, logits, wait=True)
        if fut is None:
            self._finish(req, "prefilled")
            return

        def published(f: Any) -> None:  # in a writer thread
            req.finish_key = key if f.exception() is None else None
            req.sink(Done(req.completion("prefilled")))

        self._finish(req, "prefilled", done=lambda: fut.add_done_callback(published))

    def _cold_saves(self, req: Request) -> None:
        """A cold prefill reached a save point: the trimmed prefix, or the whole prompt."""
        if len(req.context) < self.policy.min_tokens:
            return
        self._save_req(req, kvc.SaveReason.COLD, self.backend.logits(req.seq))
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
        except errors.ModelCrashed:
            raise
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

    def _release(self, req: Request, keep_session: bool) -> None:
        """Free the request's sequence (or pin it to its session) and its sampler."""
        sid = req.params.session_id
        try:
            if req.seq is not None and self.running.get(req.seq) is req:
                del self.running[req.seq]
                if keep_session and sid is not None and sid not in self.ending_sessions and req.context:
                    self.sessions[sid] = _Session(req.seq, list(req.context), time.monotonic())
                else:
                    heapq.heappush(self.free_seqs, req.seq)
                    self.backend.seq_clear(req.seq)
            if req.sampler is not None:
                sampler, req.sampler = req.sampler, None
                self.backend.free_sampler(sampler)
        except errors.ModelCrashed:
            pass  # the backend is gone, and with it what there was to free
        finally:
            if sid is not None and self.session_busy.get(sid) is req:
                del self.session_busy[sid]
                self.ending_sessions.discard(sid)

    def _finish(self, req: Request, reason: str, done: Any = None) -> None:
        """End ``req``: finish save, release, flush held-back text, then ``Done`` (or
        ``done()``, which delivers it later)."""
        if req.finished:
            return
        req.finished = True
        if (self.cache is not None and req.seq is not None and self.running.get(req.seq) is req
                and req.generated and len(req.context) > req.cache_read  # else the row exists
                and should_finish_save(self.policy, len(req.context))):
            try:
                logits = self.backend.logits(req.seq)
            except errors.NoLogits:
                logits = None
            req.finish_key = self._save_req(req, kvc.SaveReason.FINISH, logits)
        self._release(req, keep_session=True)
        tail = req.text.flush()
        if tail:
            req.parts.append(tail)
            req.sink(Token(tail, -1))
        if done is not None:
            done()
        else:
            req.sink(Done(req.completion(reason)))

    def _fail(self, req: Request, exc: BaseException) -> None:
        if req.finished:
            return
        req.finished = True
        self._release(req, keep_session=False)
        req.sink(exc)
