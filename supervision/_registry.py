"""A name registry whose entries follow supervised restarts."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import pykka

from supervision._actor import ExitReason, add_exit_hook

__all__ = ["NameNotFound", "NameTaken", "NameUnavailable", "Registry", "registry"]


class NameNotFound(LookupError):
    """No live actor is registered under the name."""


class NameTaken(ValueError):
    """Another live actor holds the name."""


class NameUnavailable(TimeoutError):
    """The name's actor is being restarted and did not come back within the wait."""


@dataclass
class _Entry:
    ref: pykka.ActorRef[Any] | None
    supervised: bool


class Registry:
    """Names → actors. A supervised entry survives its actor's exit as *pending* until the
    supervisor registers the restarted actor (lookups wait for it) or gives the name up."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._entries: dict[str, _Entry] = {}
        self._names: dict[str, str] = {}  # actor urn -> name

    def register(self, name: str, ref: pykka.ActorRef[Any], *, supervised: bool = False) -> None:
        """Register ``ref`` under ``name``; ``NameTaken`` if a live other actor holds it."""
        if not isinstance(name, str) or not name:
            msg = f"a registered name must be a non-empty str, got {name!r}"
            raise ValueError(msg)
        with self._cond:
            old = self._entries.get(name)
            if old is not None and old.ref is not None and old.ref.is_alive() and old.ref != ref:
                msg = f"name {name!r} is held by {old.ref}"
                raise NameTaken(msg)
            if old is not None and old.ref is not None:
                self._names.pop(old.ref.actor_urn, None)
            self._entries[name] = _Entry(ref, supervised)
            self._names[ref.actor_urn] = name
            self._cond.notify_all()

    def unregister(self, name: str) -> None:
        """Forget ``name`` (idempotent); waiters for it fail with ``NameNotFound``."""
        with self._cond:
            entry = self._entries.pop(name, None)
            if entry is not None and entry.ref is not None:
                self._names.pop(entry.ref.actor_urn, None)
            self._cond.notify_all()

    def whereis(self, name: str, timeout: float = 5.0) -> pykka.ActorRef[Any]:
        """The live actor registered as ``name``.

        While a supervised actor is being restarted, waits up to ``timeout`` seconds for
        the new one (``NameUnavailable`` after that). Never returns a dead ref.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                entry = self._entries.get(name)
                if entry is None:
                    msg = f"no actor is registered as {name!r}"
                    raise NameNotFound(msg)
                if entry.ref is not None and entry.ref.is_alive():
                    return entry.ref
                if not entry.supervised:
                    self._entries.pop(name, None)
                    msg = f"the actor registered as {name!r} has stopped"
                    raise NameNotFound(msg)
                left = deadline - time.monotonic()
                if left <= 0:
                    msg = f"the actor registered as {name!r} is restarting and was not back within {timeout} s"
                    raise NameUnavailable(msg)
                self._cond.wait(left)

    def tell(self, name: str, message: Any, timeout: float = 5.0) -> None:
        """Send ``message`` to the actor registered as ``name`` (waiting through a restart).

        A message refused because the actor was already stopped is sent again to its
        successor; a message accepted by an actor that then crashes is lost, as in OTP.
        """
        deadline = time.monotonic() + timeout
        while True:
            ref = self.whereis(name, max(0.0, deadline - time.monotonic()))
            try:
                ref.tell(message)
                return
            except pykka.ActorDeadError:
                if time.monotonic() >= deadline:
                    raise

    def ask(self, name: str, message: Any, timeout: float = 5.0) -> Any:
        """Ask the actor registered as ``name``; if it dies before handling the message
        (pykka's ``ActorDeadError``: the message was never processed), ask its successor."""
        deadline = time.monotonic() + timeout
        while True:
            ref = self.whereis(name, max(0.0, deadline - time.monotonic()))
            try:
                return ref.ask(message, timeout=max(0.0, deadline - time.monotonic()))
            except pykka.ActorDeadError:
                # resend only what died unprocessed with its actor; an ActorDeadError
                # raised by a live actor's handler is that handler's answer
                if ref.is_alive() or time.monotonic() >= deadline:
                    raise

    def names(self) -> dict[str, pykka.ActorRef[Any] | None]:
        """A snapshot: name → live ref, or ``None`` while it restarts."""
        with self._cond:
            return {n: (e.ref if e.ref is not None and e.ref.is_alive() else None)
                    for n, e in self._entries.items()}

    def _on_exit(self, ref: pykka.ActorRef[Any], reason: ExitReason) -> None:
        with self._cond:
            name = self._names.pop(ref.actor_urn, None)
            if name is None:
                return
            entry = self._entries.get(name)
            if entry is None or entry.ref != ref:
                return
            if entry.supervised:
                entry.ref = None  # pending: the supervisor re-registers or unregisters
            else:
                del self._entries[name]
            self._cond.notify_all()


registry = Registry()
"""The process-wide registry supervisors use for ``ChildSpec.name``."""

add_exit_hook(registry._on_exit)  # noqa: SLF001
