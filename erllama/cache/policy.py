"""When to save a KV state, and how much of it (SPEC 4.8). Pure functions, no I/O.

Four gates decide the saves a model makes:

- **cold**: on a cache miss, once the prompt has been prefilled, save its first
  :func:`trim_count` tokens (:func:`cold_save_split`), if the prompt length is within
  ``cold_min_tokens..cold_max_tokens`` and the saved prefix is at least ``min_tokens``
  long (that last check is the caller's, as in the Erlang original).
- **continued**: during a long generation, save every ``continued_interval`` tokens
  (:func:`should_continued_save`).
- **finish**: when a request ends, save its whole context (:func:`should_finish_save`).
- **evict/shutdown**: always (no gate here).

Why the defaults are what they are:

- ``boundary_trim_tokens`` (32): a cold save leaves out the last tokens of the prompt,
  because they are the part most likely to differ next time (the question after a shared
  document, the chat template's generation header that the next turn renders differently).
- ``boundary_align_tokens`` (64, the Erlang original has 2048): the original could only
  find saves at multiples of the lookup stride, so a cold save had to be stride-aligned to
  be findable at all. Our longest-prefix lookup works at token granularity (any saved
  length is found), so alignment no longer decides findability; it only decides how often
  near-identical prompts collapse onto the same cold-save key instead of each writing a
  full-size row of its own. Prompts that share a long prefix and differ only in their last
  few dozen tokens (one system prompt and document, many short questions) then save once,
  and ``already_present`` does the rest. The price is at most ``trim + align - 1`` (95)
  tokens re-prefilled after a hit, a fraction of one ubatch. 2048 would throw away up to
  2079 tokens of every cold save and make prompts under ~2.1k tokens never cold-save.
- ``min_tokens`` / ``cold_min_tokens`` (256; the original has 512): measured on Gemma 3
  270M, 2 threads (``bench/save_tradeoff.py``, 2026-11-26), a row of N tokens restores in
  0.4-1.4 ms against a cold prefill of 69 / 125 / 247 / 528 / 1130 / 2651 ms at
  N = 64 / 128 / 256 / 512 / 1024 / 2048, and costs 2.2 / 3.4 / 5.8 / 10.5 / 12.1 /
  15.2 MB (1 MiB of it the logits). Every length pays back on its first hit; what the
  minimum trades is storage density, prefill time saved per MB stored: 31 / 37 / 43 / 50
  / 94 / 174 ms/MB. 256 keeps within 15 % of 512's density while letting prompts of a
  quarter-second prefill save; below it a row is mostly logits. ``cold_max_tokens``
  (30000) and ``continued_interval`` (2048) are the original's values: the upper bound
  keeps one cold save from filling a tier, and a continued save every 2048 decoded tokens
  costs one pack (under 7 ms at 2048 tokens) per ~25 s of generation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from erllama import errors

__all__ = [
    "SavePolicy",
    "cold_save_split",
    "should_continued_save",
    "should_finish_save",
    "trim_count",
]


@dataclass(frozen=True)
class SavePolicy:
    """The save knobs of one model; validated on construction.

    Attributes:
        min_tokens: no save of fewer tokens (finish and continued gates; the caller checks
            it against the cold prefix too). ``>= 0``.
        cold_min_tokens: shortest prompt that gets a cold save. ``>= min_tokens``.
        cold_max_tokens: longest prompt that gets a cold save. ``>= cold_min_tokens``.
        continued_interval: tokens between two continued saves of one request. ``> 0``.
        boundary_trim_tokens: tokens left off the end of a cold save. ``>= 0``.
        boundary_align_tokens: a cold save's length is a multiple of this. ``> 0``.

    Every value must be an ``int`` (not ``bool``); a bad value raises
    :class:`errors.ConfigError` naming the field and the value.
    """

    min_tokens: int = 256
    cold_min_tokens: int = 256
    cold_max_tokens: int = 30000
    continued_interval: int = 2048
    boundary_trim_tokens: int = 32
    boundary_align_tokens: int = 64

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise errors.ConfigError(f"{f.name} must be an int, got {v!r}")
        if self.min_tokens < 0:
            raise errors.ConfigError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.cold_min_tokens < self.min_tokens:
            raise errors.ConfigError(
                f"cold_min_tokens must be >= min_tokens ({self.min_tokens}), "
                f"got {self.cold_min_tokens}"
            )
        if self.cold_max_tokens < self.cold_min_tokens:
            raise errors.ConfigError(
                f"cold_max_tokens must be >= cold_min_tokens ({self.cold_min_tokens}), "
                f"got {self.cold_max_tokens}"
            )
        if self.continued_interval <= 0:
            raise errors.ConfigError(
                f"continued_interval must be > 0, got {self.continued_interval}"
            )
        if self.boundary_trim_tokens < 0:
            raise errors.ConfigError(
                f"boundary_trim_tokens must be >= 0, got {self.boundary_trim_tokens}"
            )
        if self.boundary_align_tokens <= 0:
            raise errors.ConfigError(
                f"boundary_align_tokens must be > 0, got {self.boundary_align_tokens}"
            )

    @classmethod
    def from_dict(cls, knobs: Mapping[str, Any]) -> SavePolicy:
        """A policy from a mapping of knobs; missing knobs take their defaults.

        An unknown key raises :class:`errors.ConfigError` naming it; values are validated
        as in the constructor.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        for k in knobs:
            if k not in names:
                raise errors.ConfigError(
                    f"unknown save policy key {k!r} (known: {', '.join(sorted(names))})"
                )
        return cls(**dict(knobs))


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise errors.InvalidParameter(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def trim_count(length: int, trim: int, align: int) -> int | None:
    """How many tokens of a ``length``-token prompt a cold save keeps, or ``None`` to skip.

    ``None`` if ``length - trim < align``, else ``((length - trim) // align) * align``: the
    result is a positive multiple of ``align`` and at most ``length - trim``. Raises
    :class:`errors.InvalidParameter` unless ``length >= 0``, ``trim >= 0``, ``align > 0``.
    """
    _check_int("length", length, 0)
    _check_int("trim", trim, 0)
    _check_int("align", align, 1)
    room = length - trim
    if room < align:
        return None
    return (room // align) * align


def cold_save_split(
    policy: SavePolicy, tokens: Sequence[int]
) -> tuple[list[int], list[int]] | None:
    """Split a cold prompt into (tokens to save, the rest), or ``None`` for no cold save.

    ``None`` if ``len(tokens)`` is outside ``cold_min_tokens..cold_max_tokens`` or
    :func:`trim_count` skips; otherwise the prefix holds the first ``trim_count(...)``
    tokens and the two lists concatenate to ``tokens``. The caller still requires
    ``len(prefix) >= policy.min_tokens`` before saving.
    """
    n = len(tokens)
    if n < policy.cold_min_tokens or n > policy.cold_max_tokens:
        return None
    keep = trim_count(n, policy.boundary_trim_tokens, policy.boundary_align_tokens)
    if keep is None:
        return None
    seq = list(tokens)
    return seq[:keep], seq[keep:]


def should_continued_save(policy: SavePolicy, live: int, last_at: int) -> bool:
    """Whether a request with ``live`` context tokens, last saved at ``last_at`` tokens,
    is due a continued save: ``live - last_at >= continued_interval`` and
    ``live >= min_tokens``."""
    return live - last_at >= policy.continued_interval and live >= policy.min_tokens


def should_finish_save(policy: SavePolicy, live: int) -> bool:
    """Whether a finishing request with ``live`` context tokens is saved:
    ``live >= min_tokens``."""
    return live >= policy.min_tokens
