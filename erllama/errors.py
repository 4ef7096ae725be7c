"""The erllama exception hierarchy.

Every error a user can cause or the runtime can suffer is an :class:`ErllamaError`
subclass whose message names the problem and the offending value. This module imports
nothing from the compiled extension, so callers can catch these errors before (or
without) the native layer being built.
"""

from __future__ import annotations

__all__ = [
    "ErllamaError",
    "ModelNotFound",
    "AlreadyLoaded",
    "AlreadyStarted",
    "LoadFailed",
    "MalformedGGUF",
    "ContextFailed",
    "ModelCrashed",
    "WorkerDied",
    "ContextOverflow",
    "BatchOverflow",
    "InvalidToken",
    "EmptyPrompt",
    "InvalidContent",
    "NoChatTemplate",
    "TemplateError",
    "GrammarError",
    "NotSupported",
    "Released",
    "SessionBusy",
    "AdapterNotFound",
    "RequestTimeout",
    "SlowConsumer",
    "ConfigError",
    "InvalidParameter",
    "NotPrivate",
    "CacheInUse",
    "CacheError",
    "DecodeFailed",
    "Aborted",
    "NoLogits",
    "StateError",
    "NativeError",
    "RuntimeBroken",
]


class ErllamaError(Exception):
    """Base class of every erllama error."""


class ModelNotFound(ErllamaError, LookupError):
    """No model is loaded under the given id."""


class AlreadyLoaded(ErllamaError):
    """A model is already loaded under the given id."""


class AlreadyStarted(ErllamaError):
    """The application is running with a configuration that conflicts with the request."""


class LoadFailed(ErllamaError):
    """A model or adapter could not be loaded (out of memory, I/O error, unsupported file)."""


class MalformedGGUF(LoadFailed):
    """The file is not a valid GGUF, or its contents are inconsistent."""


class ContextFailed(ErllamaError):
    """llama.cpp refused to create a context with the given parameters."""


class ModelCrashed(ErllamaError):
    """The model's actor or worker process died while the request was in flight."""


class WorkerDied(ModelCrashed):
    """The worker process of an ``isolation="process"`` model is gone (killed by a signal,
    exited, or its channel broke). ``signal`` is the signal's name (``"SIGKILL"``) or None;
    ``exitcode`` the exit status when it exited normally, else None."""

    def __init__(self, message: str, *, signal: str | None = None, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.signal = signal
        self.exitcode = exitcode

    def __reduce__(self):  # keep the attributes through pickling (keyword-only arguments)
        return (_worker_died, (self.args[0] if self.args else "", self.signal, self.exitcode))


class ContextOverflow(ErllamaError, ValueError):
    """The tokens do not fit in the sequence's context window."""


class BatchOverflow(ErllamaError, ValueError):
    """More tokens were submitted in one step than the context's ``n_batch`` allows."""


class InvalidToken(ErllamaError, ValueError):
    """A token id is negative or not below the model's vocabulary size."""


class EmptyPrompt(ErllamaError, ValueError):
    """A prompt or a batch row holds no tokens."""


class InvalidContent(ErllamaError, TypeError):
    """A chat message has a role or content that is not a string."""


class NoChatTemplate(ErllamaError):
    """The model has no chat template and no fallback template was named."""


class TemplateError(ErllamaError):
    """llama.cpp could not apply the chat template (unknown name or unsupported Jinja)."""


class GrammarError(ErllamaError, ValueError):
    """The GBNF grammar does not parse."""


class NotSupported(ErllamaError):
    """The operation is not supported by this model, backend or build."""


class Released(ErllamaError):
    """The native object was freed; it cannot be used any more."""


class SessionBusy(ErllamaError):
    """The sticky session is serving another request."""


class AdapterNotFound(ErllamaError, LookupError):
    """No adapter is loaded under this handle."""


class RequestTimeout(ErllamaError, TimeoutError):
    """The request did not finish within its ``timeout`` (it was cancelled)."""


class SlowConsumer(ErllamaError):
    """An asyncio consumer fell so far behind its stream that the request was cancelled
    (``erllama.aio``: ``buffer`` unread tokens); the tokens read before it are valid."""


class ConfigError(ErllamaError, ValueError):
    """A configuration value is invalid; the message names the field and the value."""


class InvalidParameter(ConfigError):
    """A call parameter is invalid; the message names the parameter and the value."""


class NotPrivate(ConfigError, PermissionError):
    """A directory or file the cache would use is not this user's alone: owned by another
    user, a symbolic link, not a directory (or regular file), or writable by others. The
    message names the path and what is wrong; erllama never changes another user's path."""


class CacheInUse(ConfigError):
    """A cache tier directory is locked by another running erllama application (two
    applications cannot share a tier: each would count, evict and rebuild the other's rows)."""


class CacheError(ErllamaError):
    """A KV-cache operation failed."""


class DecodeFailed(ErllamaError):
    """``llama_decode`` failed; the sequences involved were rolled back to their state before the step."""


class Aborted(DecodeFailed):
    """A decode was interrupted by the context's abort flag (cancel)."""


class NoLogits(ErllamaError):
    """Sampling was asked of a sequence that produced no logits in the last step."""


class StateError(ErllamaError):
    """A sequence state blob could not be read or written."""


class NativeError(ErllamaError):
    """llama.cpp raised a C++ exception the binding did not expect; the message names the call."""


class RuntimeBroken(NativeError):
    """This build of erllama cannot decode on this CPU: a child process died on a model file
    *and* on the known-good self-check model (see ``erllama doctor``). The file is not to
    blame (this is deliberately not a :class:`MalformedGGUF`). ``signal`` names the signal
    that killed the self-check, ``stage`` where it died, ``features`` the CPU features the
    build has compiled in."""

    def __init__(self, message: str, *, signal: str | None = None, stage: str | None = None,
                 features: list[str] | None = None) -> None:
        super().__init__(message)
        self.signal = signal
        self.stage = stage
        self.features = list(features or ())

    def __reduce__(self):  # keep the attributes through pickling (keyword-only arguments)
        return (_runtime_broken, (self.args[0] if self.args else "", self.signal, self.stage, self.features))


def _runtime_broken(message: str, signal: str | None, stage: str | None, features: list[str]) -> RuntimeBroken:
    return RuntimeBroken(message, signal=signal, stage=stage, features=features)


def _worker_died(message: str, signal: str | None, exitcode: int | None) -> WorkerDied:
    return WorkerDied(message, signal=signal, exitcode=exitcode)
