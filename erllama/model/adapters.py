"""A model's LoRA adapters: loaded handles, their scales, and the effective fingerprint.

llama.cpp applies adapters to a whole context, not to one sequence, so a change made while
requests decode would alter those requests half-way and their cache rows would be keyed
with the wrong fingerprint. Changes are therefore staged here and applied by the actor only
when no request is running (new admissions wait for that moment); every admitted request
runs under one adapter set from its first token to its last save.
"""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass
from typing import Any

from erllama import errors
from erllama.cache.key import effective_fingerprint

__all__ = ["AdapterSet"]

_handles = itertools.count(1)


@dataclass
class _Entry:
    path: str
    sha256: bytes
    scale: float
    native: Any


class AdapterSet:
    """Staged adapter changes of one backend (used from the model actor's thread only)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.entries: dict[str, _Entry] = {}  # application order
        self.applied: list[tuple[str, float]] = []
        self.to_free: list[Any] = []

    def load(self, path: str, sha256: bytes) -> str:
        """Load ``path`` (applied at scale 1.0 at the next barrier); returns its handle."""
        native = self.backend.load_adapter(path)
        handle = f"lora-{next(_handles)}"
        self.entries[handle] = _Entry(path, sha256, 1.0, native)
        return handle

    def unload(self, handle: str) -> None:
        """Detach and free ``handle`` at the next barrier (unknown handles are ignored)."""
        entry = self.entries.pop(handle, None)
        if entry is not None:
            self.to_free.append(entry.native)

    def set_scale(self, handle: str, scale: Any) -> None:
        """Change a scale; the entry moves to the end of the application order (SPEC 1.5)."""
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(float(scale)):
            raise errors.InvalidParameter(f"adapter scale must be a finite number, got {scale!r}")
        entry = self.entries.pop(handle, None)
        if entry is None:
            raise errors.AdapterNotFound(f"no adapter is loaded as {handle!r}")
        entry.scale = float(scale)
        self.entries[handle] = entry

    def listing(self) -> list[dict[str, Any]]:
        """``handle``, ``path`` and ``scale`` of each adapter, in application order."""
        return [{"handle": h, "path": e.path, "scale": e.scale} for h, e in self.entries.items()]

    @property
    def dirty(self) -> bool:
        """True when the staged set differs from the applied one."""
        return bool(self.to_free) or self.applied != [(h, e.scale) for h, e in self.entries.items()]

    def apply(self) -> None:
        """Put the staged set on the context and free unloaded adapters (no request may be
        running)."""
        self.backend.set_adapters([(e.native, e.scale) for e in self.entries.values()])
        self.applied = [(h, e.scale) for h, e in self.entries.items()]
        while self.to_free:
            self.backend.free_adapter(self.to_free.pop())

    def fingerprint(self, base: bytes) -> bytes:
        """The effective fingerprint of the applied set over ``base`` (SPEC 4.2)."""
        return effective_fingerprint(base, [(self.entries[h].sha256, s) for h, s in self.applied])
