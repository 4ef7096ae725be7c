"""The cache store under concurrent bursts: real threads, real tier directories, real bytes.

* :class:`StressMachine` (hypothesis, stateful): every step is a burst of 3-6 threads
  saving (fresh and repeated keys, any tier, ``wait`` or not), restoring, restoring disk
  rows (which promotes them to ``ram_file``) and evicting, all at once; now and then the
  store is closed and started again on the same directories. Two variants: a ``disk``
  large enough for every row (no row may ever be dropped) and a small one (rows are
  dropped, and every drop must be one the store counted).
* ``test_many_writers_planning_the_same_victim_lose_no_row``: the original race, many
  writers into a tiny ``ram`` tier so that several plan the same least recently used victim.
* ``test_a_save_waits_for_rows_in_flight_then_lands_or_spills``: every ``ram`` row is
  mid-move; a save to ``ram`` waits for them (``room_waits``) and lands in ``ram``, or with a
  tiny ``room_wait_s`` spills to ``ram_file`` (``saves_spilled``).

While a burst runs a sampler thread checks, as fast as it can (a ~1 ms nap between
samples), that no tier ever holds more bytes than its quota: for a file tier the sum of
``st_size`` over the distinct inodes of every file in its directory (rows and
temporaries; the one-byte ``ctime-probe`` file a ``FileTier`` writes at creation is
ignored), for ``ram`` the sizes of the parts ``RamTier`` holds; and that every
``stats()`` snapshot has ``charged <= quota``, ``charged == bytes + reserved + moving_in +
leaving`` and ``rows == adopted + saves + moves_in - moves_out - evictions - removed`` in
every tier. A directory sample lists the names with one ``getdents`` (an atomic snapshot
for these small directories) and then stats them one by one, so it counts the files that
existed at the listing, each at its size when stat'ed. As every file is charged its full
size from before it is created until after it is deleted, and a key's row always has the
same size here, such a sample never exceeds the charge at the moment of the listing: an
over-quota sample is a real over-quota instant, not a sampling artefact.

``ram_file`` lives on a small tmpfs mounted by this module (``mount -t tmpfs``, as root)
whose size is the ``ram_file`` quota plus a page of slack per file that could exist at
once, so the kernel itself refuses (ENOSPC, a failed save or move, which the tests
detect) a ``ram_file`` tier going clearly over its quota. Where the mount is refused
(not root, no CAP_SYS_ADMIN), the tier uses a fresh directory under ``/dev/shm``, also
tmpfs but without that kernel-side limit; the tests pass either way (``SHM_KIND`` says
which was used).

Examples are derandomized by the suite's "erllama" hypothesis profile: 20 examples of up to
10 steps with a large disk, 10 with a small one (a few seconds). For a longer run, e.g.
``ERLLAMA_STRESS_EXAMPLES=60 ERLLAMA_STRESS_STEPS=10 HYPOTHESIS_PROFILE=explore`` (the
small-disk machine runs half as many examples). ``-s`` prints what the machines did.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

from erllama import errors
from erllama.cache import kvc, publish
from erllama.cache.counters import counters
from erllama.cache.index import TIERS, RowStatus
from erllama.cache.key import KeyMeta, cache_key
from erllama.cache.pressure import PressureConfig
from erllama.cache.store import CacheConfig, CacheStore

from cache_helpers import Sampler, Warnings, check_snapshot, dir_bytes
from supervision_helpers import wait_until

EXAMPLES = int(os.environ.get("ERLLAMA_STRESS_EXAMPLES", "20"))


def waiting_for_room() -> bool:
    """Some thread is blocked on a room waiter: a future's ``get`` called by the store's
    ``_make_room`` (the wait for bytes to be released, not a spill to the next tier)."""
    for frame in sys._current_frames().values():
        inner = None
        while frame is not None:
            if frame.f_code.co_name == "_make_room" and inner == "get":
                return True
            inner, frame = frame.f_code.co_name, frame.f_back
    return False
STEPS = int(os.environ.get("ERLLAMA_STRESS_STEPS", "10"))

KM = KeyMeta(b"s" * 32, 7, b"c" * 32)
LOGITS = np.arange(64, dtype=np.float32)
N_KEYS = 40
MIN_KV, MAX_KV = 20_000, 80_000

RAM_Q = 170_000  # 2 to 8 rows
RF_Q = 200_000  # 2 to 9 rows
DISK_BIG = 4_000_000  # every key's row (40 x <= 80.6 kB) at once
DISK_SMALL = 300_000
PAGE = 4096
# the most files ram_file can hold within its quota (a temporary and its final name are one inode)
MOUNT_SIZE = RF_Q + (RF_Q // MIN_KV + 3) * PAGE

TOTALS: dict[str, int] = {"examples": 0}
"""What the state machines did, summed over examples (printed at the module's end; ``-s``)."""
SHM_ROOT: Path | None = None
SHM_KIND = "unset"

log = logging.getLogger("erllama.cache")


# ---- rows ------------------------------------------------------------------------------------


def tokens_of(i: int) -> list[int]:
    return [i + 1, 7, 7] + list(range(100, 100 + i % 5))


def kv_size(i: int) -> int:
    return MIN_KV + (i * 15_077) % (MAX_KV - MIN_KV + 1)


def payload(i: int, size: int | None = None) -> bytes:
    size = kv_size(i) if size is None else size
    return (i.to_bytes(4, "little") * (size // 4 + 1))[:size]


def logits_of(i: int) -> np.ndarray | None:
    return None if i % 3 == 0 else LOGITS


def row_meta(i: int) -> kvc.RowMeta:
    return kvc.RowMeta(fingerprint=KM.fingerprint, quant=KM.quant, ctx_params_hash=KM.ctx_params_hash,
                       tokens=tokens_of(i), save_reason=kvc.SaveReason.COLD)


KEYS = {i: cache_key(KM, tokens_of(i)) for i in range(1000)}
IDS = {k: i for i, k in KEYS.items()}


def check_row(row: kvc.Row, i: int, size: int | None = None) -> None:
    """A restored row is exactly the one saved under key ``i``."""
    assert row.meta.token_ids == tuple(tokens_of(i)), f"key {i}: wrong tokens {row.meta.token_ids}"
    assert bytes(row.kv) == payload(i, size), f"key {i}: KV bytes differ from the saved ones"
    want = logits_of(i)
    if want is None:
        assert row.logits is None or len(row.logits) == 0, f"key {i}: logits appeared"
    else:
        np.testing.assert_array_equal(np.frombuffer(row.logits, dtype=np.float32), want)
    assert row.tier in TIERS, f"key {i}: served by {row.tier!r}"


# ---- the tmpfs for ram_file ---------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def shm_root():
    """A small tmpfs for the ``ram_file`` directories of this module (else /dev/shm)."""
    global SHM_ROOT, SHM_KIND
    mnt = Path(tempfile.mkdtemp(prefix="erllama-stress-tmpfs-"))
    try:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={MOUNT_SIZE},mode=0700", "tmpfs", str(mnt)],
                             capture_output=True, timeout=30)
        mounted = res.returncode == 0
    except (OSError, subprocess.SubprocessError):
        mounted = False
    if mounted:
        SHM_ROOT, SHM_KIND = mnt, f"tmpfs mounted at {mnt}, size={MOUNT_SIZE}"
    else:
        mnt.rmdir()
        SHM_ROOT = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="erllama-stress-"))
        SHM_KIND = f"no mount possible; fresh directory {SHM_ROOT} on /dev/shm"
    try:
        yield SHM_ROOT
    finally:
        print(f"\ntest_cache_stress: ram_file on {SHM_KIND}; {TOTALS}")
        if mounted:
            subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)
            with contextlib.suppress(OSError):
                mnt.rmdir()
        else:
            shutil.rmtree(SHM_ROOT, ignore_errors=True)
        SHM_ROOT = None


