"""erllama: llama.cpp in an OTP-style supervision tree, with a token-exact KV-state cache.

The facade functions import the application lazily, so ``erllama.errors`` (and this
module) import without the compiled extension.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from erllama import cache, errors
from erllama._version import __version__
from erllama.types import CacheDelta, Completion, Done, Prefill, Stats, Token, TokenLogprobs

if TYPE_CHECKING:
    import numpy as np
    import pykka

    from erllama.app import Application, ModelInfo
    from erllama.config import AppConfig
    from erllama.stream import Stream

T = TypeVar("T")
Prompt = str | Sequence[int]
"""A prompt: text, or token ids."""

__all__ = [
    "AppConfig", "CacheDelta", "Completion", "Done", "ModelConfig", "Prefill", "Stats", "Token", "TokenLogprobs",
    "__version__",
    "apply_chat_template", "cache", "cancel", "complete", "detokenize", "embed", "end_session", "errors", "evict",
    "health", "infer",
    "last_cache_hit", "list_adapters", "list_models", "load_adapter", "load_model", "model_info", "pending_len",
    "phase", "prefill_only", "prompt_keys", "queue_depth", "running", "set_adapter_scale", "shutdown", "start",
    "status", "stop",
    "system_info", "tokenize", "tree", "unload", "unload_adapter", "whereis",
]


def __getattr__(name: str) -> Any:
    if name in ("AppConfig", "ModelConfig"):
        from erllama import config

        return getattr(config, name)
    if name == "messages":
        import importlib

        return importlib.import_module("erllama.messages")
    raise AttributeError(f"module 'erllama' has no attribute {name!r}")


def system_info(*, check: bool = True, refresh: bool = False) -> dict[str, Any]:
    """What this runtime is: llama.cpp's system info, the CPU features compiled in and the
    ones the CPU has, the build's flags, source and build-cache key, and (``check``) the
    outcome of the runtime self-check (see :mod:`erllama.sysinfo`)."""
    from erllama import sysinfo

    return sysinfo.system_info(check=check, refresh=refresh)


def _app() -> Application:
    from erllama import app

    return app.current()


def start(config: AppConfig | None = None, **overrides: Any) -> Application:
    """Start the application tree (or return the running one)."""
    from erllama import app

    return app.start(config, **overrides)


def stop(timeout: float = 30.0) -> None:
    """Stop the application: models, then the cache (idempotent)."""
    from erllama import app

    app.stop(timeout)


@contextlib.contextmanager
def running(config: AppConfig | None = None, **overrides: Any) -> Iterator[Application]:
    """``start`` on enter, ``stop`` on exit; raises ``errors.ErllamaError`` on exit when
    the tree failed meanwhile (an escalation reached the root), instead of half-running."""
    application = start(config, **overrides)
    try:
        yield application
    finally:
        failure = application.failure
        stop()
    if failure is not None:
        raise errors.ErllamaError(failure)


def tree(text: bool = True) -> str | dict[str, Any]:
    """The live supervision tree of the running application: each supervisor with its
    strategy and intensity, its children with their type, restart type, actor, thread,
    status and restart count. A string (``text``) or nested dicts."""
    from erllama import app

    node = _app().tree()
    return app.format_tree(node) if text else node


def health() -> dict[str, Any]:
    """Whether the application runs: ``{"state": "running" | "failed", "failure": why or
    None, "restarts": {root child: restarts}}`` (works after a failure too)."""
    from erllama import app

    a = app.current()
    try:
        restarts = {c.id: c.restarts for c in _root_status(a.root).children}
    except Exception:
        restarts = {}
    return {"state": "failed" if a.failure else "running", "failure": a.failure, "restarts": restarts}


def _root_status(ref: pykka.ActorRef[Any]) -> Any:
    import supervision

    return supervision.inspect(ref, timeout=5.0)


def load_model(path: str | os.PathLike[str], *, model_id: str | None = None, **options: Any) -> str:
    """Load a GGUF model under ``model_id`` (generated when None); returns the id."""
    return _app().load_model(path, model_id, options)


def unload(model_id: str) -> None:
    """Stop and free a model."""
    _app().unload(model_id)


def list_models() -> list[ModelInfo]:
    """``ModelInfo`` of every loaded model."""
    a = _app()
    return [a.info(m) for m in a.model_ids()]


def model_info(model_id: str) -> ModelInfo:
    """``ModelInfo`` of one model."""
    return _app().info(model_id)


def _ask(model_id: str, message: Any, kind: type[T], timeout: float = 60.0) -> T:
    return cast(T, _app().ref(model_id).ask(message, timeout=timeout))


def status(model_id: str) -> str:
    """``idle``, ``prefilling`` or ``generating`` (a lock-free read)."""
    return _app().info(model_id).phase


phase = status


def pending_len(model_id: str) -> int:
    """Requests of the model waiting for a sequence (a lock-free read)."""
    return _app().info(model_id).pending_len


def last_cache_hit(model_id: str) -> tuple[str, int] | None:
    """``(kind, prefix_len)`` of the model's last admission, or None (a lock-free read)."""
    return _app().info(model_id).last_cache_hit


