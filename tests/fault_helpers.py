"""Fault injection for tests: production code carries no hooks for it."""

from __future__ import annotations

from typing import Any

import pytest

import erllama
from erllama.model.actor import ModelActor


class Crash:
    """A message only tests send: a model actor patched by :func:`crash_model` raises on it,
    as a bug in one of its handlers would."""


def crash_model(monkeypatch: pytest.MonkeyPatch, model_id: str) -> None:
    """Make the model actor serving ``model_id`` fail (``injected crash``) when it takes the
    message sent now: ``ModelActor.on_receive`` raises on :class:`Crash` until the test ends."""
    if not getattr(ModelActor.on_receive, "injects_crash", False):
        on_receive = ModelActor.on_receive

        def crashing(self: ModelActor, message: Any) -> Any:
            if isinstance(message, Crash):
                raise RuntimeError(f"model {self.model_id!r}: injected crash")
            return on_receive(self, message)

        crashing.injects_crash = True  # type: ignore[attr-defined]
        monkeypatch.setattr(ModelActor, "on_receive", crashing)
    erllama.whereis(model_id).tell(Crash())