def fresh_dirs() -> tuple[Path, Path]:
    """A new ``ram_file`` directory on the module's tmpfs and a new ``disk`` directory."""
    assert SHM_ROOT is not None
    return Path(tempfile.mkdtemp(dir=SHM_ROOT)), Path(tempfile.mkdtemp(prefix="erllama-stress-disk-"))


def config(shm: Path, disk: Path, *, ram=RAM_Q, ram_file=RF_Q, disk_quota=DISK_BIG, **kw) -> CacheConfig:
    return CacheConfig(ram_quota=ram, ram_file_dir=str(shm), ram_file_quota=ram_file, disk_dir=str(disk),
                       disk_quota=disk_quota, pressure=PressureConfig(enabled=False), **kw)


# ---- instrumentation -------------------------------------------------------------------------------


class Journal:
    """What the meta server told one store: rows evicted (``evict``) and rows dropped by a
    demotion with no room anywhere (``demote`` -> ``("drop", row)``), as ``(key, tier)``.
    Installed as the store's ``_ask`` (an instance attribute; the library is unchanged)."""

    def __init__(self, store: CacheStore) -> None:
        self.lock = threading.Lock()
        self.evicted: list[tuple[bytes, str]] = []
        self.dropped: list[tuple[bytes, str]] = []
        real = store._ask

        def ask(method, *args):
            res = real(method, *args)
            if method == "evict":
                with self.lock:
                    self.evicted.extend((r.key, r.tier) for r in res)
            elif method == "demote" and res[0] == "drop":
                with self.lock:
                    self.dropped.append((res[1].key, res[1].tier))
            return res

        store._ask = ask

    def marks(self) -> tuple[int, int]:
        with self.lock:
            return len(self.evicted), len(self.dropped)

    def since(self, mark: tuple[int, int]) -> tuple[set[bytes], set[bytes]]:
        with self.lock:
            return {k for k, _ in self.evicted[mark[0]:]}, {k for k, _ in self.dropped[mark[1]:]}

    def per_tier(self) -> dict[str, int]:
        out = dict.fromkeys(TIERS, 0)
        with self.lock:
            for _, tier in self.evicted + self.dropped:
                out[tier] += 1
        return out


