"""One request inside a model actor: what the caller asked (fixed), and the running state
the actor changes as it serves it (``Request.state``)."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from erllama import errors
from erllama.model.stops import TextStream, validate_stops
from erllama.types import CacheDelta, Completion, Stats

__all__ = ["Request", "RequestParams", "RequestState"]

_ids = itertools.count(1)
logger = logging.getLogger("erllama.model")
SAMPLER_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
                "presence_penalty", "seed", "grammar")


@dataclass(frozen=True)
class RequestParams:
    """The per-request parameters of API.md (validated when built)."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    grammar: str | None = None
    stop: tuple[str, ...] = ()
    parent_key: bytes | None = None
    session_id: str | None = None
    timeout: float | None = None
    prefill_only: bool = False
    logprobs: int | None = None
    namespace: bytes | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise errors.InvalidParameter(f"max_tokens must be an int >= 0, got {self.max_tokens!r}")
        object.__setattr__(self, "stop", validate_stops(self.stop if self.stop else None))
        if self.parent_key is not None and (not isinstance(self.parent_key, bytes) or len(self.parent_key) != 32):
            raise errors.InvalidParameter(f"parent_key must be a 32-byte finish_key, got {self.parent_key!r}")
        if self.session_id is not None and (not isinstance(self.session_id, str) or not self.session_id):
            raise errors.InvalidParameter(f"session_id must be a non-empty str, got {self.session_id!r}")
        if self.namespace is not None and (not isinstance(self.namespace, bytes) or not 0 < len(self.namespace) <= 256):
            raise errors.InvalidParameter(f"namespace must be 1 to 256 bytes or None, got {self.namespace!r:.80}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= 20):
            raise errors.InvalidParameter(f"logprobs must be None or an int in [0, 20] (top alternatives), "
                                          f"got {self.logprobs!r}")
        if self.timeout is not None and (not isinstance(self.timeout, int | float) or self.timeout <= 0):
            raise errors.InvalidParameter(f"timeout must be seconds > 0 or None, got {self.timeout!r}")

    def sampler(self) -> dict[str, Any]:
        """The sampler chain's parameters (validated by the backend)."""
        out = {k: getattr(self, k) for k in SAMPLER_KEYS}
        return {k: v for k, v in out.items() if v is not None}


def request_key_meta(base: Any, namespace: bytes | None) -> Any:
    """The cache key metadata of a request: the model's, or with the request's
    ``namespace`` folded into the model's own (length-prefixed, so no two different pairs
    give the same salt): rows saved under one namespace never match another's."""
    if base is None or namespace is None:
        return base
    own = base.namespace or b""
    return dataclasses.replace(base, namespace=b"req\0" + len(own).to_bytes(4, "little") + own + namespace)


class RequestState:
    """What the model actor changes while it serves a request: its sequence, the tokens in
    its KV, what is left to prefill, what it generated, the cache's part in it, timings."""

    def __init__(self, prompt: Any, stops: tuple[str, ...]) -> None:
        self.prompt: Any = prompt  # token ids once the actor tokenized a str prompt
        self.seq: int | None = None
        self.sampler: Any = None
        self.cursor: list[int] = []  # prompt tokens still to prefill
        self.next_token: int | None = None
        self.generated: list[int] = []
        self.context: list[int] = []  # tokens in the sequence's KV
        self.text = TextStream(stops)
        self.parts: list[str] = []
        self.finished = False
        self.t_admit = 0.0
        self.t_first = 0.0
        self.cache_hit = "cold"
        self.key_meta: Any = None  # the cache key's metadata, fixed at admission
        self.cache_read = 0
        self.cache_tier: str | None = None
        self.cache_created = 0
        self.cold_rest: list[int] | None = None
        self.finish_key: bytes | None = None
        self.last_save_at = 0
        # the backend's abort, set at admission: a cancel while the prompt is prefilled
        # interrupts the decode running it (llama.cpp's abort callback) instead of waiting
        self.abort: Callable[[], None] | None = None

    @property
    def seq_id(self) -> int:
        """The sequence of an admitted request (a queued one has none yet)."""
        if self.seq is None:
            raise RuntimeError("the request holds no sequence yet")
        return self.seq


class Request:
    """A request: what the caller asked (``prompt``, ``params``, where events go), fixed when
    built, and ``state``, its life in the actor: queued, prefilling, generating, finished.
    ``cancelled`` is the caller's out-of-band cancel flag."""

    __slots__ = ("_sink", "cancelled", "deadline", "id", "order", "params", "prompt", "state", "t_submit")
    id: int
    prompt: list[int] | str
    params: RequestParams
    _sink: Callable[[Any], None]
    cancelled: threading.Event
    order: int
    t_submit: float
    deadline: float
    state: RequestState

    def __init__(self, prompt: list[int] | str, params: RequestParams, sink: Callable[[Any], None]) -> None:
        fix = super().__setattr__
        fix("id", next(_ids))
        fix("prompt", prompt)  # as asked; a str is tokenized by the actor into state.prompt
        fix("params", params)
        fix("_sink", sink)
        fix("cancelled", threading.Event())
        fix("order", self.id)
        fix("t_submit", time.perf_counter())
        fix("deadline", self.t_submit + params.timeout if params.timeout is not None else float("inf"))
        fix("state", RequestState(prompt, params.stop))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Request.{name} is fixed when the request is built; "
                             "the actor's running state is Request.state")

    def cancel(self) -> None:
        """The caller's cancel (any thread): flag the request; while its prompt is being
        prefilled, also interrupt the decode running it (within about one ubatch; every
        sequence of that decode is rolled back and goes on at the next tick)."""
        self.cancelled.set()
        abort = self.state.abort
        if abort is not None and self.state.cursor and not self.state.finished:
            abort()

    def sink(self, event: Any) -> None:
        """Deliver an event; a sink that raises cancels its own request, never the model."""
        try:
            self._sink(event)
        except Exception:
            logger.exception("the sink of request %s raised; the request is cancelled", self.id)
            self.cancelled.set()

    @property
    def finished(self) -> bool:
        """Whether the request got its last event (``Done`` or an error)."""
        return self.state.finished

    @property
    def phase(self) -> str:
        """``queued``, ``prefilling`` or ``generating``."""
        if self.state.seq is None:
            return "queued"
        return "prefilling" if self.state.cursor else "generating"

    def completion(self, finish_reason: str) -> Completion:
        """The final result."""
        st = self.state
        now = time.perf_counter()
        n = len(st.generated)
        gen_s = now - st.t_first if st.t_first else 0.0
        stats = Stats(prompt_tokens=len(st.prompt), completion_tokens=n,
                      prefill_ms=((st.t_first or now) - (st.t_admit or now)) * 1e3,
                      ttft_ms=((st.t_first or now) - self.t_submit) * 1e3, generation_ms=gen_s * 1e3,
                      tokens_per_s=(n - 1) / gen_s if n > 1 and gen_s > 0 else 0.0,
                      queued_ms=((st.t_admit or now) - self.t_submit) * 1e3)
        return Completion(text="".join(st.parts), tokens=tuple(st.generated), context_tokens=len(st.context),
                          finish_reason=finish_reason, finish_key=st.finish_key, cache_hit=st.cache_hit,
                          cache_delta=CacheDelta(read=st.cache_read, created=st.cache_created,
                                                 tier=st.cache_tier),
                          stop_sequence=st.text.matched,
                          stats=stats)
