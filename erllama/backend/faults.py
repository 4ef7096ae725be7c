"""A test-only switch that makes a child process (probe, self-check, worker) die at a stage.

``ERLLAMA_TEST_CRASH=STAGE[:SIGNAL]`` (for example ``decode:SIGSEGV``) makes every child
process that reaches ``crash_point(STAGE)`` kill itself with that signal (default SIGSEGV),
just as a native defect of the build would. The tests use it to prove that a runtime that
cannot decode is reported as :class:`~erllama.errors.RuntimeBroken` and not blamed on the
model file. The host process never calls :func:`crash_point`: the switch only affects the
sacrificial children, and nothing in a normal environment sets it.
"""

from __future__ import annotations

import os
import signal

__all__ = ["ENV", "crash_point", "crash_requested"]

ENV = "ERLLAMA_TEST_CRASH"


def crash_requested() -> str | None:
    """The value of the switch, or None when it is unset."""
    return os.environ.get(ENV) or None


def crash_point(stage: str) -> None:
    """Die by the requested signal here when the switch names ``stage`` (children only)."""
    spec = crash_requested()
    if not spec:
        return
    want, _, sig = spec.partition(":")
    if want != stage:
        return
    signum = getattr(signal, sig or "SIGSEGV", signal.SIGSEGV)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
