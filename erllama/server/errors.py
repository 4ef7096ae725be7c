"""Errors in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the server answers is an :class:`APIError` with its HTTP status; an
``erllama.errors`` exception maps to one by :func:`from_erllama` (bad input is a 400,
never a 500).
"""

from __future__ import annotations

from typing import Any

from erllama import errors

__all__ = ["APIError", "from_erllama"]


class APIError(Exception):
    """An answer with ``status`` and an OpenAI error body; ``headers`` go with it
    (``Retry-After`` on a 503)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 naming the parameter."""
    return APIError(400, message, param=param, code=code)


def unavailable(message: str, retry_after: float, code: str = "unavailable") -> APIError:
    """A 503 with ``Retry-After`` (whole seconds, at least 1)."""
    return APIError(503, message, type="unavailable_error", code=code,
                    headers={"Retry-After": str(max(1, round(retry_after)))})


_BAD_INPUT = (errors.ConfigError, errors.InvalidToken, errors.EmptyPrompt, errors.InvalidContent,
              errors.GrammarError, errors.NoChatTemplate, errors.TemplateError, errors.BatchOverflow,
              errors.NotSupported)


def from_erllama(exc: BaseException, retry_after: float = 1.0) -> APIError:
    """The API error for an exception raised by erllama while serving a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, errors.ContextOverflow):
        return bad(str(exc), "messages", "context_length_exceeded")
    if isinstance(exc, _BAD_INPUT):
        return bad(str(exc))
    if isinstance(exc, errors.ModelNotFound):
        return APIError(404, str(exc), code="model_not_found", param="model")
    if isinstance(exc, errors.ModelCrashed):
        return unavailable(f"the model crashed and is restarting: {exc}", retry_after, "model_restarting")
    if isinstance(exc, errors.RequestTimeout):
        return APIError(408, str(exc), type="timeout_error", code="timeout")
    return APIError(500, f"{type(exc).__name__}: {exc}", type="server_error", code="internal_error")
