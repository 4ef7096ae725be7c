"""The supervisor actor and the functions that drive it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import pykka

from supervision._actor import Actor, Down, MonitorRef, _Shutdown, demonitor, exit_reason, life_of, monitor
from supervision._intensity import RestartWindow
from supervision._registry import NameTaken, registry
from supervision._spec import (
    BRUTAL_KILL,
    INFINITY,
    AutoShutdown,
    ChildSpec,
    ChildType,
    Restart,
    Strategy,
    SupFlags,
)

__all__ = [
    "ChildInfo",
    "RestartIntensityExceeded",
    "StartError",
    "SupervisionError",
    "Supervisor",
    "count_children",
    "delete_child",
    "restart_child",
    "start_child",
    "start_supervisor",
    "stop_supervisor",
    "terminate_child",
    "which_children",
]

logger = logging.getLogger("supervision")

KILL_GRACE = 1.0
"""Seconds to wait for a killed child before abandoning its thread."""
RETRY_BACKOFF = (0.05, 1.0)
"""First and largest delay between attempts to restart a child whose restart failed."""


class SupervisionError(Exception):
    """Base class of supervision errors."""


class StartError(SupervisionError):
    """A child could not be started; ``cause`` is its error (from ``start`` or ``on_start``)."""

    def __init__(self, child_id: str, cause: BaseException | str) -> None:
        self.child_id = child_id
        self.cause = cause
        super().__init__(f"child {child_id!r} failed to start: {cause!r}" if isinstance(cause, BaseException)
                         else f"child {child_id!r} failed to start: {cause}")


class RestartIntensityExceeded(SupervisionError):
    """More restarts than ``intensity`` within ``period``: the supervisor gave up (escalation)."""


@dataclass(frozen=True)
class ChildInfo:
    """One row of :func:`which_children`."""

    id: str
    ref: pykka.ActorRef[Any] | None
    type: ChildType
    restart: Restart


@dataclass(frozen=True)
class ChildStatus:
    """One child in :func:`inspect`: its spec's id, type, restart type and shutdown, its
    actor (``None`` while not running), the thread it runs in, how many times it was
    restarted, and ``status`` (``"running"``, ``"restarting"`` or ``"stopped"``)."""

    id: str
    type: ChildType
    restart: Restart
    shutdown: Any
    ref: pykka.ActorRef[Any] | None
    thread: str | None
    restarts: int
    status: str


@dataclass(frozen=True)
class SupervisorStatus:
    """What :func:`inspect` reports of a supervisor: its flags, restarts used in the
    current window, and its children in start order."""

    strategy: Strategy
    intensity: int
    period: float
    children: tuple[ChildStatus, ...]


class _Inspect:
    pass


@dataclass
class _Child:
    spec: ChildSpec
    args: tuple[Any, ...] = ()
    ref: pykka.ActorRef[Any] | None = None
    mref: MonitorRef | None = None
    retries: int = 0
    restarts: int = 0
    exited_significant: bool = False
    stopped_on_request: bool = False
    holds_name: bool = False


@dataclass(frozen=True)
class _StartChild:
    args: tuple[Any, ...]


@dataclass(frozen=True)
class _TerminateChild:
    key: str | pykka.ActorRef[Any]


@dataclass(frozen=True)
class _RestartChild:
    id: str


@dataclass(frozen=True)
class _DeleteChild:
    id: str


class _WhichChildren:
    pass


class _CountChildren:
    pass


@dataclass(frozen=True)
class _Retry:
    group: tuple[_Child, ...]


class Supervisor(Actor):
    """An OTP-style supervisor: starts ``children`` in order, restarts them by
    ``flags.strategy`` within ``flags.intensity`` restarts per ``flags.period`` seconds, and
    stops them in reverse order.

    Start it with :func:`start_supervisor` (or as a ``ChildSpec`` of type ``SUPERVISOR``
    whose ``start`` is ``lambda: Supervisor.start(flags, specs)``). Never ``ask`` a
    supervisor from inside one of its children's handlers: the supervisor may be waiting
    for that child, and both would wait forever.
    """

    def __init__(self, flags: SupFlags, children: Iterable[ChildSpec] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        specs = list(children)
        if not isinstance(flags, SupFlags):
            msg = f"flags must be SupFlags, got {flags!r}"
            raise TypeError(msg)
        for spec in specs:
            if not isinstance(spec, ChildSpec):
                msg = f"children must be ChildSpec, got {spec!r}"
                raise TypeError(msg)
        ids = [s.id for s in specs]
        if len(set(ids)) != len(ids):
            msg = f"duplicate child ids in {ids}"
            raise ValueError(msg)
        if flags.strategy is Strategy.SIMPLE_ONE_FOR_ONE and len(specs) != 1:
            msg = f"a simple_one_for_one supervisor takes exactly one child spec, got {len(specs)}"
            raise ValueError(msg)
        super().__init__()  # after validation: a refused supervisor leaves no bookkeeping
        self.flags = flags
        self._clock = clock
        self._window = RestartWindow(flags.intensity, flags.period)
        self._dynamic = flags.strategy is Strategy.SIMPLE_ONE_FOR_ONE
        self._template = specs[0] if self._dynamic else None
        self._children: list[_Child] = [] if self._dynamic else [_Child(s) for s in specs]
        self._giving_up = False

    # ---- lifecycle ---------------------------------------------------------------------

    def on_start(self) -> None:
        """Start every static child in order; a failure stops those started and raises."""
        for child in self._children:
            try:
                self._start(child)
            except StartError:
                self._terminate_all()
                raise

    def on_stop(self) -> None:
        """Stop every child in reverse start order, honouring each one's shutdown."""
        self._terminate_all()

    def on_failure(self, *exc_info: Any) -> None:
        """Whatever failed, do not leave children behind."""
        self._terminate_all()

    # ---- messages -----------------------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        """Dispatch supervisor messages (``Down`` notifications and the API's requests)."""
        if isinstance(message, Down):
            return self._on_down(message)
        if isinstance(message, _Retry):
            return self._on_retry(list(message.group))
        if isinstance(message, _StartChild):
            return self._start_child(message.args)
        if isinstance(message, _TerminateChild):
            return self._terminate_child(message.key)
        if isinstance(message, _RestartChild):
            return self._restart_child(message.id)
        if isinstance(message, _DeleteChild):
            return self._delete_child(message.id)
        if isinstance(message, _Inspect):
            return self._inspect()
        if isinstance(message, _WhichChildren):
            return [ChildInfo(c.spec.id, c.ref, c.spec.type, c.spec.restart) for c in self._children]
        if isinstance(message, _CountChildren):
            return {
                "specs": 1 if self._dynamic else len(self._children),
                "active": sum(1 for c in self._children if c.ref is not None),
                "supervisors": sum(1 for c in self._children if c.spec.type is ChildType.SUPERVISOR),
                "workers": sum(1 for c in self._children if c.spec.type is ChildType.WORKER),
            }
        logger.warning("supervisor %s ignores an unexpected message %r", self.actor_ref, message)
        return None

    def _inspect(self) -> SupervisorStatus:
        rows = []
        for c in self._children:
            life = life_of(c.ref) if c.ref is not None else None
            thread = life.thread.name if life is not None and life.thread is not None else None
            status = "running" if c.ref is not None else ("restarting" if c.retries else "stopped")
            rows.append(ChildStatus(c.spec.id, c.spec.type, c.spec.restart, c.spec.shutdown, c.ref, thread,
                                    c.restarts, status))
        return SupervisorStatus(self.flags.strategy, self.flags.intensity, self.flags.period, tuple(rows))

    # ---- starting and stopping one child ----------------------------------------------

    def _start(self, child: _Child) -> pykka.ActorRef[Any]:
        spec = child.spec
        try:
            ref = spec.start(*spec.args, *child.args)
        except Exception as exc:
            raise StartError(spec.id, exc) from exc
        if not isinstance(ref, pykka.ActorRef):
            raise StartError(spec.id, f"start returned {ref!r}, not a pykka.ActorRef")
        if not issubclass(ref.actor_class, Actor):
            ref.stop(block=False)
            raise StartError(spec.id, f"{ref.actor_class.__name__} is not a supervision.Actor")
        life = life_of(ref)
        if life is None:
            reason = exit_reason(ref)
            cause = reason.error if reason is not None and reason.error is not None else f"exited at once ({reason})"
            raise StartError(spec.id, cause)
        try:
            life.started.get(timeout=spec.start_timeout)
        except pykka.Timeout:
            life.kill()
            raise StartError(spec.id, f"on_start did not complete within {spec.start_timeout} s") from None
        except Exception as exc:
            life.exited.wait(KILL_GRACE)
            raise StartError(spec.id, exc) from exc
        if spec.name is not None:
            try:
                registry.register(spec.name, ref, supervised=True)
                child.holds_name = True
            except NameTaken as exc:
                life.kill()
                life.exited.wait(KILL_GRACE)
                raise StartError(spec.id, exc) from exc
        child.ref = ref
        child.mref = monitor(ref, self.actor_ref)
        child.stopped_on_request = False
        return ref

    def _terminate(self, child: _Child, *, keep_name: bool = False) -> None:
        ref, mref = child.ref, child.mref
        child.ref = child.mref = None
        if not keep_name:
            self._release_name(child)
        if ref is None:
            return
        if mref is not None:
            demonitor(mref)
        life = life_of(ref)
        if life is None:
            return
        shutdown = child.spec.shutdown
        if shutdown is BRUTAL_KILL:
            life.kill()
            timed_out = not life.exited.wait(KILL_GRACE)
        else:
            try:
                ref.tell(_Shutdown())
            except pykka.ActorDeadError:
                return
            if shutdown is INFINITY:
                life.exited.wait()
                timed_out = False
            else:
                assert isinstance(shutdown, int | float)
                timed_out = not life.exited.wait(shutdown)
                if timed_out:
                    logger.warning("child %r did not stop within %s s; killing it", child.spec.id, shutdown)
                    life.kill()
                    timed_out = not life.exited.wait(KILL_GRACE)
        if timed_out:
            logger.error("child %r is stuck (a Python thread cannot be killed); abandoning it", child.spec.id)
        elif life.thread is not None and life.thread is not threading.current_thread():
            life.thread.join(KILL_GRACE)

    @staticmethod
    def _release_name(child: _Child) -> None:
        if child.holds_name and child.spec.name is not None:
            registry.unregister(child.spec.name)
        child.holds_name = False

    def _terminate_all(self) -> None:
        for child in reversed(self._children):
            self._terminate(child)

    # ---- exits and restarts ----------------------------------------------------------------

    def _on_down(self, down: Down) -> None:
        child = next((c for c in self._children if c.mref == down.monitor), None)
        if child is None or self._giving_up:
            return  # a child we already terminated or replaced
        child.ref = child.mref = None
        restart = child.spec.restart
        wanted = restart is Restart.PERMANENT or (restart is Restart.TRANSIENT and down.reason.abnormal)
        logger.log(logging.WARNING if down.reason.abnormal else logging.DEBUG,
                   "child %r exited (%s); %s", child.spec.id, down.reason, "restarting" if wanted else "not restarted")
        if not wanted:
            self._release_name(child)
            if restart is Restart.TEMPORARY or self._dynamic:
                self._children.remove(child)
            child.exited_significant = child.spec.significant
            self._check_auto_shutdown(child)
            return
        self._count_restart(f"child {child.spec.id!r} exited ({down.reason})")
        self._apply_strategy(child)

    def _count_restart(self, what: str) -> None:
        if not self._window.add(self._clock()):
            self._giving_up = True
            logger.error("supervisor %s: more than %d restarts in %s s (%s); shutting down",
                         self.actor_ref, self.flags.intensity, self.flags.period, what)
            self._terminate_all()
            msg = (f"more than {self.flags.intensity} restarts within {self.flags.period} s; "
                   f"last: {what}")
            raise RestartIntensityExceeded(msg)

    def _apply_strategy(self, failed: _Child) -> None:
        strategy = self.flags.strategy
        if strategy in (Strategy.ONE_FOR_ONE, Strategy.SIMPLE_ONE_FOR_ONE):
            group = [failed]
        else:
            idx = self._children.index(failed)
            others = self._children if strategy is Strategy.ONE_FOR_ALL else self._children[idx:]
            for child in reversed(others):
                if child is not failed:
                    self._terminate(child, keep_name=child.spec.restart is not Restart.TEMPORARY)
            for child in [c for c in others if c is not failed and c.spec.restart is Restart.TEMPORARY]:
                self._children.remove(child)
            group = [c for c in others if c in self._children]
        self._restart_group(group)

    def _restart_group(self, group: list[_Child]) -> None:
        for i, child in enumerate(group):
            if child.ref is not None or child not in self._children or child.stopped_on_request:
                continue
            try:
                self._start(child)
                child.retries = 0
                child.restarts += 1
            except StartError as exc:
                logger.error("restart of %r failed: %s", child.spec.id, exc)
                self._schedule_retry(group[i:], child)
                return

    def _schedule_retry(self, rest: list[_Child], child: _Child) -> None:
        # the cap keeps intensity + 1 attempts inside one period, so a child that can never
        # start escalates instead of being retried forever
        cap = min(RETRY_BACKOFF[1], self.flags.period / (self.flags.intensity + 1))
        delay = min(RETRY_BACKOFF[0] * (2 ** child.retries), cap)
        child.retries += 1
        timer = threading.Timer(delay, _tell_quietly, (self.actor_ref, _Retry(tuple(rest))))
        timer.daemon = True
        timer.start()

    def _on_retry(self, group: list[_Child]) -> None:
        pending = [c for c in group if c in self._children and c.ref is None and not c.stopped_on_request]
        if self._giving_up or not pending:
            return
        self._count_restart(f"retrying the restart of {pending[0].spec.id!r}")
        self._restart_group(pending)

    def _check_auto_shutdown(self, child: _Child) -> None:
        mode = self.flags.auto_shutdown
        if mode is AutoShutdown.NEVER or not child.spec.significant:
            return
        significant = [c for c in self._children if c.spec.significant]
        if mode is AutoShutdown.ANY_SIGNIFICANT or all(c.ref is None for c in significant):
            logger.info("supervisor %s: significant child %r exited; shutting down", self.actor_ref, child.spec.id)
            self.actor_ref.tell(_Shutdown())

    # ---- dynamic children ---------------------------------------------------------------------

    def _start_child(self, args: tuple[Any, ...]) -> pykka.ActorRef[Any]:
        if self._dynamic:
            assert self._template is not None
            child = _Child(self._template, args)
        else:
            if len(args) != 1 or not isinstance(args[0], ChildSpec):
                msg = "start_child on a non-simple supervisor takes one ChildSpec"
                raise TypeError(msg)
            spec = args[0]
            if any(c.spec.id == spec.id for c in self._children):
                msg = f"a child with id {spec.id!r} already exists"
                raise ValueError(msg)
            child = _Child(spec)
        ref = self._start(child)
        self._children.append(child)
        return ref

    def _find(self, key: str | pykka.ActorRef[Any]) -> _Child:
        for c in self._children:
            if (isinstance(key, pykka.ActorRef) and c.ref == key) or (not self._dynamic and c.spec.id == key):
                return c
        msg = f"no child {key!r}"
        raise LookupError(msg)

    def _terminate_child(self, key: str | pykka.ActorRef[Any]) -> None:
        child = self._find(key)
        child.stopped_on_request = True
        self._terminate(child)
        if self._dynamic or child.spec.restart is Restart.TEMPORARY:
            self._children.remove(child)

    def _restart_child(self, child_id: str) -> pykka.ActorRef[Any]:
        child = self._find(child_id)
        if child.ref is not None:
            msg = f"child {child_id!r} is running"
            raise ValueError(msg)
        return self._start(child)

    def _delete_child(self, child_id: str) -> None:
        child = self._find(child_id)
        if child.ref is not None:
            msg = f"child {child_id!r} is running; terminate it first"
            raise ValueError(msg)
        self._children.remove(child)


