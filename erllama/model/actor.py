"""The per-model actor: admission, batched multi-sequence ticks, sampling, stop handling.

All decoding happens on this actor's thread. A tick is a message the actor sends itself,
so other messages (new requests, observability reads) interleave between ticks. Cancel is
out of band: a flag on the request, honoured at the next tick, queued or running. A
request that fails (bad input, a failed step) gets its error; the model goes on.

The actor owns two plain helpers: its sequences and sticky sessions (``model.pool``), and,
when given a store and the model's key meta, its cache I/O (``model.saves``: restores at
admission, cold/continued/finish saves handed to the writer pool, never blocking decoding).

Adapters change only between requests (``model.adapters``); embeddings run on the backend's
dedicated embeddings context. A ``ModelCrashed`` from the backend (its worker process died)
fails the actor, so the supervisor starts a new backend.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import supervision
from erllama import errors
from erllama.backend.protocol import Backend, chat_tokens
from erllama.cache import kvc
from erllama.cache.key import KeyMeta, prefix_keys
from erllama.cache.policy import SavePolicy
from erllama.model import messages as msg
from erllama.model.adapters import AdapterSet
from erllama.model.logprobs import token_logprobs
from erllama.model.messages import Submit
from erllama.model.pool import SeqPool
from erllama.model.request import Request, request_key_meta
from erllama.model.saves import Saves
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
    key_meta: KeyMeta | None = None
    """The model's current cache key metadata (fingerprint with adapters, quant, context
    shape, namespace): ``erllama.cache.stats()`` reports the rows of its group per model,
    and a router computes a prompt's keys with it."""
    last_failure: str | None = None
    last_exit_signal: str | None = None


