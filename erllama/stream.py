"""``Stream``: the handle ``erllama.infer`` returns."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pykka

from erllama import errors
from erllama.types import Completion, Done, Token

__all__ = ["Stream"]

Event = Token | Done | BaseException


class Stream:
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

    def _push(self, event: Event) -> None:
        sink = self._sink
        if sink is None:
            self._queue.put(event)
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
            event = self._queue.get()
            if isinstance(event, BaseException):
                self._ended = True
                self._error = event
                raise event
            if isinstance(event, Done):
                self._ended = True
                self._completion = event.completion
            yield event

    async def __aiter__(self) -> AsyncIterator[Token | Done]:
        loop = asyncio.get_running_loop()
        it = iter(self)
        sentinel: Any = object()
        while True:
            event: Token | Done = await loop.run_in_executor(None, next, it, sentinel)
            if event is sentinel:
                return
            yield event

    def result(self) -> Completion:
        """Drain the stream and return its ``Completion`` (raises the request's error)."""
        for _ in self:
            pass
        if self._completion is None:
            raise errors.ErllamaError("the stream ended without a result")
        return self._completion
