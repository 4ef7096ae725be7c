"""The backend contract: what a model actor needs from an inference engine.

One backend instance owns one model and one context with ``n_seq_max`` sequences. All
calls come from the model actor's single decode thread, except :meth:`Backend.request_abort`
which any thread may call. Errors are ``erllama.errors`` exceptions, as the native binding
raises them. Implementations: ``llama.LlamaBackend`` (the binding) and ``stub.StubBackend``
(deterministic, pure Python, for fast scheduler and actor tests).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["Backend", "SamplerParams", "chat_tokens"]

SamplerParams = dict[str, Any]
"""``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``, ``seed``, ``grammar``."""


@runtime_checkable
class Backend(Protocol):
    """The operations a model actor performs on its engine."""

    n_vocab: int
    ftype_name: str
    n_ctx_seq: int
    n_seq_max: int
    n_batch: int
    n_embd: int
    resident_seqs: tuple[int, ...]
    """Spare sequences for the resident tier (ids after the ``n_seq_max`` working ones;
    empty when the tier is off). They share one KV stream with the working sequences."""

    # vocabulary and text
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Text to token ids."""
        ...

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Token ids to text."""
        ...

    def token_piece(self, token: int) -> bytes:
        """The bytes one token renders as (possibly a partial UTF-8 sequence)."""
        ...

    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens."""
        ...

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], template: str | None = None,
                            add_assistant: bool = True) -> str:
        """Render chat messages with the model's template or a named one."""
        ...

    # decoding
    def step(self, rows: Iterable[tuple[int, Sequence[int]] | tuple[int, Sequence[int], bool]]) -> list[int]:
        """One decode of several sequences' rows; returns the sequences that produced logits."""
        ...

    def logits(self, seq_id: int, out: np.ndarray | None = None) -> np.ndarray:
        """Copy of the last-token logits of ``seq_id``."""
        ...

    def new_sampler(self, params: SamplerParams) -> Any:
        """A sampler chain for one request."""
        ...

    def sample(self, sampler: Any, seq_id: int) -> int:
        """Sample the next token of ``seq_id`` from the last step's logits."""
        ...

    def sample_logits(self, sampler: Any, logits: np.ndarray) -> int:
        """Sample from a stored logits buffer (an exact-hit restore)."""
        ...

    def free_sampler(self, sampler: Any) -> None:
        """Release a sampler (idempotent)."""
        ...

    # sequence state
    def state_get(self, seq_id: int) -> Any:
        """The KV state of ``seq_id``: a read-only bytes-like object (``bytes``, or an
        ``mmap`` shared with a worker process); compare it as ``bytes(...)``."""
        ...

    def state_set(self, seq_id: int, data: Any) -> int:
        """Restore a state into ``seq_id``; returns the positions restored."""
        ...

    def seq_clear(self, seq_id: int) -> None:
        """Empty ``seq_id``."""
        ...

    def n_past(self, seq_id: int) -> int:
        """Positions ``seq_id`` holds."""
        ...

    def seq_copy(self, src: int, dst: int) -> int:
        """Make ``dst`` hold exactly what ``src`` holds (shared KV cells, no data copy);
        returns the positions copied. Only where :attr:`resident_seqs` is not empty."""
        ...

    # embeddings and adapters
    def embed(self, tokens: Sequence[int], normalize: bool = True) -> np.ndarray:
        """The pooled embedding of ``tokens`` (float32, ``(n_embd,)``), computed on a
        dedicated embeddings context so the generation sequences are untouched."""
        ...

    def load_adapter(self, path: str) -> Any:
        """Load a LoRA adapter file; returns an opaque handle (not yet applied)."""
        ...

    def set_adapters(self, adapters: Sequence[tuple[Any, float]]) -> None:
        """Apply exactly these ``(handle, scale)`` pairs to the context (empty: none)."""
        ...

    def free_adapter(self, adapter: Any) -> None:
        """Release a loaded adapter (idempotent; detach it with ``set_adapters`` first)."""
        ...

    # cancel and lifetime
    def request_abort(self) -> None:
        """Interrupt the running (or the next) :meth:`step` from any thread: it raises
        ``errors.Aborted`` with every row rolled back."""
        ...

    def clear_abort(self) -> None:
        """Let decodes run again."""
        ...

    def close(self) -> None:
        """Free everything (idempotent)."""
        ...


def chat_tokens(vocab: Any, messages: Sequence[dict[str, Any]], add_assistant: bool = True) -> list[int]:
    """``messages`` rendered with ``vocab``'s chat template (a backend or a
    ``llama.Vocab``) and tokenized, special tokens parsed and BOS added once: the one
    definition of a chat prompt's tokens, so a router computes the same ids as the model."""
    text = vocab.apply_chat_template(list(messages), None, add_assistant)
    tokens = vocab.tokenize(text, False, True)
    bos = vocab.tokenize("", True, False)  # [] or [BOS]: add it unless the template did
    return tokens if tokens[: len(bos)] == bos else bos + tokens
