"""What the cache stress tests share: the real bytes of a tier, the identities of a
``stats()`` snapshot, a sampler thread that checks both against the quotas while a load
runs, and a collector of the cache logger's warnings."""

from __future__ import annotations

import logging
import os
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("erllama.cache")


def dir_bytes(directory: Path) -> tuple[int, list[tuple[str, int]]]:
    """Sum of ``st_size`` over the distinct inodes of the files in ``directory`` (rows and
    temporaries; the one-byte ``ctime-probe`` a ``FileTier`` writes at creation and the
    application's ``.lock`` ignored),
    the names listed at once then stat'ed (a file gone meanwhile counts 0)."""
    seen: dict[tuple[int, int], int] = {}
    names: list[tuple[str, int]] = []
    try:
        with os.scandir(directory) as it:
            entries = list(it)
    except FileNotFoundError:
        return 0, []
    for e in entries:
        if e.name.startswith("ctime-probe") or e.name == ".lock":
            continue
        try:
            st = e.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        seen[(st.st_dev, st.st_ino)] = st.st_size
        names.append((e.name, st.st_size))
    return sum(seen.values()), names


def ram_bytes(store: Any) -> int:
    """Bytes of the rows the store's ``ram`` tier holds (0 without one)."""
    ram = store.tiers.get("ram")
    if ram is None:
        return 0
    with ram._lock:  # the RamTier's own lock: one consistent view of its rows
        return sum(parts.size for parts, _ in ram._rows.values())


def check_snapshot(stats: dict, where: str) -> None:
    """The per-tier identities of one ``stats()`` snapshot."""
    for tier, t in stats["tiers"].items():
        assert t["charged"] <= t["quota"], f"{where}: {tier} charged {t['charged']} > quota {t['quota']}: {t}"
        assert t["charged"] == t["bytes"] + t["reserved"] + t["moving_in"] + t["leaving"], f"{where}: {tier} {t}"
        flows = t["adopted"] + t["saves"] + t["moves_in"] - t["moves_out"] - t["evictions"] - t["removed"]
        assert t["rows"] == flows, f"{where}: {tier} rows {t['rows']} != flows {flows}: {t}"
        assert min(t.values()) >= 0, f"{where}: {tier} has a negative figure: {t}"


class Sampler:
    """On its own thread, every ``interval`` s: the real bytes of each tier against its
    quota (the directories in ``dirs``, and the ``ram`` tier of the watched store) and,
    when a ``stats`` callable is watched, one snapshot's identities. Use as a context
    manager; :meth:`check` raises what it saw."""

    def __init__(self, quotas: dict[str, int], dirs: dict[str, Path], *, store: Any = None,
                 stats: Callable[[], dict] | None = None, interval: float = 0.001) -> None:
        self.quotas = quotas
        self.dirs = dirs
        self.store, self.stats = store, stats
        self.interval = interval
        self.max_seen = dict.fromkeys(quotas, 0)
        self.problems: list[str] = []
        self.samples = self.stat_samples = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cache-sampler", daemon=True)

    @classmethod
    def of(cls, store: Any, *, with_stats: bool = True, interval: float = 0.001) -> Sampler:
        """A sampler of ``store``'s tiers, quotas and (``with_stats``) ``store.stats()``."""
        return cls({t: store.config.quota(t) for t in store.tiers},
                   {t: tier.directory for t, tier in store.tiers.items() if t != "ram"},
                   store=store, stats=store.stats if with_stats else None, interval=interval)

    def watch(self, store: Any, stats: Callable[[], dict] | None) -> None:
        """Sample this store's ``ram`` tier and this ``stats`` source from now on."""
        with self._lock:
            self.store, self.stats = store, stats

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the sampler hung"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    self.sample()
            except Exception:  # surfaced by check()
                self.problems.append(traceback.format_exc())
                return
            self._stop.wait(self.interval)

    def sample(self) -> None:
        """Take one sample now."""
        self.samples += 1
        if self.store is not None:
            self._record("ram", ram_bytes(self.store), None)
        for tier, d in self.dirs.items():
            used, names = dir_bytes(d)
            self._record(tier, used, names)
        if self.stats is not None:
            try:
                stats = self.stats()
            except Exception as exc:
                self.problems.append(f"stats() failed while the cache ran: {exc!r}")
                self.stats = None
                return
            self.stat_samples += 1
            try:
                check_snapshot(stats, f"sample {self.samples}")
            except AssertionError as exc:
                if len(self.problems) < 20:
                    self.problems.append(str(exc))

    def _record(self, tier: str, used: int, names: Any) -> None:
        if tier not in self.quotas:
            return
        self.max_seen[tier] = max(self.max_seen[tier], used)
        if used > self.quotas[tier] and len(self.problems) < 20:
            self.problems.append(f"sample {self.samples}: {tier} held {used} real bytes > quota "
                                 f"{self.quotas[tier]}: {names}")

    def check(self, where: str = "sampler") -> None:
        """Fail with everything the sampler saw over a quota or inconsistent."""
        with self._lock:
            assert self.samples > 0
            assert not self.problems, f"{where}:\n" + "\n".join(self.problems)


class Warnings(logging.Handler):
    """Warnings of the ``erllama.cache`` logger (a failed move, an undeletable file, ...),
    collected while used as a context manager."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())

    def __enter__(self) -> Warnings:
        log.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        log.removeHandler(self)
