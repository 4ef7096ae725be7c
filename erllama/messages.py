"""The messages a model actor understands, for users who talk to it directly.

``erllama.whereis(model_id)`` returns the model's ``pykka.ActorRef``. ``ref.tell(Submit(req))``
starts a request whose events (``erllama.Token``, ``erllama.Done``, or an ``errors.*``
exception) go to ``req.sink``; every other message is a query: ``ref.ask(Tokenize("hi"))``
returns what the facade function of the same name returns, and raises its errors. Cancel is
out of band: ``req.cancelled.set()`` (a queued or running request ends at the next tick).

The message types are defined in :mod:`erllama.model.messages`, below the actor that
handles them; this module re-exports them with the request types.

Example::

    from erllama.messages import Request, RequestParams, Submit
    req = Request([2, 651, 6037], RequestParams(max_tokens=8), sink=print)
    erllama.whereis("m").tell(Submit(req))
"""

from __future__ import annotations

from erllama.model.messages import (
    ApplyChatTemplate,
    Detokenize,
    Embed,
    EndSession,
    Evict,
    LastCacheHit,
    ListAdapters,
    LoadAdapter,
    LongestPrefix,
    Phase,
    PromptKeys,
    QueueDepth,
    SetAdapterScale,
    Shutdown,
    Submit,
    Tokenize,
    UnloadAdapter,
)
from erllama.model.request import Request, RequestParams

__all__ = [
    "ApplyChatTemplate", "Detokenize", "Embed", "EndSession", "Evict", "LastCacheHit", "ListAdapters",
    "LoadAdapter", "LongestPrefix", "Phase", "PromptKeys", "QueueDepth", "Request", "RequestParams",
    "SetAdapterScale",
    "Shutdown", "Submit", "Tokenize", "UnloadAdapter",
]
