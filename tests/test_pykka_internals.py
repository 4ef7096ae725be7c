"""The private pykka internals that ``supervision`` (``supervision/_actor.py``) overrides or
calls, pinned: each test names the internal it guards, so an upgrade of pykka that changes
one fails here, loudly, before anything subtler fails elsewhere.

``pyproject.toml`` pins the pykka versions these tests passed on; widen the pin only after
running this file on the new version.
"""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import textwrap
import threading

import pykka
import pytest
from pykka import messages as pykka_messages
from pykka._envelope import Envelope

from supervision_helpers import wait_until


def params(func) -> list[str]:
    """Parameter names of ``func``, ``self`` included."""
    return list(inspect.signature(func).parameters)


def calls(func) -> list[str]:
    """Names of the functions/methods ``func``'s body calls, in source order."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            out.append(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "?"))
    return out


def test_the_installed_pykka_is_one_the_pin_allows():
    major, minor = (int(x) for x in importlib.metadata.version("pykka").split(".")[:2])
    assert (major, minor) == (4, 5), (
        f"pykka {importlib.metadata.version('pykka')} is outside the tested pin (>=4.5,<4.6 in "
        f"pyproject.toml): run this file and the supervision tests, then widen the pin")


@pytest.mark.parametrize("name, expected", [
    ("_actor_loop", ["self"]),
    ("_actor_loop_setup", ["self"]),
    ("_actor_loop_running", ["self"]),
    ("_actor_loop_teardown", ["self"]),
    ("_handle_failure", ["self", "exception_type", "exception_value", "traceback"]),
    ("_handle_receive", ["self", "message"]),
    ("_stop", ["self"]),
])
def test_the_overridden_actor_methods_keep_their_signatures(name, expected):
    method = getattr(pykka.ThreadingActor, name, None)
    assert method is not None, f"pykka.Actor.{name} is gone: supervision/_actor.py overrides or calls it"
    assert params(method) == expected, f"pykka.Actor.{name} changed its signature to {params(method)}"


def test_the_actor_loop_is_setup_running_teardown():
    # supervision.Actor replaces _actor_loop wholesale (on_start inline, then running and
    # teardown): a step pykka adds there would be silently skipped
    assert calls(pykka.Actor._actor_loop) == ["_actor_loop_setup", "_actor_loop_running",
                                              "_actor_loop_teardown"], \
        f"pykka.Actor._actor_loop changed: {calls(pykka.Actor._actor_loop)}"
    assert set(calls(pykka.Actor._actor_loop_setup)) == {"on_start", "_handle_failure", "exc_info"}, \
        f"pykka.Actor._actor_loop_setup changed: {calls(pykka.Actor._actor_loop_setup)}"
    assert "self._actor_loop" in inspect.getsource(pykka.ThreadingActor._start_actor_loop), \
        "pykka.ThreadingActor._start_actor_loop no longer runs self._actor_loop in the thread"


def test_envelope_is_message_and_reply_to():
    assert params(Envelope.__init__) == ["self", "message", "reply_to"], \
        f"pykka._envelope.Envelope changed its constructor: {params(Envelope.__init__)}"
    env = Envelope("m")
    assert env.message == "m" and env.reply_to is None, "pykka._envelope.Envelope changed its fields"


class Probe(pykka.ThreadingActor):
    """A plain pykka actor that records what reaches it (``Probe.last``: the newest one)."""

    last: Probe | None = None

    def __init__(self) -> None:
        super().__init__()
        Probe.last = self
        self.got: list[object] = []
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def on_start(self) -> None:
        self.thread = threading.current_thread()

    def on_receive(self, message):
        self.got.append(message)
        return message

    def on_stop(self) -> None:
        self.stopped.set()


def test_the_inbox_and_stop_flag_are_shared_with_the_ref():
    ref = Probe.start()
    actor = Probe.last
    try:
        assert ref.actor_inbox is actor.actor_inbox, "pykka.ActorRef.actor_inbox is not the actor's inbox"
        assert isinstance(ref.actor_stopped, threading.Event) and ref.actor_stopped is actor.actor_stopped, \
            "pykka.ActorRef.actor_stopped is not the actor's stop Event"
        for op in ("put", "get", "empty"):
            assert callable(getattr(ref.actor_inbox, op, None)), f"pykka's actor_inbox has no {op}()"
        # an envelope put straight into the inbox (what supervision's kill does) is delivered
        ref.actor_inbox.put(Envelope("direct"))
        wait_until(lambda: actor.got == ["direct"], what="the directly queued envelope")
    finally:
        ref.stop()


def test_setting_the_stop_flag_and_waking_ends_the_loop_without_on_stop():
    # supervision's kill(): set actor_stopped, then wake an idle actor with an envelope
    ref = Probe.start()
    actor = Probe.last
    wait_until(lambda: actor.thread is not None, what="the actor to start")
    ref.actor_stopped.set()
    ref.actor_inbox.put(Envelope("wake"))
    actor.thread.join(5)
    assert not actor.thread.is_alive(), "pykka's loop did not end when actor_stopped was set directly"
    assert not actor.stopped.is_set(), "pykka's loop ran on_stop after actor_stopped was set directly"
    pykka.ActorRegistry.unregister(ref)


def test_handle_receive_routes_actor_stop_to_stop_and_handle_failure_stops():
    src = inspect.getsource(pykka.Actor._handle_receive)
    assert "_ActorStop" in src and "self._stop()" in src, \
        "pykka.Actor._handle_receive no longer routes _ActorStop to _stop()"
    assert hasattr(pykka_messages, "_ActorStop"), "pykka.messages._ActorStop is gone"
    assert "actor_stopped.set()" in inspect.getsource(pykka.Actor._handle_failure), \
        "pykka.Actor._handle_failure no longer sets actor_stopped"
    assert "unregister" in inspect.getsource(pykka.Actor._handle_failure), \
        "pykka.Actor._handle_failure no longer unregisters the actor"
    assert "on_stop" in inspect.getsource(pykka.Actor._stop), "pykka.Actor._stop no longer runs on_stop"


def test_teardown_fails_left_asks_and_drops_left_tells():
    # supervision drains tells before pykka's teardown and relies on it failing the asks
    src = inspect.getsource(pykka.Actor._actor_loop_teardown)
    assert "reply_to" in src and "ActorDeadError" in src, \
        "pykka.Actor._actor_loop_teardown no longer fails the asks left in the inbox"
    assert callable(getattr(pykka.ActorRegistry, "unregister", None)), "pykka.ActorRegistry.unregister is gone"