def close_store(store: CacheStore, timeout: float = 60.0) -> None:
    """``close(persist=False)`` at the end of a test, on a helper thread: a test that failed
    on a hang must not hang in its cleanup too."""
    th = threading.Thread(target=store.close, kwargs={"persist": False}, daemon=True, name="stress-close")
    th.start()
    th.join(timeout)


def quiesce(store: CacheStore) -> None:
    assert store.flush(60), f"the writer pool did not go idle: {store.writer.stats()}"
    store.sync()


def check_consistent(store: CacheStore, where: str) -> dict:
    """Nothing in flight: the index matches the tiers' bytes exactly."""
    quiesce(store)
    stats = store.stats()
    check_snapshot(stats, where)
    assert stats["reservations"] == 0, f"{where}: {stats['reservations']} reservations left"
    w = stats["writer"]
    assert (w["busy"], w["queued"], w["queued_bytes"]) == (0, 0, 0), f"{where}: writer {w}"
    rows = list(store.index.rows.values())
    for r in rows:
        assert r.status is RowStatus.AVAILABLE, f"{where}: {r}"
        assert r.refcount == 0, f"{where}: refcount left: {r}"
        assert r.moving_to is None, f"{where}: still moving: {r}"
    for tier, t in stats["tiers"].items():
        mine = [r for r in rows if r.tier == tier]
        assert (t["reserved"], t["moving_in"], t["leaving"]) == (0, 0, 0), f"{where}: {tier} {t}"
        assert t["rows"] == len(mine) and t["bytes"] == sum(r.size for r in mine) == t["charged"], \
            f"{where}: {tier} {t} vs {len(mine)} rows"
        obj = store.tiers[tier]
        if tier == "ram":
            assert set(obj.keys()) == {r.key for r in mine}, f"{where}: RamTier holds other rows than the index"
            with obj._lock:
                assert sum(p.size for p, _ in obj._rows.values()) == t["bytes"]
            continue
        names = os.listdir(obj.directory)
        tmp = [n for n in names if n.endswith(publish.TMP_SUFFIX)]
        assert not tmp, f"{where}: temporaries left in {tier}: {tmp}"
        files = {n for n in names if n.endswith(publish.ROW_SUFFIX)}
        want = {publish.row_path(obj.directory, r.key).name for r in mine}
        assert files == want, (f"{where}: {tier} files != index: only files {sorted(files - want)}, "
                               f"only index {sorted(want - files)}")
        real, _ = dir_bytes(obj.directory)
        assert real == t["bytes"], f"{where}: {tier} holds {real} bytes of files, the index {t['bytes']}"
    return stats


