"""Streaming text assembly with stop sequences (SPEC 3.8), pure.

Token pieces arrive as bytes that may split UTF-8 characters; :class:`TextStream` decodes
them incrementally, finds the stop string that *completes* first (ties: the one that
starts first, i.e. the longest) even when it spans pieces, and holds back only the text
that could still become the start of a stop string, so a stream never shows a caller any part of a stop sequence.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from erllama import errors

__all__ = ["TextStream", "validate_stops"]


def validate_stops(stop: object) -> tuple[str, ...]:
    """Check a ``stop`` parameter: ``None``, a str or a list of non-empty str."""
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, Sequence) or isinstance(items, bytes):
        raise errors.InvalidParameter(f"stop must be a str or a list of str, got {type(stop).__name__}")
    out = []
    for i, s in enumerate(items):
        if not isinstance(s, str) or not s:
            raise errors.InvalidParameter(f"stop[{i}] must be a non-empty str, got {s!r}")
        out.append(s)
    return tuple(dict.fromkeys(out))


class TextStream:
    """Feed token pieces, get the text that is safe to show and the stop that matched.

    The result does not depend on how the bytes are split into pieces."""

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = validate_stops(list(stops))
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self.matched: str | None = None

    def _hold_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def feed(self, piece: bytes) -> str:
        """Add a token's bytes; return the text to emit now ("" once a stop matched)."""
        if self.matched is not None:
            return ""
        text = self._held + self._decoder.decode(piece)
        # the stop that completes first wins: unlike "leftmost" (SPEC 3.8), that answer does
        # not depend on how the text was split into pieces
        hit = None
        for s in self.stops:
            i = text.find(s)
            if i >= 0 and (hit is None or (i + len(s), i) < (hit[0] + len(hit[1]), hit[0])):
                hit = (i, s)
        if hit is not None:
            self.matched = hit[1]
            self._held = ""
            return text[: hit[0]]
        keep = self._hold_len(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """At the end without a match: the held-back text and any incomplete character."""
        if self.matched is not None:
            return ""
        out = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return out