class ModelActor(supervision.Actor):
    """Serves one backend: up to ``n_seq_max`` requests decoded together, the rest queued
    in FIFO order. The messages are those of ``erllama.messages``."""

    def __init__(self, model_id: str, backend: Backend, prefill_chunk: int | None = None, *,
                 cache: Any = None, key_meta: KeyMeta | None = None, policy: SavePolicy | None = None,
                 tier: str = "ram", observed: Observed | None = None,
                 redirect: Any = None, resident_budget: int = 0) -> None:
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
        self.observed.key_meta = key_meta
        self.redirect = redirect
        self.pool = SeqPool(backend)
        self.saves = Saves(model_id, backend, self.cache, self.policy, tier, resident_budget) \
            if self.cache is not None else None
        self.running: dict[int, Request] = {}
        self.pending: deque[Request] = deque()
        self.adapters = AdapterSet(backend)
        self._ticking = False
        self._tick_no = 0
        self._queries: dict[type, Callable[[Any], Any]] = {
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
            msg.EndSession: lambda m: self.pool.end_session(m.session_id),
            msg.LongestPrefix: self._longest_prefix,
            msg.PromptKeys: self._prompt_keys,
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
        return chat_tokens(self.backend, m.messages, m.add_assistant)

    def _embed(self, m: msg.Embed) -> Any:
        tokens = self.backend.tokenize(m.input) if isinstance(m.input, str) else list(m.input)
        return self.backend.embed(tokens, m.normalize)

    def _longest_prefix(self, m: msg.LongestPrefix) -> int:
        if self.cache is None:
            return 0
        return self.cache.longest_prefix(self.key_meta, list(m.tokens))

    def _prompt_keys(self, m: msg.PromptKeys) -> dict[int, bytes]:
        if self.key_meta is None:
            return {}
        return dict(prefix_keys(request_key_meta(self.key_meta, m.namespace), list(m.tokens), m.lengths))

    def _adapter_change(self, change: Any, *args: Any) -> None:
        change(*args)
        self._schedule()  # the barrier is taken in the tick

    def _apply_adapters(self) -> None:
        """The barrier: nothing runs; put the staged adapters on and re-key new requests."""
        self.pool.drop_sessions()  # their KV was computed under the old adapters
        self.adapters.apply()
        if self.key_meta is not None and self.base_fingerprint is not None:
            self.key_meta = dataclasses.replace(self.key_meta,
                                                fingerprint=self.adapters.fingerprint(self.base_fingerprint))
            self.observed.key_meta = self.key_meta

    def save_live(self, reason: kvc.SaveReason, timeout: float = 60.0) -> int:
        """Synchronously save the context of every running request and idle session
        (``evict``/``shutdown``); returns how many rows were written or already present."""
        if self.saves is None:
            return 0
        live = [(r.state.seq_id, r.state.context, r.state.key_meta) for r in self.running.values()]
        live += [(s.seq, s.tokens, request_key_meta(self.key_meta, s.namespace)) for s in self.pool.sessions.values()]
        return self.saves.save_live(live, reason, timeout)

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
        self.pool.sessions.clear()
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
        st = req.state
        try:
            if isinstance(st.prompt, str):
                st.prompt = self.backend.tokenize(st.prompt)
            self._validate(st.prompt)
            self.pool.claim(req)
        except errors.ModelCrashed as exc:
            self._fail(req, exc)  # not queued yet: on_failure would not see it
            raise
        except errors.ErllamaError as exc:
            st.finished = True
            req.sink(exc)
            return
        self.pending.append(req)
        self._schedule()

    def _validate(self, prompt: Any) -> None:
        if not prompt:
            raise errors.EmptyPrompt("the prompt holds no tokens")
        n_vocab = self.backend.n_vocab
        try:
            arr = np.asarray(prompt)
            ok = arr.dtype.kind in "iu" and arr.ndim == 1 and 0 <= int(arr.min()) and int(arr.max()) < n_vocab
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:  # find the first bad one for the message
            for i, t in enumerate(prompt):
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_vocab:
                    raise errors.InvalidToken(f"prompt[{i}] = {t!r} is outside the vocabulary [0, {n_vocab})")
        if len(prompt) + 1 > self.backend.n_ctx_seq:
            raise errors.ContextOverflow(
                f"the prompt holds {len(prompt)} tokens; a sequence holds {self.backend.n_ctx_seq}")

    def _admit(self) -> None:
        while self.pending:
            req = self.pending[0]
            st = req.state
            if req.cancelled.is_set():
                self.pending.popleft()
                self._finish(req, "cancelled")
                continue
            if self.adapters.dirty:
                if self.running:
                    return  # admissions wait until the running requests end (model.adapters)
                self._apply_adapters()
            if not self.pool.has_room():
                return
            try:  # still queued while the backend is asked: a crash here fails it from pending
                sampler = self.backend.new_sampler(req.params.sampler())
            except errors.ModelCrashed:
                raise
            except errors.ErllamaError as exc:
                self.pending.popleft()
                self._fail(req, exc)
                continue
            seq = self.pool.seq_for(req)
            self.pending.popleft()
            st.sampler, st.seq, st.key_meta = sampler, seq, request_key_meta(self.key_meta, req.params.namespace)
            st.abort = self.backend.request_abort
            st.t_admit = time.perf_counter()
            self.running[seq] = req
            if st.cache_hit == "sticky":
                self.observed.last_cache_hit = ("sticky", st.cache_read)
                continue
            self.backend.seq_clear(seq)
            st.cursor = list(st.prompt)
            if self.saves is not None:
                hit_key, logits = self.saves.warm(req, self.actor_ref)
                if hit_key is not None and req.params.prefill_only and not st.cursor:
                    st.finish_key = hit_key
                    self._finish(req, "prefilled")
                elif logits is not None:
                    self._sample(req, logits)
            self.observed.last_cache_hit = (st.cache_hit, st.cache_read)

    # ---- the tick -------------------------------------------------------------------------------

    def _schedule(self) -> None:
        if not self._ticking:
            self._ticking = True
            self.actor_ref.tell(_Tick())

    def _tick(self) -> None:
        now = time.perf_counter()
        for req in [r for r in (*self.pending, *self.running.values())
                    if r.cancelled.is_set() or r.deadline < now]:
            if req.state.seq is None:
                self.pending.remove(req)
            if req.cancelled.is_set():
                self._finish(req, "cancelled")
            else:
                self._fail(req, errors.RequestTimeout(
                    f"request {req.id} did not finish within timeout={req.params.timeout} s "
                    f"({req.phase}, {len(req.state.generated)} tokens generated)"))
        self._admit()
        work = [SeqWork(seq, r.order, decode=r.state.next_token is not None, prefill=len(r.state.cursor))
                for seq, r in self.running.items()]
        plan = plan_tick(work, self.backend.n_batch, self.prefill_chunk, self._tick_no)
        self._tick_no += 1
        if plan:
            self._run(plan)
        if self.running or self.pending:
            self._schedule()

    def _run(self, plan: list[tuple[int, int]]) -> None:
        rows = []
        for seq, n in plan:
            st = self.running[seq].state
            if st.next_token is not None:
                rows.append((seq, [st.next_token], True))
            else:
                rows.append((seq, st.cursor[:n], n == len(st.cursor)))
        rows.sort(key=lambda row: row[0])
        try:
            self.backend.step(rows)
        except errors.ModelCrashed:
            raise
        except errors.Aborted:
            # a cancel interrupted the decode: every row was rolled back, the cancelled
            # requests end at the next tick and the others run again
            self.backend.clear_abort()
            return
        except errors.ErllamaError as exc:
            for seq, _ in plan:
                self._fail(self.running[seq], exc)
            return
        for seq, toks, want in rows:
            req = self.running.get(seq)
            if req is None:
                continue
            st = req.state
            st.context.extend(toks)
            prefill_row = st.next_token is None
            if prefill_row:
                del st.cursor[: len(toks)]
                if not st.cursor:
                    st.last_save_at = len(st.context)  # the prompt is saved (or deliberately not)
            else:
                st.next_token = None
                if self.saves is not None:
                    self.saves.continued(req)
            if not want:
                continue
            if self.saves is not None and prefill_row and not st.cursor and st.cache_hit == "cold":
                self.saves.cold_saves(req)
                if st.cursor:
                    continue  # the trimmed prefix was saved; prefill the rest
            if req.params.prefill_only and not st.cursor:
                # prefill_only: the prompt is in the KV; the sequence is freed once its
                # state is copied, the Done comes when its row is published
                self._finish(req, "prefilled", done=self.saves.prefilled(req) if self.saves is not None else None)
                continue
            self._sample(req)

    def _sample(self, req: Request, logits: np.ndarray | None = None) -> None:
        st = req.state
        if req.params.max_tokens == 0:
            self._finish(req, "length")
            return
        try:
            if logits is not None:
                tok = self.backend.sample_logits(st.sampler, logits)
            else:
                tok = self.backend.sample(st.sampler, st.seq_id)
        except errors.ModelCrashed:
            raise
        except errors.ErllamaError as exc:
            self._fail(req, exc)
            return
        if not st.t_first:
            st.t_first = time.perf_counter()
        if self.backend.is_eog(tok):
            self._finish(req, "stop")
            return
        st.generated.append(tok)
        text = st.text.feed(self.backend.token_piece(tok))
        st.parts.append(text)
        lp = None if req.params.logprobs is None else token_logprobs(self.backend, req, tok, logits)
        req.sink(Token(text, tok, lp))
        if st.text.matched is not None:
            self._finish(req, "stop")
        elif len(st.generated) >= req.params.max_tokens or len(st.context) >= self.backend.n_ctx_seq:
            self._finish(req, "length")  # max_tokens, or the sequence's context is full
        else:
            st.next_token = tok

    # ---- endings --------------------------------------------------------------------------------

    def _release(self, req: Request, keep_session: bool) -> None:
        """Free the request's sequence (or pin it to its session) and its sampler."""
        st = req.state
        try:
            if st.seq is not None and self.running.get(st.seq) is req:
                del self.running[st.seq]
                self.pool.put_back(req, keep_session)
            if st.sampler is not None:
                sampler, st.sampler = st.sampler, None
                self.backend.free_sampler(sampler)
        except errors.ModelCrashed:
            pass  # the backend is gone, and with it what there was to free
        finally:
            self.pool.unclaim(req)

    def _finish(self, req: Request, reason: str, done: Any = None) -> None:
        """End ``req``: finish save, release, flush held-back text, then ``Done`` (or
        ``done()``, which delivers it later)."""
        st = req.state
        if st.finished:
            return
        st.finished = True
        if self.saves is not None and st.seq is not None and self.running.get(st.seq) is req:
            self.saves.finish(req)
        self._release(req, keep_session=True)
        tail = st.text.flush()
        if tail:
            st.parts.append(tail)
            req.sink(Token(tail, -1))
        if done is not None:
            done()
        else:
            req.sink(Done(req.completion(reason)))

    def _fail(self, req: Request, exc: BaseException) -> None:
        if req.state.finished:
            return
        req.state.finished = True
        self._release(req, keep_session=False)
        req.sink(exc)