def queue_depth(model_id: str | None = None) -> int:
    """Requests waiting for a sequence: of one model, or of all models."""
    app = _app()
    if model_id is not None:
        return app.info(model_id).pending_len
    return sum(app.info(m).pending_len for m in app.model_ids())


def evict(model_id: str) -> int:
    """Synchronously save every live sequence of the model (reason ``evict``)."""
    from erllama.messages import Evict

    return _ask(model_id, Evict(), int, timeout=120)


def shutdown(model_id: str) -> int:
    """Synchronously save every live sequence of the model (reason ``shutdown``)."""
    from erllama.messages import Shutdown

    return _ask(model_id, Shutdown(), int, timeout=120)


def whereis(model_id: str) -> pykka.ActorRef[Any]:
    """The live model actor."""
    return _app().ref(model_id)


def infer(model_id: str, prompt: Prompt, *, sink: Any = None, **params: Any) -> Stream:
    """Start a request and return its ``Stream`` at once (even when it is queued)."""
    return _app().submit(model_id, prompt, params, sink)


def complete(model_id: str, prompt: Prompt, **params: Any) -> Completion:
    """Run a request to the end and return its ``Completion``."""
    return infer(model_id, prompt, **params).result()


def prefill_only(model_id: str, prompt: Prompt, *, parent_key: bytes | None = None,
                 session_id: str | None = None) -> Prefill:
    """Prefill ``prompt`` into the cache without generating; returns its ``finish_key``."""
    done = _app().submit(model_id, prompt, {"prefill_only": True, "parent_key": parent_key,
                                            "session_id": session_id}, None).result()
    return Prefill(done.context_tokens, done.finish_key, done.cache_hit, done.cache_delta)


def prompt_keys(model_id: str, tokens: Sequence[int], lengths: Sequence[int], *,
                namespace: bytes | None = None) -> dict[int, bytes]:
    """The cache keys of ``tokens[:n]`` for each ``n`` of ``lengths`` within ``tokens``,
    under the model's current key (and a request ``namespace``): ``{n: key}``. With
    ``erllama.cache.rows_of`` of each replica, what prefix-aware routing scores
    (``erllama.ray.routing``)."""
    from erllama.messages import PromptKeys

    return _ask(model_id, PromptKeys(list(tokens), list(lengths), namespace), dict)


def cancel(request_id: int) -> None:
    """Cancel a queued or running request (idempotent)."""
    _app().cancel(request_id)


