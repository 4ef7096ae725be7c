"""The batch planner: which rows of which sequences go into one decode (one tick).

Pure: the model actor describes each in-flight sequence as :class:`SeqWork` and applies the
plan. Decode rows (one token each) come first, so generation never waits behind a long
prefill; prefill slices fill the rest of the ``n_batch`` budget in admission order, each at
most ``prefill_chunk`` tokens. Unlike the Erlang original, more decode rows than the budget
do not crash the model: the rows that do not fit go first in the next tick.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["SeqWork", "plan_tick"]


@dataclass(frozen=True)
class SeqWork:
    """One in-flight sequence: ``decode`` when it has a sampled token to feed, else
    ``prefill`` tokens waiting (0 = nothing to do). ``order`` is its admission number."""

    seq_id: int
    order: int
    decode: bool = False
    prefill: int = 0


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
    prefills = sorted((w for w in work if not w.decode and w.prefill > 0), key=lambda w: w.order)
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
