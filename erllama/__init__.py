"""erllama: llama.cpp in an OTP-style supervision tree, with a token-exact KV-state cache.

The facade functions import the application lazily, so ``erllama.errors`` (and this
module) import without the compiled extension.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from erllama import errors
from erllama.types import CacheDelta, Completion, Done, Prefill, Stats, Token

__version__ = "0.1.0"

__all__ = [
    "CacheDelta", "Completion", "Done", "Prefill", "Stats", "Token", "__version__", "cancel", "complete",
    "detokenize", "errors", "evict", "infer", "prefill_only", "shutdown", "list_models", "load_model", "model_info", "phase", "queue_depth",
    "running", "start", "status", "stop", "tokenize", "unload", "whereis",
]


def _app() -> Any:
    from erllama import app

    return app.current()


def start(config: Any = None, **overrides: Any) -> Any:
    """Start the application tree (or return the running one)."""
    from erllama import app

    return app.start(config, **overrides)


def stop(timeout: float = 30.0) -> None:
    """Stop the application: models, then the cache (idempotent)."""
    from erllama import app

    app.stop(timeout)


@contextlib.contextmanager
def running(config: Any = None, **overrides: Any) -> Iterator[Any]:
    """``start`` on enter, ``stop`` on exit."""
    application = start(config, **overrides)
    try:
        yield application
    finally:
        stop()


def load_model(path: Any, *, model_id: str | None = None, **options: Any) -> str:
    """Load a GGUF model under ``model_id`` (generated when None); returns the id."""
    return _app().load_model(path, model_id, options)


def unload(model_id: str) -> None:
    """Stop and free a model."""
    _app().unload(model_id)


def list_models() -> list[Any]:
    """``ModelInfo`` of every loaded model."""
    a = _app()
    return [a.info(m) for m in list(a.models)]


def model_info(model_id: str) -> Any:
    """``ModelInfo`` of one model."""
    return _app().info(model_id)


def status(model_id: str) -> str:
    """``idle``, ``prefilling`` or ``generating``."""
    return _app().info(model_id).phase


phase = status


def queue_depth(model_id: str) -> int:
    """Requests waiting for a sequence."""
    return _app().info(model_id).pending_len


def evict(model_id: str) -> int:
    """Synchronously save every live sequence of the model (reason ``evict``)."""
    return _app().ref(model_id).ask("evict", timeout=120)


def shutdown(model_id: str) -> int:
    """Synchronously save every live sequence of the model (reason ``shutdown``)."""
    return _app().ref(model_id).ask("shutdown", timeout=120)


def whereis(model_id: str) -> Any:
    """The live model actor."""
    return _app().ref(model_id)


def infer(model_id: str, prompt: Any, *, sink: Any = None, **params: Any) -> Any:
    """Start a request and return its ``Stream`` at once (even when it is queued)."""
    return _app().submit(model_id, prompt, params, sink)


def complete(model_id: str, prompt: Any, **params: Any) -> Completion:
    """Run a request to the end and return its ``Completion``."""
    return infer(model_id, prompt, **params).result()


def prefill_only(model_id: str, prompt: Any, *, parent_key: bytes | None = None,
                 session_id: str | None = None) -> Prefill:
    """Prefill ``prompt`` into the cache without generating; returns its ``finish_key``."""
    done = _app().submit(model_id, prompt, {"prefill_only": True, "parent_key": parent_key,
                                            "session_id": session_id}, None).result()
    return Prefill(done.context_tokens, done.finish_key, done.cache_hit, done.cache_delta)


def cancel(request_id: int) -> None:
    """Cancel a queued or running request (idempotent)."""
    _app().cancel(request_id)


def tokenize(model_id: str, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
    """Tokenize with the model's vocabulary."""
    return _app().ref(model_id).ask(("tokenize", text, add_special, parse_special))


def detokenize(model_id: str, tokens: Any) -> str:
    """Render token ids as text."""
    return _app().ref(model_id).ask(("detokenize", list(tokens)))
