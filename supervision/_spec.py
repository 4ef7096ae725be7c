"""Supervisor flags and child specifications (the OTP vocabulary, as frozen dataclasses)."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "BRUTAL_KILL",
    "INFINITY",
    "AutoShutdown",
    "ChildSpec",
    "ChildType",
    "Restart",
    "Shutdown",
    "Strategy",
    "SupFlags",
]


class Strategy(enum.Enum):
    """What a supervisor does when a child exits abnormally."""

    ONE_FOR_ONE = "one_for_one"
    """Restart only the child that exited."""
    ONE_FOR_ALL = "one_for_all"
    """Terminate every other child, then restart them all in start order."""
    REST_FOR_ONE = "rest_for_one"
    """Terminate the children started after the one that exited, then restart it and them."""
    SIMPLE_ONE_FOR_ONE = "simple_one_for_one"
    """A dynamic pool of children made from one spec with ``start_child(sup, *args)``."""


class Restart(enum.Enum):
    """When a child is restarted."""

    PERMANENT = "permanent"
    """Always, whatever the exit reason."""
    TRANSIENT = "transient"
    """Only after an abnormal exit (an exception, not a stop)."""
    TEMPORARY = "temporary"
    """Never; not even when a sibling's restart terminates it."""


class ChildType(enum.Enum):
    """A child is a worker or a supervisor (whose default shutdown is ``INFINITY``)."""

    WORKER = "worker"
    SUPERVISOR = "supervisor"


class AutoShutdown(enum.Enum):
    """Whether the exit of significant children shuts the supervisor down (normally)."""

    NEVER = "never"
    ANY_SIGNIFICANT = "any_significant"
    ALL_SIGNIFICANT = "all_significant"


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


BRUTAL_KILL: Final = _Sentinel("BRUTAL_KILL")
"""Ask the child to stop and do not wait for it. A Python thread cannot be killed: a child
stuck in a call keeps its thread until the call returns (see docs/internals/supervision.md)."""

INFINITY: Final = _Sentinel("INFINITY")
"""Wait for the child to stop however long it takes (the default for supervisors)."""

Shutdown = float | _Sentinel
"""A shutdown is a timeout in seconds, ``BRUTAL_KILL`` or ``INFINITY``."""

DEFAULT_WORKER_SHUTDOWN: Final = 5.0


def _check_number(value: object, name: str, *, minimum: float, allow_zero: bool = True) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) \
            or value < minimum or (not allow_zero and value == 0):
        msg = f"{name} must be a finite number >= {minimum}{'' if allow_zero else ' and > 0'}, got {value!r}"
        raise ValueError(msg)


@dataclass(frozen=True)
class SupFlags:
    """How a supervisor restarts: ``strategy``, and at most ``intensity`` restarts within
    ``period`` seconds before it gives up, stops its children and exits abnormally."""

    strategy: Strategy = Strategy.ONE_FOR_ONE
    intensity: int = 1
    period: float = 5.0
    auto_shutdown: AutoShutdown = AutoShutdown.NEVER

    def __post_init__(self) -> None:
        if not isinstance(self.strategy, Strategy):
            msg = f"strategy must be a Strategy, got {self.strategy!r}"
            raise ValueError(msg)
        if isinstance(self.intensity, bool) or not isinstance(self.intensity, int) or self.intensity < 0:
            msg = f"intensity must be an int >= 0, got {self.intensity!r}"
            raise ValueError(msg)
        _check_number(self.period, "period", minimum=0, allow_zero=False)
        if not isinstance(self.auto_shutdown, AutoShutdown):
            msg = f"auto_shutdown must be an AutoShutdown, got {self.auto_shutdown!r}"
            raise ValueError(msg)


@dataclass(frozen=True)
class ChildSpec:
    """One child of a supervisor.

    ``start`` is called (in the supervisor's thread) with the spec's ``args`` plus any
    ``start_child`` arguments, and must return the ``pykka.ActorRef`` of a started
    :class:`supervision.Actor`; the supervisor then waits up to ``start_timeout`` seconds
    for the child's ``on_start`` to complete. ``shutdown`` defaults to 5 s for workers
    and ``INFINITY`` for supervisors. ``name`` registers the child in the name registry,
    where the entry follows restarts.
    """

    id: str
    start: Callable[..., Any]
    restart: Restart = Restart.PERMANENT
    shutdown: Shutdown | None = None
    type: ChildType = ChildType.WORKER
    significant: bool = False
    args: tuple[Any, ...] = ()
    name: str | None = None
    start_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            msg = f"child id must be a non-empty str, got {self.id!r}"
            raise ValueError(msg)
        if not callable(self.start):
            msg = f"child {self.id!r}: start must be callable, got {self.start!r}"
            raise ValueError(msg)
        if not isinstance(self.restart, Restart) or not isinstance(self.type, ChildType):
            msg = f"child {self.id!r}: restart must be a Restart and type a ChildType"
            raise ValueError(msg)
        if self.shutdown is None:
            default = INFINITY if self.type is ChildType.SUPERVISOR else DEFAULT_WORKER_SHUTDOWN
            object.__setattr__(self, "shutdown", default)
        elif not isinstance(self.shutdown, _Sentinel):
            _check_number(self.shutdown, f"child {self.id!r}: shutdown", minimum=0)
        if self.significant and self.restart is Restart.PERMANENT:
            msg = f"child {self.id!r}: a significant child must be transient or temporary"
            raise ValueError(msg)
        _check_number(self.start_timeout, f"child {self.id!r}: start_timeout", minimum=0, allow_zero=False)
        if not isinstance(self.args, tuple):
            object.__setattr__(self, "args", tuple(self.args))