def restore_exact(store: CacheStore, i: int) -> str:
    """Restore key ``i``, which must be present, byte-exact; the tier that served it."""
    hit = store.lookup(KM, tokens_of(i))
    assert hit is not None and hit.kind == "exact", f"key {i} is not found by lookup: {hit}"
    with store.restore(KEYS[i]) as row:
        assert row is not None, f"key {i} is in the index but did not restore"
        check_row(row, i)
        return row.tier


def run_threads(targets: list, timeout: float = 120.0) -> None:
    """Start every target on its own thread; fail on an exception or a hang."""
    failures: list[str] = []
    barrier = threading.Barrier(len(targets))

    def wrap(fn):
        def run():
            try:
                barrier.wait(30)
                fn()
            except BaseException:  # surfaced below
                failures.append(traceback.format_exc())
        return run

    threads = [threading.Thread(target=wrap(fn), daemon=True, name=f"stress-{n}") for n, fn in enumerate(targets)]
    for th in threads:
        th.start()
    deadline = time.monotonic() + timeout
    for th in threads:
        th.join(max(0.0, deadline - time.monotonic()))
    hung = [th.name for th in threads if th.is_alive()]
    assert not hung, f"threads hung for {timeout} s (deadlock?): {hung}"
    assert not failures, "\n".join(failures)


# ---- the state machine -----------------------------------------------------------------------------

key_ids = st.integers(0, N_KEYS - 1)
EVICT_TIERS = [("ram",), ("ram_file",), ("ram", "ram_file"), ("disk",), ("ram_file", "disk"), None]
save_op = st.tuples(st.just("save"), key_ids, st.sampled_from(TIERS), st.booleans())
ops = st.one_of(
    save_op, save_op, save_op,
    st.tuples(st.just("restore"), key_ids), st.tuples(st.just("restore"), key_ids),
    st.tuples(st.just("restore_disk"), st.integers(0, 1000)),
    st.tuples(st.just("evict"), st.sampled_from([1, 25_000, 90_000, -1]), st.sampled_from(EVICT_TIERS)),
)
bursts = st.lists(st.lists(ops, min_size=1, max_size=6), min_size=3, max_size=6)
storms = st.lists(st.lists(st.tuples(key_ids, st.booleans()), min_size=1, max_size=4), min_size=3, max_size=6)