def tokenize(model_id: str, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
    """Tokenize with the model's vocabulary."""
    from erllama.messages import Tokenize

    return _ask(model_id, Tokenize(text, add_special, parse_special), list)


def detokenize(model_id: str, tokens: Sequence[int]) -> str:
    """Render token ids as text."""
    from erllama.messages import Detokenize

    return _ask(model_id, Detokenize(list(tokens)), str)


def apply_chat_template(model_id: str, messages: Sequence[Mapping[str, Any]], *, system: str | None = None,
                        tools: Sequence[Mapping[str, Any]] | None = None,
                        add_assistant: bool = True) -> list[int]:
    """Render chat ``messages`` (``{"role", "content"}`` dicts) with the model's template (or
    its configured ``chat_template``) and tokenize the result, special tokens parsed and BOS
    added once. ``system`` becomes a leading system message; ``tools`` (dicts with ``name``,
    ``description``, ``schema``) are described to the model in that system message as JSON,
    since llama.cpp's built-in templates have no tool slot."""
    import json

    from erllama.messages import ApplyChatTemplate

    if not isinstance(messages, list | tuple):
        raise errors.InvalidContent(f"messages must be a list of dicts, got {type(messages).__name__}")
    msgs = list(messages)
    preamble = []
    if system is not None:
        if not isinstance(system, str):
            raise errors.InvalidContent(f"system must be a str, got {type(system).__name__}")
        preamble.append(system)
    if tools:
        try:
            preamble.append("You can call these tools (JSON):\n" + json.dumps(list(tools), sort_keys=True))
        except (TypeError, ValueError) as exc:
            raise errors.InvalidContent(f"tools must be JSON-serialisable dicts: {exc}") from None
    if preamble:
        msgs.insert(0, {"role": "system", "content": "\n\n".join(preamble)})
    return _ask(model_id, ApplyChatTemplate(msgs, add_assistant), list)


def embed(model_id: str, text_or_tokens: Prompt, *, normalize: bool = True) -> np.ndarray:
    """The pooled embedding (``numpy.ndarray``, float32, ``(n_embd,)``), computed on the
    model's dedicated embeddings context (created on first use)."""
    from erllama.messages import Embed

    value = text_or_tokens if isinstance(text_or_tokens, str) else list(text_or_tokens)
    import numpy as np

    return _ask(model_id, Embed(value, normalize), np.ndarray)


def load_adapter(model_id: str, path: str | os.PathLike[str]) -> str:
    """Load a LoRA adapter at scale 1.0; returns its handle. Requests admitted from now on
    run with it (running requests finish under the old set first), and their cache rows
    are keyed by the new effective fingerprint. Under ``isolation="probe"`` a child process
    loads and applies the adapter first (``errors.MalformedGGUF`` if it dies on it)."""
    from erllama.backend.factory import check_adapter
    from erllama.cache.fingerprint import file_sha256
    from erllama.messages import LoadAdapter

    app = _app()
    info = app.info(model_id)  # ModelNotFound before any work
    path = os.fspath(path)
    digest = file_sha256(path)  # FileNotFoundError names the path
    check_adapter(info.path, path, info.config, cache_dir=app.config.cache_dir)
    return _ask(model_id, LoadAdapter(path, digest), str, timeout=600)


def unload_adapter(model_id: str, handle: str) -> None:
    """Detach and free an adapter (an unknown handle is ignored)."""
    from erllama.messages import UnloadAdapter

    _ask(model_id, UnloadAdapter(handle), object)


def set_adapter_scale(model_id: str, handle: str, scale: float) -> None:
    """Change an adapter's scale (``errors.AdapterNotFound`` for an unknown handle)."""
    from erllama.messages import SetAdapterScale

    _ask(model_id, SetAdapterScale(handle, scale), object)


def list_adapters(model_id: str) -> list[dict[str, Any]]:
    """``[{"handle", "path", "scale"}]`` in application order."""
    from erllama.messages import ListAdapters

    return _ask(model_id, ListAdapters(), list)


def end_session(model_id: str, session_id: str) -> None:
    """Release a sticky session's sequence (idempotent)."""
    from erllama.messages import EndSession

    _ask(model_id, EndSession(session_id), object)
