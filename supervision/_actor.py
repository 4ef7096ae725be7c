"""A pykka actor that knows why it exited and tells whoever monitors it.

pykka has no links and no monitors, and ``Actor.start()`` returns before ``on_start`` has
run. :class:`Actor` adds both: a *started* future that ``on_start`` completes (so a
supervisor can start children synchronously, as OTP's ``start_link``), and an exit hook
that records the :class:`ExitReason` and delivers a :class:`Down` notification to every
monitor, from the exiting actor's own thread, without polling.
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pykka
from pykka._envelope import Envelope

__all__ = ["Actor", "Down", "ExitReason", "MonitorRef", "demonitor", "exit_reason", "life_of", "monitor"]

logger = logging.getLogger("supervision")


@dataclass(frozen=True)
class ExitReason:
    """Why an actor exited: ``"normal"`` (stopped), ``"shutdown"`` (stopped by its
    supervisor), ``"killed"`` (stopped after its current message without ``on_stop``),
    ``"error"`` (an exception; see ``error``) or ``"noproc"`` (it was already gone when the
    monitor was set)."""

    kind: str
    error: BaseException | None = None

    @property
    def abnormal(self) -> bool:
        """True for exits a ``transient`` child is restarted after."""
        return self.kind not in ("normal", "shutdown")

    def __str__(self) -> str:
        return self.kind if self.error is None else f"{self.kind}: {self.error!r}"


NORMAL = ExitReason("normal")
SHUTDOWN = ExitReason("shutdown")
KILLED = ExitReason("killed")
NOPROC = ExitReason("noproc")


@dataclass(frozen=True)
class MonitorRef:
    """Handle of one monitor; pass it to :func:`demonitor`."""

    id: int
    actor_urn: str


@dataclass(frozen=True)
class Down:
    """Delivered once to a monitor's target when the monitored actor exits."""

    monitor: MonitorRef
    actor_ref: pykka.ActorRef[Any]
    reason: ExitReason


class _Shutdown:
    """Internal message: stop with reason ``shutdown``."""


class _Wake:
    """Internal message: wakes an idle actor so it notices it was killed."""


_Target = pykka.ActorRef[Any] | Callable[[Down], object]


class _Life:
    """The exit bookkeeping of one actor, shared with monitors and supervisors."""

    def __init__(self, ref: pykka.ActorRef[Any]) -> None:
        self.ref = ref
        self.lock = threading.Lock()
        self.monitors: dict[int, _Target] = {}
        self.reason: ExitReason | None = None
        self.pending_reason: ExitReason | None = None
        self.thread: threading.Thread | None = None
        self.exited = threading.Event()
        self.started: pykka.ThreadingFuture[None] = pykka.ThreadingFuture()

    def kill(self) -> None:
        """Make the actor exit after its current message, skipping ``on_stop`` and its inbox."""
        if self.pending_reason is None:
            self.pending_reason = KILLED
        self.ref.actor_stopped.set()
        # tell() refuses a stopped actor; put the wake-up in the inbox directly so an idle
        # actor blocked in inbox.get() notices the kill
        self.ref.actor_inbox.put(Envelope(_Wake()))


_lives: dict[str, _Life] = {}
_recent_exits: dict[str, ExitReason] = {}
_RECENT_EXITS_KEPT = 4096
_lives_lock = threading.Lock()
_monitor_ids = itertools.count(1)
_exit_hooks: list[Callable[[pykka.ActorRef[Any], ExitReason], None]] = []


def life_of(ref: pykka.ActorRef[Any]) -> _Life | None:
    """The live bookkeeping of ``ref``, or ``None`` once it has exited (or is not ours)."""
    with _lives_lock:
        return _lives.get(ref.actor_urn)


def exit_reason(ref: pykka.ActorRef[Any]) -> ExitReason | None:
    """Why ``ref`` exited (for recently exited actors), or ``None`` while it lives."""
    with _lives_lock:
        life = _lives.get(ref.actor_urn)
        if life is not None:
            return life.reason
        return _recent_exits.get(ref.actor_urn, NOPROC)


def _deliver(target: _Target, down: Down) -> None:
    try:
        if isinstance(target, pykka.ActorRef):
            target.tell(down)
        else:
            target(down)
    except pykka.ActorDeadError:
        pass
    except Exception:
        logger.exception("monitor callback for %s failed", down.actor_ref)