class StressMachine(RuleBasedStateMachine):
    """Bursts of concurrent operations on one real store; a consistent state after each."""

    SMALL_DISK = False

    def __init__(self) -> None:
        super().__init__()
        counters.reset()
        self.shm, self.disk = fresh_dirs()
        self.cfg = config(self.shm, self.disk, disk_quota=DISK_SMALL if self.SMALL_DISK else DISK_BIG,
                          writer_max_concurrent=4)
        self.warnings = Warnings().__enter__()
        self.present: set[int] = set()  # keys available after the last step
        self.lock = threading.Lock()
        self.store = None
        self._start()
        self.stats_seen = {"bursts": 0, "restarts": 0, "no_room": 0, "dropped_submits": 0, "samples": 0,
                           "stat_samples": 0, "persisted_ram_rows": 0}

    def _start(self) -> None:
        self.store = CacheStore.start(self.cfg)
        self.journal = Journal(self.store)

    def teardown(self) -> None:
        TOTALS["examples"] += 1
        for name, n in self.stats_seen.items():
            TOTALS[name] = TOTALS.get(name, 0) + n
        c = counters.snapshot()
        for name in ("demotions", "promotions", "evictions", "room_waits", "saves_spilled", "saves_dropped"):
            TOTALS[name] = TOTALS.get(name, 0) + c[name]
        try:
            if self.store is not None:
                close_store(self.store)
        finally:
            self.warnings.__exit__()
            shutil.rmtree(self.shm, ignore_errors=True)
            shutil.rmtree(self.disk, ignore_errors=True)

    # ---- one burst -------------------------------------------------------------------------------

    def _save(self, i: int, tier: str, wait: bool, futs: list) -> None:
        fut = self.store.save(row_meta(i), logits_of(i), payload(i), tier=tier, wait=wait)
        if fut is None:
            assert not wait, "a waiting save was refused"
            with self.lock:
                self.stats_seen["dropped_submits"] += 1
        else:
            futs.append((i, fut))

    def _settle(self, futs: list, saved: set[int]) -> None:
        for i, fut in futs:
            try:
                res = fut.result(timeout=60)
            except errors.CacheError as exc:
                # no tier from the one asked on could take it: only with a small disk
                assert self.SMALL_DISK and "no configured tier" in str(exc), f"save of key {i} failed: {exc!r}"
                with self.lock:
                    self.stats_seen["no_room"] += 1
                continue
            assert res in ("saved", "duplicate"), res
            with self.lock:
                saved.add(i)

    def _restore_any(self, key: bytes) -> None:
        with self.store.restore(key) as row:
            if row is not None:  # a key never saved, evicted or dropped meanwhile: None
                check_row(row, IDS[key])

    def _do(self, op, futs: list, saved: set[int]) -> None:
        kind = op[0]
        if kind == "save":
            _, i, tier, wait = op
            self._save(i, tier, wait, futs)
        elif kind == "restore":
            self._restore_any(KEYS[op[1]])
        elif kind == "restore_disk":  # a disk hit is promoted to ram_file when it has room
            on_disk = sorted(r.key for r in list(self.store.index.rows.values())
                             if r.tier == "disk" and r.status is RowStatus.AVAILABLE)
            if on_disk:
                self._restore_any(on_disk[op[1] % len(on_disk)])
        elif kind == "evict":
            _, n, tiers = op
            if not self.SMALL_DISK:  # a large disk never loses a row: evict the fast tiers only
                tiers = tuple(t for t in (tiers or TIERS) if t != "disk") or ("ram",)
            self.store.evict_bytes(n, tiers)
        else:
            raise AssertionError(op)

    def _burst(self, plans: list[list], where: str) -> None:
        mark = self.journal.marks()
        saved: set[int] = set()

        def thread(plan):
            def run():
                futs: list = []
                for op in plan:
                    self._do(op, futs, saved)
                self._settle(futs, saved)
            return run

        with Sampler.of(self.store) as sampler:
            run_threads([thread(p) for p in plans])
            quiesce(self.store)  # promotions and demotions the burst left to the writer pool
        sampler.check()
        self._seen(sampler)
        self.stats_seen["bursts"] += 1
        self._after(where, mark, saved)

    def _seen(self, sampler: Sampler) -> None:
        self.stats_seen["samples"] += sampler.samples
        self.stats_seen["stat_samples"] += sampler.stat_samples
        for tier, n in sampler.max_seen.items():
            name = f"max_real_{tier}/{sampler.quotas[tier]}"
            TOTALS[name] = max(TOTALS.get(name, 0), n)

    def _after(self, where: str, mark: tuple[int, int], saved: set[int]) -> None:
        check_consistent(self.store, where)
        evicted, dropped = self.journal.since(mark)
        now = {IDS[k] for k in self.store.index.rows}
        could = self.present | saved
        assert now <= could, f"{where}: rows nobody saved appeared: {sorted(now - could)}"
        lost = {i for i in could - now if KEYS[i] not in evicted | dropped}
        assert not lost, f"{where}: rows vanished without an eviction or a drop: {sorted(lost)}"
        self._check_flows(where)
        tiers = {}
        for i in sorted(now):
            tiers[i] = restore_exact(self.store, i)
        check_consistent(self.store, f"{where}, after restoring every row")  # promotions included
        assert {IDS[k] for k in self.store.index.rows} == now
        self.present = now
        assert not self.warnings.records, f"{where}: {self.warnings.records}"

    def _check_flows(self, where: str) -> None:
        stats = self.store.stats()["tiers"]
        counted = self.journal.per_tier()
        for tier, t in stats.items():
            assert t["removed"] == 0, f"{where}: {tier} lost rows to missing or corrupt files: {t}"
            assert t["evictions"] == counted[tier], \
                f"{where}: {tier} counts {t['evictions']} evictions, evict_bytes and drops made {counted[tier]}"
        if not self.SMALL_DISK:
            assert stats["disk"]["evictions"] == 0, f"{where}: the large disk evicted: {stats['disk']}"
            assert not self.journal.dropped, f"{where}: rows dropped with a large disk: {len(self.journal.dropped)}"

    # ---- rules -----------------------------------------------------------------------------------

    @rule(plans=bursts)
    def burst(self, plans):
        """Saves, restores, disk restores (promotions) and evictions on 3-6 threads at once."""
        self._burst(plans, f"burst {self.stats_seen['bursts']}")

    @rule(plans=storms)
    def storm(self, plans):
        """Only saves into ram, on 3-6 threads at once: demotion cascades."""
        self._burst([[("save", i, "ram", wait) for i, wait in p] for p in plans],
                    f"storm {self.stats_seen['bursts']}")

    @rule(readers=st.lists(st.integers(0, 1000), min_size=2, max_size=5),
          writers=st.lists(st.lists(key_ids, min_size=1, max_size=4), min_size=1, max_size=3))
    def promote_race(self, readers, writers):
        """Disk hits promoted into ram_file while saves into ram demote rows into it."""
        plans = [[("restore_disk", r), ("restore_disk", r + 1)] for r in readers]
        plans += [[("save", i, "ram", True) for i in w] for w in writers]
        self._burst(plans, f"promote race {self.stats_seen['bursts']}")

    @rule(plans=storms)
    def restart(self, plans):
        """A storm of saves into ram, then close(), which persists the ram rows; a new store
        on the same directories finds what the files hold, and it is what the old store held
        (less what it had to drop, with a small disk)."""
        self._burst([[("save", i, "ram", wait) for i, wait in p] for p in plans],
                    f"storm before restart {self.stats_seen['restarts']}")
        where = f"restart {self.stats_seen['restarts']}"
        before = {r.key: r.tier for r in self.store.index.rows.values()}
        mark = self.journal.marks()
        with Sampler.of(self.store, with_stats=False) as sampler:
            self.store.close()
        sampler.check()
        self._seen(sampler)
        _, dropped = self.journal.since(mark)
        self.store = None
        files: dict[bytes, str] = {}
        for tier, d in (("ram_file", self.shm), ("disk", self.disk)):
            names = os.listdir(d)
            assert not [n for n in names if n.endswith(publish.TMP_SUFFIX)], f"{where}: {names}"
            for n in names:
                if n.endswith(publish.ROW_SUFFIX):
                    key = bytes.fromhex(n[: -len(publish.ROW_SUFFIX)])
                    assert key not in files, f"{where}: {n} is in ram_file and in disk"
                    files[key] = tier
        assert set(files) <= set(before), f"{where}: files of rows the store did not have"
        missing = set(before) - set(files)
        if self.SMALL_DISK:
            assert missing <= dropped, f"{where}: rows lost by close() without a drop: {missing - dropped}"
        else:
            assert not missing, (f"{where}: close() lost rows with a large disk: "
                                 f"{sorted((IDS[k], before[k]) for k in missing)}; drops {len(dropped)}")
        for key, tier in before.items():  # persisting ram rows pushes rows down, never up
            if key in files:
                assert TIERS.index(files[key]) >= TIERS.index(tier), f"{where}: {IDS[key]} rose from {tier}"
            if tier != "ram":
                assert key in files or key in dropped, f"{where}: a {tier} row vanished at close"
        self.stats_seen["persisted_ram_rows"] += sum(before[k] == "ram" for k in files)
        self._start()
        self.stats_seen["restarts"] += 1
        rows = {r.key: r.tier for r in self.store.index.rows.values()}
        assert rows == files, f"{where}: the new store's index != the files it started on"
        stats = check_consistent(self.store, where)
        for tier, t in stats["tiers"].items():
            assert t["adopted"] == t["rows"] == sum(v == tier for v in files.values()), f"{where}: {tier} {t}"
        self.present = {IDS[k] for k in rows}
        self._after(where, self.journal.marks(), set())


