"""The messages a model actor understands (defined here, below the actor that handles them).

:mod:`erllama.messages` is the public place: it re-exports these together with
:class:`~erllama.model.request.Request` and :class:`~erllama.model.request.RequestParams`,
and documents how to send them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from erllama.model.request import Request

__all__ = [
    "ApplyChatTemplate", "Detokenize", "Embed", "EndSession", "Evict", "LastCacheHit", "ListAdapters",
    "LoadAdapter", "LongestPrefix", "Phase", "PromptKeys", "QueueDepth", "SetAdapterScale",
    "Shutdown", "Submit", "Tokenize", "UnloadAdapter",
]


@dataclass(frozen=True)
class Submit:
    """Admit a request (tell); its events go to ``request.sink``."""

    request: Request


@dataclass(frozen=True)
class Phase:
    """``"idle" | "prefilling" | "generating"``."""


@dataclass(frozen=True)
class QueueDepth:
    """Requests waiting for a sequence (int)."""


@dataclass(frozen=True)
class LastCacheHit:
    """``(kind, prefix_len)`` of the last admission, or ``None`` before the first."""


@dataclass(frozen=True)
class Tokenize:
    """Text to token ids."""

    text: str
    add_special: bool = True
    parse_special: bool = False


@dataclass(frozen=True)
class Detokenize:
    """Token ids to text."""

    tokens: Sequence[int]


@dataclass(frozen=True)
class ApplyChatTemplate:
    """Render ``messages`` with the model's template (or the configured one); returns tokens."""

    messages: Sequence[dict[str, Any]]
    add_assistant: bool = True


@dataclass(frozen=True)
class Embed:
    """The pooled embedding of text or token ids (``numpy.ndarray``, float32, ``(n_embd,)``)."""

    input: str | Sequence[int]
    normalize: bool = True


@dataclass(frozen=True)
class LoadAdapter:
    """Load a LoRA adapter at scale 1.0; ``sha256`` is the file's digest (the cache
    fingerprint's input). Returns the handle (str)."""

    path: str
    sha256: bytes


@dataclass(frozen=True)
class UnloadAdapter:
    """Detach and free an adapter (an unknown handle is ignored)."""

    handle: str


@dataclass(frozen=True)
class SetAdapterScale:
    """Change an adapter's scale (an unknown handle raises ``errors.AdapterNotFound``)."""

    handle: str
    scale: float


@dataclass(frozen=True)
class ListAdapters:
    """``[{"handle", "path", "scale"}]`` in application order."""


@dataclass(frozen=True)
class EndSession:
    """Release a sticky session's sequence (idempotent; a busy session ends when its
    request finishes)."""

    session_id: str


@dataclass(frozen=True)
class LongestPrefix:
    """Length of the longest cached prefix of ``tokens`` for this model's current key."""

    tokens: Sequence[int] = field(default_factory=list)


@dataclass(frozen=True)
class PromptKeys:
    """The cache keys of ``tokens[:n]`` for each ``n`` of ``lengths`` within the prompt,
    under this model's current key (and a request ``namespace``): ``{n: key}``."""

    tokens: Sequence[int] = field(default_factory=list)
    lengths: Sequence[int] = field(default_factory=list)
    namespace: bytes | None = None


@dataclass(frozen=True)
class Evict:
    """Synchronously save every live sequence (reason ``evict``); returns rows saved."""


@dataclass(frozen=True)
class Shutdown:
    """Synchronously save every live sequence (reason ``shutdown``); returns rows saved."""
