"""An autouse fixture: supervision tests leave no actor thread alive."""

from __future__ import annotations

import threading
import time

import pykka
import pytest


@pytest.fixture(autouse=True)
def no_actor_threads_left():
    """Every supervision test ends with no actor thread alive."""
    before = set(threading.enumerate())
    yield
    pykka.ActorRegistry.stop_all(timeout=5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and set(threading.enumerate()) - before:
        time.sleep(0.01)
    left = [t.name for t in set(threading.enumerate()) - before if not t.daemon]
    assert not left, f"actor threads left alive: {left}"
