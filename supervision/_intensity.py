"""The restart-intensity window: pure, clock passed in, property-tested."""

from __future__ import annotations

from collections import deque

__all__ = ["RestartWindow"]


class RestartWindow:
    """Counts restarts in a sliding window of ``period`` seconds.

    :meth:`add` records a restart at time ``now`` and answers whether the supervisor may go
    on: ``False`` once more than ``intensity`` restarts fall within the last ``period``
    seconds (a restart exactly ``period`` seconds old has left the window).
    """

    def __init__(self, intensity: int, period: float) -> None:
        self.intensity = intensity
        self.period = period
        self._times: deque[float] = deque()

    def add(self, now: float) -> bool:
        """Record a restart at ``now`` (monotonic seconds, non-decreasing); ``True`` if allowed."""
        self._times.append(now)
        horizon = now - self.period
        while self._times and self._times[0] <= horizon:
            self._times.popleft()
        return len(self._times) <= self.intensity

    def __len__(self) -> int:
        return len(self._times)
