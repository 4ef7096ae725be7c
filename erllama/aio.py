"""The facade for asyncio: ``await aio.complete(...)``, ``async for ev in aio.infer(...)``.

A stream's events reach the event loop without a thread per request and without polling:
the model actor hands each event to ``loop.call_soon_threadsafe`` and the awaiting
``__anext__`` wakes. Cancelling the awaiting task, closing the stream (``aclose``, the end
of an ``async with`` block) or dropping it unfinished cancels the request in the model
actor, as ``Stream.cancel`` does (a prompt being prefilled is interrupted within about one
ubatch).

A slow consumer never stalls the model: the actor never waits for the loop. Each stream
buffers at most ``buffer`` unread tokens (1024 by default); when a consumer falls that far
behind, the request is cancelled (its sequence goes to the next request) and, after the
tokens already buffered, the stream raises :class:`errors.SlowConsumer`.

The short calls (``tokenize``, ``embed``, ``load_model``, ...) are actor asks that block a
thread; they run on one small pool shared by the process (``erllama-aio``, 8 threads), never
on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

import erllama
from erllama import errors
from erllama.stream import Stream, StreamEnd
from erllama.types import Completion, Done, Prefill, Token

Prompt = str | Sequence[int]

__all__ = ["DEFAULT_BUFFER", "AsyncStream", "apply_chat_template", "complete", "detokenize", "embed", "infer",
           "load_model", "prefill_only", "tokenize", "unload"]

DEFAULT_BUFFER = 1024
"""Unread tokens a stream holds before its request is cancelled as too slow to consume."""

T = TypeVar("T")
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(8, thread_name_prefix="erllama-aio")
        return _pool


async def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor(), functools.partial(fn, *args, **kwargs))


class AsyncStream(StreamEnd):
    """The events of one request for ``async for``: ``Token`` events, then ``Done`` (a
    failed request raises its error instead). ``request_id`` names it for
    ``erllama.cancel``; :meth:`result` drains it to its ``Completion``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, buffer: int) -> None:
        if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
            raise errors.InvalidParameter(f"buffer must be an int >= 1, got {buffer!r}")
        self._loop = loop
        self._limit = buffer
        self._events: collections.deque[Token | Done | BaseException] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._lock = threading.Lock()
        self._unread = 0
        self._overflowed = False
        self._stream: Stream | None = None
        self.request_id = 0

    # ---- the model actor's side (its thread) ----------------------------------------------------

    def _deliver(self, event: Token | Done | BaseException) -> None:
        with self._lock:
            if self._overflowed:
                return
            if isinstance(event, Token) and self._unread >= self._limit:
                self._overflowed = True
                event = errors.SlowConsumer(
                    f"request {self.request_id}: its consumer left {self._limit} tokens unread; the request was "
                    f"cancelled so that it does not hold a sequence (read faster, or pass a larger buffer=)")
            self._unread += 1
        try:
            self._loop.call_soon_threadsafe(self._put, event)
        except RuntimeError:  # the loop is closed: nobody will read this stream
            self.cancel()
            return
        if isinstance(event, errors.SlowConsumer):
            self.cancel()

    # ---- the event loop's side ------------------------------------------------------------------

    def _put(self, event: Token | Done | BaseException) -> None:
        self._events.append(event)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Token | Done:
        if self._ended:
            raise StopAsyncIteration
        while not self._events:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            except asyncio.CancelledError:
                self.cancel()
                raise
            finally:
                self._waiter = None
        event = self._events.popleft()
        with self._lock:
            self._unread -= 1
        return self._accept(event)

    def cancel(self) -> None:
        """Cancel the request (any thread; idempotent): the stream ends with a ``Done``
        whose ``finish_reason`` is ``"cancelled"``."""
        if self._stream is not None:
            self._stream.cancel()

    async def aclose(self) -> None:
        """Stop reading: an unfinished request is cancelled."""
        if not self._ended:
            self.cancel()
            self._ended = True

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if not self._ended and getattr(self, "_stream", None) is not None:  # dropped unfinished
            self.cancel()

    async def result(self) -> Completion:
        """Read the stream to its end and return the ``Completion`` (raises the request's
        error; a cancelled awaiting task cancels the request)."""
        async for _ in self:
            pass
        if self._completion is None:
            raise errors.Released(f"request {self.request_id}: the stream was closed before it finished")
        return self._completion


def infer(model_id: str, prompt: Prompt, *, buffer: int = DEFAULT_BUFFER, **params: Any) -> AsyncStream:
    """Start a request (from a running event loop) and return its :class:`AsyncStream` at
    once; the parameters are ``erllama.infer``'s."""
    stream = AsyncStream(asyncio.get_running_loop(), buffer)
    stream._stream = erllama.infer(model_id, prompt, sink=stream._deliver, **params)
    stream.request_id = stream._stream.request_id
    return stream


async def complete(model_id: str, prompt: Prompt, **params: Any) -> Completion:
    """Run a request to its end; cancelling the awaiting task cancels the request."""
    return await infer(model_id, prompt, **params).result()


async def prefill_only(model_id: str, prompt: Prompt, *, parent_key: bytes | None = None,
                       session_id: str | None = None) -> Prefill:
    """``erllama.prefill_only`` for asyncio (a cancelled task cancels the prefill)."""
    done = await complete(model_id, prompt, prefill_only=True, parent_key=parent_key, session_id=session_id)
    return Prefill(done.context_tokens, done.finish_key, done.cache_hit, done.cache_delta)


async def tokenize(model_id: str, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
    """``erllama.tokenize`` off the event loop's thread."""
    return await _call(erllama.tokenize, model_id, text, add_special=add_special, parse_special=parse_special)


async def detokenize(model_id: str, tokens: Sequence[int]) -> str:
    """``erllama.detokenize`` off the event loop's thread."""
    return await _call(erllama.detokenize, model_id, tokens)


async def apply_chat_template(model_id: str, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> list[int]:
    """``erllama.apply_chat_template`` off the event loop's thread."""
    return await _call(erllama.apply_chat_template, model_id, messages, **kwargs)


async def embed(model_id: str, text_or_tokens: Prompt, *, normalize: bool = True) -> np.ndarray:
    """``erllama.embed`` off the event loop's thread."""
    return await _call(erllama.embed, model_id, text_or_tokens, normalize=normalize)


async def load_model(path: str | os.PathLike[str], *, model_id: str | None = None, **options: Any) -> str:
    """``erllama.load_model`` off the event loop's thread."""
    return await _call(erllama.load_model, path, model_id=model_id, **options)


async def unload(model_id: str) -> None:
    """``erllama.unload`` off the event loop's thread."""
    await _call(erllama.unload, model_id)