def monitor(ref: pykka.ActorRef[Any], target: _Target) -> MonitorRef:
    """Deliver a :class:`Down` to ``target`` (an ``ActorRef`` or a callable) when ``ref`` exits.

    If ``ref`` has already exited, the ``Down`` (reason ``noproc``) is delivered at once.
    Callables run in the exiting actor's thread: keep them short and non-blocking.
    """
    mref = MonitorRef(next(_monitor_ids), ref.actor_urn)
    life = life_of(ref)
    if life is not None:
        with life.lock:
            if life.reason is None:
                life.monitors[mref.id] = target
                return mref
            reason = life.reason
    else:
        reason = NOPROC
    _deliver(target, Down(mref, ref, reason))
    return mref


def demonitor(mref: MonitorRef) -> None:
    """Cancel a monitor; no ``Down`` is delivered for it afterwards (idempotent)."""
    with _lives_lock:
        life = _lives.get(mref.actor_urn)
    if life is not None:
        with life.lock:
            life.monitors.pop(mref.id, None)


def add_exit_hook(hook: Callable[[pykka.ActorRef[Any], ExitReason], None]) -> None:
    """Run ``hook(ref, reason)`` in every exiting actor's thread before monitors are told."""
    _exit_hooks.append(hook)


class Actor(pykka.ThreadingActor):
    """A ``pykka.ThreadingActor`` that can be supervised and monitored.

    Subclass it as you would ``pykka.ThreadingActor``. ``started`` is a future that
    completes when ``on_start`` returns (or fails with its exception). An exception in
    ``on_start``, in a ``tell`` handler, in ``on_failure`` or in ``on_stop`` is an abnormal
    exit; a stop is a normal one. An exception in an ``ask`` goes back to the caller and
    the actor lives on, as in pykka.
    """

    def __init__(self) -> None:
        super().__init__()
        self._life = _Life(self.actor_ref)
        self.started = self._life.started
        with _lives_lock:
            _lives[self.actor_urn] = self._life

    def _actor_loop(self) -> None:
        self._life.thread = threading.current_thread()
        try:
            try:
                self.on_start()
            except Exception:
                self.started.set_exception(sys.exc_info())
                self._handle_failure(*sys.exc_info())
            except BaseException:
                self.started.set_exception(sys.exc_info())
                raise
            else:
                self.started.set(None)
            self._actor_loop_running()
            self._drain_tells()
            self._actor_loop_teardown()
        finally:
            self._exit()

    def _drain_tells(self) -> None:
        # pykka drops tells left in the inbox at exit; give the actor a last look at them
        # (asks left there still fail with ActorDeadError in pykka's teardown)
        kept = []
        while not self.actor_inbox.empty():
            envelope = self.actor_inbox.get()
            if envelope.reply_to is None and not isinstance(envelope.message, _Wake | _Shutdown):
                try:
                    self.on_undelivered(envelope.message)
                except Exception:
                    logger.exception("on_undelivered failed in %s", self.actor_ref)
            else:
                kept.append(envelope)
        for envelope in kept:
            self.actor_inbox.put(envelope)

    def on_undelivered(self, message: Any) -> None:
        """A ``tell`` that was still in the inbox when the actor exited (runs in its thread).
        Override to answer requests that would otherwise wait forever."""

    def _handle_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        if self._life.pending_reason is None or not self._life.pending_reason.abnormal:
            self._life.pending_reason = ExitReason("error", exception_value)
        super()._handle_failure(exception_type, exception_value, traceback)

    def _handle_receive(self, message: Any) -> Any:
        if isinstance(message, _Wake):
            return None
        if isinstance(message, _Shutdown):
            if self._life.pending_reason is None:
                self._life.pending_reason = SHUTDOWN
            return self._stop()
        return super()._handle_receive(message)

    def _exit(self) -> None:
        life = self._life
        reason = life.pending_reason or NORMAL
        pykka.ActorRegistry.unregister(self.actor_ref)
        with _lives_lock:
            _lives.pop(self.actor_urn, None)
            _recent_exits[self.actor_urn] = reason
            while len(_recent_exits) > _RECENT_EXITS_KEPT:
                del _recent_exits[next(iter(_recent_exits))]
        for hook in list(_exit_hooks):
            try:
                hook(self.actor_ref, reason)
            except Exception:
                logger.exception("exit hook failed for %s", self.actor_ref)
        with life.lock:
            life.reason = reason
            targets = list(life.monitors.items())
            life.monitors.clear()
        for mid, target in targets:
            _deliver(target, Down(MonitorRef(mid, self.actor_urn), self.actor_ref, reason))
        life.exited.set()
