"""Test actors and helpers for the supervision tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import supervision as S


class Events:
    """A thread-safe log of (event, name) pairs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.items: list[tuple[str, str]] = []

    def add(self, kind: str, name: str) -> None:
        with self._lock:
            self.items.append((kind, name))

    def take(self) -> list[tuple[str, str]]:
        with self._lock:
            out, self.items = self.items, []
            return out

    def wait_for(self, item: tuple[str, str], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if item in self.items:
                    return
            time.sleep(0.005)
        raise AssertionError(f"{item} did not happen; saw {self.items}")


class Worker(S.Actor):
    """A child that logs its life and crashes, stops or hangs on request.

    ``plan`` maps an incarnation number (1 = first start) to behaviour: ``"fail_start"``
    makes that incarnation's ``on_start`` raise; ``("slow_start", s)`` sleeps first.
    """

    incarnations: dict[str, int] = {}

    def __init__(self, name: str, events: Events, plan: dict[int, Any] | None = None,
                 stop_delay: float = 0.0) -> None:
        super().__init__()
        self.name = name
        self.events = events
        n = Worker.incarnations.get(name, 0) + 1
        Worker.incarnations[name] = n
        self.behaviour = (plan or {}).get(n)
        self.stop_delay = stop_delay

    def on_start(self) -> None:
        if isinstance(self.behaviour, tuple) and self.behaviour[0] == "slow_start":
            time.sleep(self.behaviour[1])
        if self.behaviour == "fail_start":
            self.events.add("start_failed", self.name)
            raise RuntimeError(f"{self.name} refuses to start")
        self.events.add("start", self.name)

    def on_stop(self) -> None:
        if self.stop_delay:
            time.sleep(self.stop_delay)
        self.events.add("stop", self.name)

    def on_failure(self, *exc_info: Any) -> None:
        self.events.add("crash", self.name)

    def on_receive(self, message: Any) -> Any:
        if message == "crash":
            raise RuntimeError(f"{self.name} crashes")
        if message == "stop":
            self.actor_ref.stop(block=False)
            return None
        if isinstance(message, tuple) and message[0] == "sleep":
            self.events.add("busy", self.name)
            time.sleep(message[1])
            return "slept"
        if message == "whoami":
            return (self.name, self.actor_urn)
        if message == "fail_ask":
            raise ValueError("bad request")
        return None


def worker(child_id: str, events: Events, *, plan: dict[int, Any] | None = None, stop_delay: float = 0.0,
           **spec: Any) -> S.ChildSpec:
    """A ChildSpec for a :class:`Worker`."""
    Worker.incarnations.pop(child_id, None)
    return S.ChildSpec(child_id, lambda: Worker.start(child_id, events, plan, stop_delay), **spec)


def refs(sup) -> dict[str, Any]:
    return {c.id: c.ref for c in S.which_children(sup)}


def wait_until(pred: Callable[[], object], timeout: float = 5.0, what: str | Callable[[], object] = "condition",
               step: float = 0.005) -> bool:
    """Poll ``pred`` until it is true and return ``True``, or fail the test after ``timeout`` s
    naming ``what`` (a callable ``what`` is called then, to describe the state it timed out in).
    The one wait helper of the suite: every test waits on an observable condition with it."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what() if callable(what) else what}")
        time.sleep(step)
    return True