class StressSmallDiskMachine(StressMachine):
    """The same with a disk too small for everything: rows are dropped, each one counted."""

    SMALL_DISK = True


# No shrinking: a failure depends on how the threads interleaved, so a shrunk sequence
# rarely fails again; the failing sequence is reported as it ran.
_PHASES = (Phase.explicit, Phase.reuse, Phase.generate)
TestStress = StressMachine.TestCase
TestStress.settings = settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, phases=_PHASES)
TestStressSmallDisk = StressSmallDiskMachine.TestCase
TestStressSmallDisk.settings = settings(max_examples=max(1, EXAMPLES // 2), stateful_step_count=STEPS,
                                        deadline=None, phases=_PHASES)


# ---- the original race, deterministically enough -----------------------------------------------------


def test_many_writers_planning_the_same_victim_lose_no_row():
    """16 threads, released together, each save 3 rows into a ram tier that holds two:
    eight writer threads plan the same least recently used victim at once, again and again.
    Every row lands and stays (the disk holds them all), nothing is evicted, the index
    matches the files, and no tier ever holds more than its quota."""
    counters.reset()
    shm, disk = fresh_dirs()
    cfg = config(shm, disk, ram=100_000, disk_quota=10**8, writer_max_concurrent=8, writer_queue=64)
    store = CacheStore.start(cfg)
    journal = Journal(store)
    try:
        with Warnings() as warned:
            everything: list[int] = []
            for rnd in range(3):
                base = 100 + rnd * 48
                results: dict[int, str] = {}

                def writer(t, base=base, results=results):
                    for j in range(3):
                        i = base + t * 3 + j
                        fut = store.save(row_meta(i), logits_of(i), payload(i, 30_000 + (i % 7) * 1000),
                                         tier="ram", wait=True)
                        results[i] = fut.result(timeout=60)

                with Sampler.of(store) as sampler:
                    run_threads([lambda t=t: writer(t) for t in range(16)])
                    quiesce(store)
                sampler.check()
                assert sorted(set(results.values())) == ["saved"] and len(results) == 48
                check_consistent(store, f"round {rnd}")
                everything += sorted(results)
                for i in everything:
                    with store.restore(KEYS[i]) as row:
                        assert row is not None, f"round {rnd}: row {i} was lost"
                        check_row(row, i, 30_000 + (i % 7) * 1000)
                check_consistent(store, f"round {rnd}, after the restores")
            stats = store.stats()["tiers"]
            assert sum(t["rows"] for t in stats.values()) == 3 * 48
            assert all(t["evictions"] == 0 for t in stats.values()), stats
            assert not journal.dropped and not journal.evicted
            assert counters.get("demotions") > 0 and counters.get("saves_failed") == 0
            assert not warned.records, warned.records
    finally:
        close_store(store)
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)


