"""The pure half of the memory-pressure poller (SPEC 5): the memory sources, the settings
(:class:`PressureConfig`) and the decision (:func:`decide`).

No actor lives here, so the application's configuration (:mod:`erllama.config`) can build
and validate a :class:`PressureConfig` without importing the poller;
:mod:`erllama.cache.pressure` re-exports every name. See that module for the differences
from the original.
"""

from __future__ import annotations

import logging
import math
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import psutil

from erllama import errors
from erllama.types import TIERS

__all__ = [
    "EVICT_TIERS",
    "SOURCES",
    "PressureConfig",
    "Source",
    "decide",
    "noop_source",
    "nvidia_smi_source",
    "resolve_source",
    "system_source",
]

logger = logging.getLogger("erllama.cache.pressure")

MiB = 1024 * 1024

EVICT_TIERS: frozenset[str] = frozenset(TIERS)
"""The tier names ``evict_tiers`` may hold."""

Source = Callable[[], tuple[int, int]]
"""A memory source: returns ``(used_bytes, total_bytes)``."""

NVIDIA_SMI_CMD: tuple[str, ...] = (
    "nvidia-smi",
    "--query-gpu=memory.used,memory.total",
    "--format=csv,noheader,nounits",
)


# --- sources ------------------------------------------------------------------------------


def noop_source() -> tuple[int, int]:
    """No pressure, ever: ``(0, 1)``."""
    return (0, 1)


def system_source() -> tuple[int, int]:
    """Host RAM: ``(total - available, total)`` from ``psutil.virtual_memory()``.

    "Available" (not "free") is what the kernel can hand out without swapping, page cache
    included, as the original's ``available_memory``.
    """
    vm = psutil.virtual_memory()
    total = int(vm.total)
    if total <= 0:
        return (0, 1)
    return (max(0, total - int(vm.available)), total)


def nvidia_smi_source(run: Callable[..., Any] = subprocess.run, timeout: float = 10.0) -> tuple[int, int]:
    """GPU memory summed over every GPU, via ``nvidia-smi`` (MiB converted to bytes).

    ``run`` is :func:`subprocess.run` (injectable for tests). Never raises: a missing
    binary, a failing or hanging command, no output or no parsable line give ``(0, 1)``.
    Unparsable lines (``[N/A]``, ``[Not Supported]``) are skipped.
    """
    try:
        proc = run(list(NVIDIA_SMI_CMD), capture_output=True, text=True, timeout=timeout, check=False)
        if getattr(proc, "returncode", 0) not in (0, None):
            return (0, 1)
        out = proc.stdout or ""
        if isinstance(out, bytes):
            out = out.decode("utf-8", "replace")
        used = total = 0
        seen = False
        for line in out.splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 2:
                continue
            try:
                u, t = int(float(parts[0])), int(float(parts[1]))
            except ValueError:
                continue
            if u < 0 or t <= 0:
                continue
            used += u
            total += t
            seen = True
        if not seen:
            return (0, 1)
        return (used * MiB, total * MiB)
    except Exception:  # never raise: OSError (missing binary), TimeoutExpired, anything
        logger.debug("nvidia-smi sample failed", exc_info=True)
        return (0, 1)


SOURCES: dict[str, Source] = {
    "system": system_source,
    "nvidia_smi": nvidia_smi_source,
    "noop": noop_source,
}
"""The named sources a :class:`PressureConfig` accepts."""


def resolve_source(source: str | Source) -> tuple[str, Source]:
    """``(name, callable)`` for a source name or a callable (named by its qualname)."""
    if isinstance(source, str):
        try:
            return source, SOURCES[source]
        except KeyError:
            raise errors.ConfigError(
                f"source must be one of {sorted(SOURCES)} or a callable, got {source!r}"
            ) from None
    if callable(source):
        name = getattr(source, "__qualname__", None) or getattr(source, "__name__", None) or repr(source)
        return str(name), source
    raise errors.ConfigError(f"source must be one of {sorted(SOURCES)} or a callable, got {source!r}")


# --- config -------------------------------------------------------------------------------


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class PressureConfig:
    """Memory-pressure settings. Off by default.

    ``source`` is ``"system"``, ``"nvidia_smi"``, ``"noop"`` or a callable returning
    ``(used_bytes, total_bytes)``. Eviction starts when ``used / total >= high`` and aims
    for ``low`` (see :func:`decide`). ``evict_tiers`` is a non-empty subset of
    ``{"ram", "ram_file", "disk"}`` (a list is accepted and stored as a tuple).

    A bad value raises :class:`errors.ConfigError` naming the field and the value.
    """

    enabled: bool = False
    source: str | Source = "system"
    interval_s: float = 5.0
    high: float = 0.85
    low: float = 0.75
    min_evict_bytes: int = MiB
    evict_tiers: tuple[str, ...] = ("ram", "ram_file")

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise errors.ConfigError(f"enabled must be a bool, got {self.enabled!r}")
        resolve_source(self.source)
        if not _is_real(self.interval_s) or self.interval_s <= 0:
            raise errors.ConfigError(f"interval_s must be a finite number > 0, got {self.interval_s!r}")
        if not _is_real(self.high) or not 0.0 < self.high <= 1.0:
            raise errors.ConfigError(f"high must be a number in (0, 1], got {self.high!r}")
        if not _is_real(self.low) or not 0.0 <= self.low <= 1.0:
            raise errors.ConfigError(f"low must be a number in [0, 1], got {self.low!r}")
        if not self.low < self.high:
            raise errors.ConfigError(f"low must be < high ({self.high!r}), got {self.low!r}")
        if (isinstance(self.min_evict_bytes, bool) or not isinstance(self.min_evict_bytes, int)
                or self.min_evict_bytes < 0):
            raise errors.ConfigError(f"min_evict_bytes must be an int >= 0, got {self.min_evict_bytes!r}")
        tiers = self.evict_tiers
        if isinstance(tiers, (str, bytes)) or not isinstance(tiers, (tuple, list)):
            raise errors.ConfigError(f"evict_tiers must be a tuple of tier names, got {tiers!r}")
        if not tiers:
            raise errors.ConfigError(f"evict_tiers must not be empty, got {tiers!r}")
        for t in tiers:
            if not isinstance(t, str) or t not in EVICT_TIERS:
                raise errors.ConfigError(
                    f"evict_tiers must be a subset of {sorted(EVICT_TIERS)}, got {tiers!r}"
                )
        object.__setattr__(self, "evict_tiers", tuple(dict.fromkeys(tiers)))

    @property
    def source_name(self) -> str:
        """The source's name (a callable's qualname)."""
        return resolve_source(self.source)[0]


# --- decision -----------------------------------------------------------------------------


def decide(used: int, total: int, cfg: PressureConfig) -> int:
    """Bytes to evict for one sample; ``0`` means nothing to do.

    ``0`` when ``total <= 0`` or ``used / total < cfg.high``. Otherwise enough to get back
    to the low watermark, but at least ``cfg.min_evict_bytes``::

        max(used - floor(low * total), min_evict_bytes)

    so that ``used - result <= low * total`` whenever the first term wins. ``low * total``
    is computed exactly (no float rounding). The original (SPEC 5) evicted a fixed chunk
    ``max(trunc((high - low) * total), min_evict_bytes)`` instead; see the module doc.
    Pure: ``cfg.enabled`` is not consulted (the poller handles that).
    """
    used, total = int(used), int(total)
    if total <= 0:
        return 0
    if used / total < cfg.high:
        return 0
    low_bytes = math.floor(Fraction(cfg.low) * total)
    return max(used - low_bytes, cfg.min_evict_bytes)
