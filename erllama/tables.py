"""Tables owned by an actor: the application's model registry and in-flight table.

The pattern of the cache's meta server (and of ETS in the original): one actor is the
sole writer of a table, and any thread reads it without a message. The table is a plain
``dict`` whose values are replaced whole, never changed in place, so a read is one
atomic lookup. The dict belongs to the application, not to the actor: a restarted owner
takes over the same table and loses nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import supervision

__all__ = ["Table", "TableOwner"]

V = TypeVar("V")


class TableOwner(supervision.Actor):
    """The sole writer of one table (``("put", key, value)``, ``("pop", key)``,
    ``("update", key, changes)``, ``("apply", key, fn)``)."""

    def __init__(self, rows: dict[Any, Any]) -> None:
        super().__init__()
        self._rows = rows

    def on_receive(self, message: Any) -> Any:
        """Apply one write; returns the new value (``pop``: the old one)."""
        op, key, *rest = message
        if op == "put":
            self._rows[key] = rest[0]
            return rest[0]
        if op == "pop":
            return self._rows.pop(key, None)
        if op == "update":
            old = self._rows.get(key)
            if old is None:
                return None
            new = dataclasses.replace(old, **rest[0])
            self._rows[key] = new
            return new
        if op == "apply":
            new = rest[0](self._rows.get(key))
            if new is None:
                self._rows.pop(key, None)
            else:
                self._rows[key] = new
            return new
        raise ValueError(f"unknown table operation {op!r}")

    def on_undelivered(self, message: Any) -> None:
        """A write told to an owner that was exiting: apply it anyway (the table outlives it)."""
        self.on_receive(message)


class Table(Generic[V]):
    """A table read from any thread and written through its owner actor, found by
    ``name`` in the supervision registry (so writes follow the owner's restarts)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.rows: dict[Any, V] = {}

    def child_spec(self, id: str) -> supervision.ChildSpec:  # noqa: A002
        """The owner actor as a permanent worker of the root supervisor."""
        return supervision.ChildSpec(id, TableOwner.start, args=(self.rows,), name=self.name)

    def get(self, key: Any) -> V | None:
        """The value of ``key`` (no message)."""
        return self.rows.get(key)

    def items(self) -> list[tuple[Any, V]]:
        """A copy of the rows (no message)."""
        return list(self.rows.items())

    def _ask(self, *message: Any) -> Any:
        return supervision.registry.ask(self.name, message, timeout=30.0)

    def put(self, key: Any, value: V) -> V:
        """Set ``key`` (waits until the owner has written it)."""
        return self._ask("put", key, value)

    def pop(self, key: Any) -> V | None:
        """Remove ``key``; its old value."""
        return self._ask("pop", key)

    def update(self, key: Any, **changes: Any) -> V | None:
        """Replace ``key``'s value by a copy with ``changes`` (a dataclass); ``None`` if absent."""
        return self._ask("update", key, changes)

    def apply(self, key: Any, fn: Callable[[V | None], V | None]) -> V | None:
        """Set ``key`` to ``fn(old)`` in the owner (``None`` removes it); the new value."""
        return self._ask("apply", key, fn)

    def discard(self, key: Any) -> None:
        """Remove ``key`` without waiting (the owner's inbox is FIFO)."""
        supervision.registry.tell(self.name, ("pop", key), timeout=30.0)
