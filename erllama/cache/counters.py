"""Process-wide cache counters (SPEC 4.10, plus per-tier bytes and hits, demotions, promotions,
spilled saves and waits for room)."""

from __future__ import annotations

import threading

__all__ = ["COUNTER_NAMES", "Counters", "counters"]

COUNTER_NAMES: tuple[str, ...] = (
    "hits_exact", "hits_resume", "hits_longest_prefix", "misses", "hits_ram", "hits_ram_file", "hits_disk",
    "saves_cold", "saves_continued", "saves_finish", "saves_evict", "saves_shutdown",
    "saves_dropped", "saves_failed", "saves_spilled", "room_waits", "duplicate_dropped",
    "evictions", "demotions", "promotions", "corrupt_files", "foreign_files", "restores_failed",
    "pack_total_ns", "load_total_ns", "loads_crc_skipped", "longest_prefix_probes", "longest_prefix_ns",
    "bytes_ram", "bytes_ram_file", "bytes_disk", "shared_published", "shared_imports", "shared_failed",
    "hits_resident", "resident_kept", "resident_evictions", "resident_demotions", "pack_parked_ns",
    "continued_coalesced",
)

_GAUGES = frozenset({"bytes_ram", "bytes_ram_file", "bytes_disk"})


class Counters:
    """Named unsigned counters. Writers take a lock; :meth:`snapshot` is a copy.

    ``bytes_*`` are gauges (set by the tiers) and survive :meth:`reset`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(COUNTER_NAMES, 0)

    def add(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` (unknown names raise ``KeyError``)."""
        with self._lock:
            self._values[name] += n

    def set(self, name: str, value: int) -> None:
        """Set a gauge."""
        with self._lock:
            if name not in self._values:
                raise KeyError(name)
            self._values[name] = value

    def get(self, name: str) -> int:
        """One counter's value."""
        return self._values[name]

    def snapshot(self) -> dict[str, int]:
        """All counters as a new ``dict``."""
        with self._lock:
            return dict(self._values)

    def reset(self) -> None:
        """Zero every counter except the byte gauges."""
        with self._lock:
            for name in self._values:
                if name not in _GAUGES:
                    self._values[name] = 0


counters = Counters()
"""The process-wide counters that ``erllama.cache.counters()`` reports."""
