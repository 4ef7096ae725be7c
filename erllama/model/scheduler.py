"""The batch planner: which rows of which sequences go into one decode (one tick).

Pure: the model actor describes each in-flight sequence as :class:`SeqWork` and applies the
plan. Decode rows (one token each) come first, so generation never waits behind a long
prefill; prefill slices fill the rest of the ``n_batch`` budget in admission order, each at
most ``prefill_chunk`` tokens. A tick takes either the *short* prefills (what is left fits in
``short_prefill(n_batch, prefill_chunk)`` tokens: typically a cache hit's uncached tail) or,
when there are none, the long ones, so a tick that carries a short prefill stays short: a
cache hit admitted beside a cold prompt gets its first token one short tick after the
current one instead of after the whole cold prefill, and since a short prefill is done in
the tick that takes it, each one delays the long prefills by one short tick. Unlike the
Erlang original, more decode rows than the budget do not crash the model: the rows that do
not fit go first in the next tick.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["SeqWork", "plan_tick", "short_prefill"]


@dataclass(frozen=True)
class SeqWork:
    """One in-flight sequence: ``decode`` when it has a sampled token to feed, else
    ``prefill`` tokens waiting (0 = nothing to do). ``order`` is its admission number."""

    seq_id: int
    order: int
    decode: bool = False
    prefill: int = 0


def short_prefill(n_batch: int, prefill_chunk: int | None = None) -> int:
    """The most prefill tokens left that count as short (a tick takes these before any long one)."""
    return max(1, min(n_batch // 8, prefill_chunk or n_batch))


def plan_tick(work: Sequence[SeqWork], n_batch: int, prefill_chunk: int | None = None,
              tick: int = 0) -> list[tuple[int, int]]:
    """Rows for one decode: ``(seq_id, n_tokens)`` pairs, decode rows first.

    The total never exceeds ``n_batch``; whenever some sequence has work, at least one row
    is planned. When decode rows outnumber the budget, ``tick`` rotates which of them go
    now, so every sequence advances within ``ceil(D / n_batch)`` ticks.
    """
    if n_batch < 1:
        msg = f"n_batch must be >= 1, got {n_batch}"
        raise ValueError(msg)
    decodes = sorted((w for w in work if w.decode), key=lambda w: w.order)
    short = short_prefill(n_batch, prefill_chunk)
    waiting = sorted((w for w in work if not w.decode and w.prefill > 0), key=lambda w: w.order)
    prefills = [w for w in waiting if w.prefill <= short] or waiting
    plan: list[tuple[int, int]] = []
    if len(decodes) > n_batch:
        start = (tick * n_batch) % len(decodes)
        rotated = decodes[start:] + decodes[:start]
        return [(w.seq_id, 1) for w in rotated[:n_batch]]
    plan.extend((w.seq_id, 1) for w in decodes)
    budget = n_batch - len(decodes)
    for w in prefills:
        if budget <= 0:
            break
        n = min(w.prefill, budget, prefill_chunk or w.prefill)
        plan.append((w.seq_id, n))
        budget -= n
    return plan