def _tell_quietly(ref: pykka.ActorRef[Any], message: Any) -> None:
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        pass


# ---- the API -------------------------------------------------------------------------------


def start_supervisor(flags: SupFlags, children: Iterable[ChildSpec] = (), *,
                     timeout: float | None = None,
                     clock: Callable[[], float] = time.monotonic) -> pykka.ActorRef[Supervisor]:
    """Start a supervisor and wait until every child has started.

    Raises the first child's :class:`StartError` (the supervisor has then stopped).
    ``clock`` (monotonic seconds) times the restart-intensity window.
    """
    ref = Supervisor.start(flags, list(children), clock)
    life = life_of(ref)
    if life is None:
        reason = exit_reason(ref)
        raise reason.error if reason is not None and isinstance(reason.error, Exception) else SupervisionError(
            f"supervisor exited at once ({reason})")
    try:
        life.started.get(timeout=timeout)
    except pykka.Timeout:
        life.kill()
        raise
    return ref


def stop_supervisor(ref: pykka.ActorRef[Any], timeout: float | None = None) -> None:
    """Stop a supervisor (its children in reverse order) and wait for its thread to end."""
    life = life_of(ref)
    try:
        ref.stop(block=True, timeout=timeout)
    except pykka.ActorDeadError:
        pass
    if life is not None:
        life.exited.wait(timeout)
        if life.thread is not None:
            life.thread.join(timeout)