# ---- every fast row mid-move ---------------------------------------------------------------------------


@pytest.mark.parametrize("room_wait_s", [10.0, 0.05])
def test_a_save_waits_for_rows_in_flight_then_lands_or_spills(room_wait_s):
    """Both ram rows are being moved to ram_file (their copies are held at a gate), so ram
    has no victim left; a save to ram waits for the moves (``room_waits``) and lands in ram
    once they finish, not in a slower tier. With ``room_wait_s`` tiny it spills to
    ram_file instead (``saves_spilled``), while the moves are still held."""
    counters.reset()
    shm, disk = fresh_dirs()
    size = 40_000  # rows of 40.5 kB: ram (100 kB) holds two
    cfg = config(shm, disk, ram=100_000, disk_quota=10**7, room_wait_s=room_wait_s)
    store = CacheStore.start(cfg)
    gate = threading.Event()
    held: list[bytes] = []
    movers: list[threading.Thread] = []
    try:
        with Warnings() as warned, Sampler.of(store) as sampler:
            for i in (1, 2):
                assert store.save(row_meta(i), logits_of(i), payload(i, size), wait=True).result(10) == "saved"
            assert {store.index.get(KEYS[i]).tier for i in (1, 2)} == {"ram"}
            real_put = store.tiers["ram_file"].put

            def gated_put(key, parts):
                if key in (KEYS[1], KEYS[2]):
                    held.append(key)
                    assert gate.wait(30), "the gate was never opened"
                return real_put(key, parts)

            store.tiers["ram_file"].put = gated_put
            # two persisters: the second finds the first's row moving and starts on the other
            movers = [threading.Thread(target=store.persist_ram, daemon=True) for _ in range(2)]
            for th in movers:
                th.start()
            wait_until(lambda: len(held) == 2, 10, "both ram rows mid-move")
            assert {store.index.get(KEYS[i]).moving_to for i in (1, 2)} == {"ram_file"}
            t = store.stats()["tiers"]
            assert t["ram_file"]["moving_in"] == t["ram"]["bytes"] == 2 * store.index.get(KEYS[1]).size

            fut = store.save(row_meta(3), logits_of(3), payload(3, size), tier="ram")
            assert fut is not None
            if room_wait_s > 1:
                wait_until(lambda: counters.get("room_waits") > 0, 10, "the save to wait for room")
                wait_until(waiting_for_room, 10, "the save's writer to block on its room waiter")
                assert not fut.done(), f"the save did not wait: {fut.result()}"
                assert store.stats()["tiers"]["ram"]["reserved"] == 0
                gate.set()
                assert fut.result(timeout=30) == "saved"
                assert store.index.get(KEYS[3]).tier == "ram", "the save spilled instead of waiting"
                assert counters.get("saves_spilled") == 0
            else:
                assert fut.result(timeout=30) == "saved"
                assert counters.get("room_waits") > 0
                assert store.index.get(KEYS[3]).tier == "ram_file"
                assert counters.get("saves_spilled") == 1
                assert {store.index.get(KEYS[i]).moving_to for i in (1, 2)} == {"ram_file"}  # still held
                gate.set()
            for th in movers:
                th.join(30)
                assert not th.is_alive(), "persist_ram hung"
            del store.tiers["ram_file"].put
            quiesce(store)
        sampler.check()
        check_consistent(store, "after the moves")
        assert {store.index.get(KEYS[i]).tier for i in (1, 2)} == {"ram_file"}
        for i in (1, 2, 3):
            with store.restore(KEYS[i]) as row:
                check_row(row, i, size)
        check_consistent(store, "after the restores")
        stats = store.stats()["tiers"]
        assert all(t["evictions"] == 0 for t in stats.values()), stats
        assert counters.get("demotions") == 2 and counters.get("saves_failed") == 0
        assert not warned.records, warned.records
    finally:
        gate.set()
        for th in movers:
            th.join(30)
        close_store(store)
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)
