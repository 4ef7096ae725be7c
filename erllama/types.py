"""Result and event types of the public API (``erllama.Completion``, ``Token``, ``Done``, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TIERS", "CacheDelta", "Completion", "Done", "Prefill", "Stats", "Token", "TokenLogprobs"]

TIERS: tuple[str, ...] = ("ram", "ram_file", "disk")
"""The cache tiers, fastest first: a row evicted from a tier is demoted to the next one with room."""


@dataclass(frozen=True)
class Stats:
    """Timings and counts of one request (milliseconds)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    generation_ms: float = 0.0
    tokens_per_s: float = 0.0
    queued_ms: float = 0.0


@dataclass(frozen=True)
class CacheDelta:
    """Prompt tokens restored from the cache (``read``) and saved by this request
    (``created``); ``tier``: the cache tier that served the restore (``"ram"``,
    ``"ram_file"`` or ``"disk"``; ``None`` when nothing was restored)."""

    read: int = 0
    created: int = 0
    tier: str | None = None


@dataclass(frozen=True)
class Completion:
    """The result of ``complete`` (and of a drained ``Stream``)."""

    text: str
    tokens: tuple[int, ...]
    context_tokens: int
    finish_reason: str
    finish_key: bytes | None = None
    cache_hit: str = "cold"
    cache_delta: CacheDelta = field(default_factory=CacheDelta)
    stop_sequence: str | None = None
    stats: Stats = field(default_factory=Stats)


@dataclass(frozen=True)
class TokenLogprobs:
    """A generated token's log-probability under the model (its raw distribution, before
    penalties, grammar or temperature), its bytes, and the ``top`` most likely tokens as
    ``(bytes, logprob)``, most likely first (asked with the ``logprobs`` parameter)."""

    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass(frozen=True)
class Token:
    """A streamed piece of text and the token id it came from (text may be empty while a
    multi-byte character or a possible stop sequence is held back); ``logprobs`` when the
    request asked for them."""

    text: str
    id: int
    logprobs: TokenLogprobs | None = None


@dataclass(frozen=True)
class Done:
    """The last event of a stream."""

    completion: Completion


@dataclass(frozen=True)
class Prefill:
    """The result of ``prefill_only``: the prompt is in the cache under ``finish_key``."""

    context_tokens: int
    finish_key: bytes | None
    cache_hit: str
    cache_delta: CacheDelta