T = TypeVar("T")


def _ask(sup: pykka.ActorRef[Any], message: Any, timeout: float | None, _kind: type[T]) -> T:
    return cast(T, sup.ask(message, timeout=timeout))


def start_child(sup: pykka.ActorRef[Any], *args: Any, timeout: float | None = 30.0) -> pykka.ActorRef[Any]:
    """Start a dynamic child: ``start_child(sup, *args)`` on a ``SIMPLE_ONE_FOR_ONE``
    supervisor, ``start_child(sup, spec)`` on the others. Raises :class:`StartError`."""
    return _ask(sup, _StartChild(args), timeout, pykka.ActorRef)


def terminate_child(sup: pykka.ActorRef[Any], child: str | pykka.ActorRef[Any], *,
                    timeout: float | None = 30.0) -> None:
    """Stop a child (by id, or by ref for dynamic children); it is not restarted."""
    _ask(sup, _TerminateChild(child), timeout, object)


def restart_child(sup: pykka.ActorRef[Any], child_id: str, *, timeout: float | None = 30.0) -> pykka.ActorRef[Any]:
    """Start again a terminated static child."""
    return _ask(sup, _RestartChild(child_id), timeout, pykka.ActorRef)


def delete_child(sup: pykka.ActorRef[Any], child_id: str, *, timeout: float | None = 30.0) -> None:
    """Remove a terminated static child's spec."""
    _ask(sup, _DeleteChild(child_id), timeout, object)


def which_children(sup: pykka.ActorRef[Any], *, timeout: float | None = 30.0) -> list[ChildInfo]:
    """The children in start order, with their current refs (``None`` when not running)."""
    return _ask(sup, _WhichChildren(), timeout, list)


def inspect(sup: pykka.ActorRef[Any], *, timeout: float | None = 30.0) -> SupervisorStatus:
    """The supervisor's flags and, per child, its actor, thread, restart count and status
    (the ``observer`` view of one supervisor)."""
    return _ask(sup, _Inspect(), timeout, SupervisorStatus)


def count_children(sup: pykka.ActorRef[Any], *, timeout: float | None = 30.0) -> dict[str, int]:
    """``specs``, ``active``, ``supervisors`` and ``workers`` counts, as OTP's."""
    return _ask(sup, _CountChildren(), timeout, dict)
