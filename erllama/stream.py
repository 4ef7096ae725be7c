"""``Stream``: the handle ``erllama.infer`` returns."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pykka

from erllama import errors
from erllama.types import Completion, Done, Token

__all__ = ["Stream", "StreamEnd"]

Event = Token | Done | BaseException


class StreamEnd:
    """How a stream ends, recorded once: its ``Done`` (``_completion``) or its error
    (``_error``, raised). Shared by :class:`Stream` and ``erllama.aio.AsyncStream``."""

    _ended: bool = False
    _error: BaseException | None = None
    _completion: Completion | None = None

    def _accept(self, event: Event) -> Token | Done:
        """Pass ``event`` on, recording the end (an error is raised here)."""
        if isinstance(event, BaseException):
            self._ended = True
            self._error = event
            raise event
        if isinstance(event, Done):
            self._ended = True
            self._completion = event.completion
        return event


class Stream(StreamEnd):
    """Iterate ``Token`` events then a final ``Done`` (sync or ``async for``); a failed
    request raises its error from the iteration. With a ``sink`` (a callable, a
    ``queue.Queue`` or a ``pykka.ActorRef``) events go there instead."""

    def __init__(self, request_id: int, cancel: Callable[[], None], sink: Any = None) -> None:
        self.request_id = request_id
        self._cancel = cancel
        self._queue: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._sink = sink
        self._completion: Completion | None = None
        self._error: BaseException | None = None
        self._ended = False
        self._wake: Callable[[], None] | None = None  # an async reader's wake-up, while it reads

    def _push(self, event: Event) -> None:
        sink = self._sink
        if sink is None:
            self._queue.put(event)
            wake = self._wake
            if wake is not None:
                wake()
        elif isinstance(sink, pykka.ActorRef):
            try:
                sink.tell(event)
            except pykka.ActorDeadError:
                self._cancel()
        elif isinstance(sink, queue.Queue):
            sink.put(event)
        else:
            sink(event)  # a raising sink cancels its request (model.request.Request.sink)

    def cancel(self) -> None:
        """Stop the request (queued or running); the stream ends with ``finish_reason="cancelled"``."""
        self._cancel()

    def __iter__(self) -> Iterator[Token | Done]:
        if self._sink is not None:
            raise errors.InvalidParameter("this stream sends its events to a sink; it cannot be iterated")
        if self._error is not None:
            raise self._error
        while not self._ended:
            yield self._accept(self._queue.get())

    async def __aiter__(self) -> AsyncIterator[Token | Done]:
        """The events without a thread: the model actor wakes the loop when it queues one
        (``erllama.aio`` streams also cancel their request when the reader goes away)."""
        if self._sink is not None:
            raise errors.InvalidParameter("this stream sends its events to a sink; it cannot be iterated")
        if self._error is not None:
            raise self._error
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # the loop is closed: nobody reads any more
                pass

        self._wake = wake
        try:
            while not self._ended:
                try:
                    event = self._queue.get_nowait()
                except queue.Empty:
                    ready.clear()
                    if self._queue.empty():  # checked after the clear: no wake-up is lost
                        await ready.wait()
                    continue
                yield self._accept(event)
        finally:
            self._wake = None

    def result(self) -> Completion:
        """Drain the stream and return its ``Completion`` (raises the request's error)."""
        for _ in self:
            pass
        if self._completion is None:
            raise errors.ErllamaError("the stream ended without a result")
        return self._completion
