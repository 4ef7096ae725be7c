"""One request inside a model actor: its parameters, its progress and where its events go."""

from __future__ import annotations

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

__all__ = ["Request", "RequestParams"]

_ids = itertools.count(1)
logger = logging.getLogger("erllama.model")
SAMPLER_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "grammar")


@dataclass(frozen=True)
class RequestParams:
    """The per-request parameters of API.md (validated when built)."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    grammar: str | None = None
    stop: tuple[str, ...] = ()
    parent_key: bytes | None = None
    session_id: str | None = None
    timeout: float | None = None
    prefill_only: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise errors.InvalidParameter(f"max_tokens must be an int >= 0, got {self.max_tokens!r}")
        object.__setattr__(self, "stop", validate_stops(self.stop if self.stop else None))
        if self.parent_key is not None and (not isinstance(self.parent_key, bytes) or len(self.parent_key) != 32):
            raise errors.InvalidParameter(f"parent_key must be a 32-byte finish_key, got {self.parent_key!r}")
        if self.session_id is not None and (not isinstance(self.session_id, str) or not self.session_id):
            raise errors.InvalidParameter(f"session_id must be a non-empty str, got {self.session_id!r}")
        if self.timeout is not None and (not isinstance(self.timeout, int | float) or self.timeout <= 0):
            raise errors.InvalidParameter(f"timeout must be seconds > 0 or None, got {self.timeout!r}")

    def sampler(self) -> dict[str, Any]:
        """The sampler chain's parameters (validated by the backend)."""
        out = {k: getattr(self, k) for k in SAMPLER_KEYS}
        return {k: v for k, v in out.items() if v is not None}


class Request:
    """A request's life in the actor: queued, prefilling, generating, finished."""

    def __init__(self, prompt: list[int] | str, params: RequestParams, sink: Callable[[Any], None]) -> None:
        self.id = next(_ids)
        self.prompt: Any = prompt  # a str is tokenized by the actor
        self.params = params
        self._sink = sink
        self.cancelled = threading.Event()
        self.seq: int | None = None
        self.order = self.id
        self.sampler: Any = None
        self.cursor: list[int] = []
        self.next_token: int | None = None
        self.generated: list[int] = []
        self.context: list[int] = []  # tokens in the sequence's KV
        self.text = TextStream(params.stop)
        self.parts: list[str] = []
        self.finished = False
        self.t_submit = time.perf_counter()
        self.deadline = self.t_submit + params.timeout if params.timeout is not None else float("inf")
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

    def sink(self, event: Any) -> None:
        """Deliver an event; a sink that raises cancels its own request, never the model."""
        try:
            self._sink(event)
        except Exception:
            logger.exception("the sink of request %s raised; the request is cancelled", self.id)
            self.cancelled.set()

    @property
    def phase(self) -> str:
        """``queued``, ``prefilling`` or ``generating``."""
        if self.seq is None:
            return "queued"
        return "prefilling" if self.cursor else "generating"

    def completion(self, finish_reason: str) -> Completion:
        """The final result."""
        now = time.perf_counter()
        n = len(self.generated)
        gen_s = now - self.t_first if self.t_first else 0.0
        stats = Stats(prompt_tokens=len(self.prompt), completion_tokens=n,
                      prefill_ms=((self.t_first or now) - (self.t_admit or now)) * 1e3,
                      ttft_ms=((self.t_first or now) - self.t_submit) * 1e3, generation_ms=gen_s * 1e3,
                      tokens_per_s=(n - 1) / gen_s if n > 1 and gen_s > 0 else 0.0,
                      queued_ms=((self.t_admit or now) - self.t_submit) * 1e3)
        return Completion(text="".join(self.parts), tokens=tuple(self.generated), context_tokens=len(self.context),
                          finish_reason=finish_reason, finish_key=self.finish_key, cache_hit=self.cache_hit,
                          cache_delta=CacheDelta(read=self.cache_read, created=self.cache_created,
                                                 tier=self.cache_tier),
                          stop_sequence=self.text.matched,
                          stats=stats)
