"""The cache as a whole: quotas under load, demotion, lookups, restores, back-pressure,
restarts on the same directories and SIGKILLed writers."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from erllama.cache import kvc
from erllama.cache.counters import counters
from erllama.cache.key import KeyMeta, cache_key
from erllama.cache.store import CacheConfig, CacheStore

from supervision_helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent
KM = KeyMeta(b"f" * 32, 7, b"c" * 32)


def row_meta(tokens, reason=kvc.SaveReason.COLD):
    return kvc.RowMeta(fingerprint=KM.fingerprint, quant=KM.quant, ctx_params_hash=KM.ctx_params_hash,
                       tokens=tokens, save_reason=reason)


def payload(i: int, size: int = 40_000) -> bytes:
    return (i.to_bytes(4, "little") * (size // 4 + 1))[:size]


LOGITS = np.arange(64, dtype=np.float32)


@pytest.fixture
def cfg(tmp_path):
    return CacheConfig(ram_quota=200_000, ram_file_dir=str(tmp_path / "shm"), ram_file_quota=400_000,
                       disk_dir=str(tmp_path / "disk"), disk_quota=2_000_000, writer_max_concurrent=4)


@pytest.fixture
def store(cfg):
    counters.reset()
    s = CacheStore.start(cfg)
    yield s
    s.close()


def test_lookup_kinds_and_restore(store):
    base = list(range(1, 101))
    assert store.lookup(KM, base) is None
    store.save(row_meta(base), LOGITS, payload(1), wait=True).result(timeout=10)
    assert store.lookup(KM, base).kind == "exact"
    longer = base + [500, 501]
    hit = store.lookup(KM, longer)
    assert hit.kind == "partial" and hit.n_tokens == 100
    assert store.longest_prefix(KM, longer) == 100
    resume = store.lookup(KM, longer, parent_key=cache_key(KM, base))
    assert resume.kind == "resume" and resume.n_tokens == 100
    with store.restore(hit.key) as row:
        assert bytes(row.kv) == payload(1) and row.meta.token_ids == tuple(base)
        np.testing.assert_array_equal(np.frombuffer(row.logits, dtype=np.float32), LOGITS)
        assert store.index.get(hit.key).refcount == 1
    store.sync()  # the check-in is a message the reader does not wait for
    assert store.index.get(hit.key).refcount == 0
    c = counters.snapshot()
    assert (c["hits_exact"], c["hits_longest_prefix"], c["hits_resume"], c["misses"]) == (1, 1, 1, 1)
    assert c["saves_cold"] == 1 and c["bytes_ram"] == store.index.used["ram"] > 0
    assert store.save(row_meta(base), LOGITS, payload(1), wait=True).result(timeout=10) == "duplicate"
    assert counters.get("duplicate_dropped") == 1


def test_parent_key_waits_for_an_in_flight_save(cfg, monkeypatch):
    # a wait bound far above the 0.1 s the save is held back, so a loaded machine cannot
    # outlast it; the lookup returns as soon as the save lands
    store = CacheStore.start(dataclasses.replace(cfg, parent_wait_s=10.0))
    try:
        _parent_key_waits(store, monkeypatch)
    finally:
        store.close()


def _parent_key_waits(store, monkeypatch):
    base = list(range(1, 51))
    gate = threading.Event()
    real_put = store.tiers["ram"].put

    def slow_put(key, parts):
        gate.wait(5)
        real_put(key, parts)

    monkeypatch.setattr(store.tiers["ram"], "put", slow_put)
    fut = store.save(row_meta(base), LOGITS, payload(2))
    threading.Timer(0.1, gate.set).start()
    hit = store.lookup(KM, base + [7], parent_key=cache_key(KM, base))
    assert hit is not None and hit.kind == "resume"
    fut.result(timeout=5)


def test_parent_key_waits_for_a_save_still_queued(cfg):
    # every writer is busy, so the save is queued and its key not yet reserved when the
    # lookup asks: the lookup still waits for it (this raced before: no reservation, no wait)
    store = CacheStore.start(dataclasses.replace(cfg, parent_wait_s=10.0, writer_max_concurrent=1))
    try:
        base = list(range(1, 51))
        gate = threading.Event()
        blocker = store.writer.submit(gate.wait, 5)
        fut = store.save(row_meta(base), LOGITS, payload(2), wait=True)
        assert not fut.done()
        threading.Timer(0.1, gate.set).start()
        t0 = time.monotonic()
        hit = store.lookup(KM, base + [7], parent_key=cache_key(KM, base))
        assert hit is not None and hit.kind == "resume"
        assert time.monotonic() - t0 >= 0.05
        assert fut.result(timeout=5) == "saved" and blocker.result(timeout=5)
        assert store._queued == {}
    finally:
        store.close()


def test_quotas_hold_under_load_and_demotion_keeps_rows(store, cfg):
    quotas = {"ram": cfg.ram_quota, "ram_file": cfg.ram_file_quota, "disk": cfg.disk_quota}
    violations = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            used = dict(store.index.used)
            for tier, q in quotas.items():
                if used[tier] > q:
                    violations.append((tier, used[tier]))

    watcher = threading.Thread(target=watch)
    watcher.start()
    saved = []

    def writer(t):
        for i in range(10):
            toks = [t + 1, i + 1] + list(range(3, 40))
            assert store.save(row_meta(toks), LOGITS, payload(t * 100 + i), wait=True).result(timeout=30) == "saved"
            saved.append(toks)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    stop.set()
    watcher.join()
    assert not violations
    assert len(saved) == 40
    # 40 rows of ~41 kB: more than ram + ram_file hold, all of them fit with the disk
    assert counters.get("demotions") > 0 and counters.get("evictions") == 0
    for toks in saved:
        hit = store.lookup(KM, toks)
        assert hit is not None and hit.kind == "exact"
        with store.restore(hit.key) as row:
            assert row is not None and bytes(row.kv[:4]) == payload((toks[0] - 1) * 100 + toks[1] - 1)[:4]
    assert {r.tier for r in store.index.rows.values()} == {"ram", "ram_file", "disk"}
    assert store.reservations() == 0
    assert all(r.refcount == 0 for r in store.index.rows.values())


def test_slowest_tier_full_drops_lru_rows(tmp_path):
    counters.reset()
    s = CacheStore.start(CacheConfig(ram_quota=100_000, ram_file_quota=0, disk_dir=str(tmp_path / "d"),
                                     disk_quota=100_000))
    try:
        for i in range(8):
            s.save(row_meta([i + 1, 2, 3]), None, payload(i), wait=True).result(timeout=10)
        assert s.index.used["ram"] <= 100_000 and s.index.used["disk"] <= 100_000
        assert counters.get("evictions") > 0
        assert s.lookup(KM, [8, 2, 3]).kind == "exact"  # the newest row survives
        assert len(list((tmp_path / "d").glob("*.kvc"))) == sum(r.tier == "disk" for r in s.index.rows.values())
    finally:
        s.close()


def test_concurrent_lookups_and_saves_of_the_same_keys(store):
    keys = [[k + 1] + list(range(2, 30)) for k in range(6)]
    errors_seen = []

    def worker(n):
        try:
            for j in range(30):
                toks = keys[(n + j) % len(keys)]
                fut = store.save(row_meta(toks), LOGITS, payload(toks[0]))
                hit = store.lookup(KM, toks + [99])
                if hit is not None:
                    with store.restore(hit.key) as row:
                        if row is not None:
                            assert bytes(row.kv[:4]) == payload(toks[0])[:4]
                if fut is not None:
                    fut.exception(timeout=30)
        except Exception as exc:  # surfaced below
            errors_seen.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
        assert not th.is_alive(), "deadlock"
    assert not errors_seen
    assert len(store.index.rows) == len(keys)  # no duplicate rows
    store.sync()  # after every thread's check-ins (FIFO; the threads are joined)
    assert all(r.refcount == 0 for r in store.index.rows.values())
    assert store.reservations() == 0


def test_back_pressure_queues_then_drops_saves(tmp_path, monkeypatch):
    """One writer thread busy: the next save waits in the queue (bounded by jobs and by
    bytes); beyond it saves are refused and counted, and a waiting (evict) save is queued."""
    counters.reset()
    s = CacheStore.start(CacheConfig(ram_quota=10**6, ram_file_quota=0, disk_quota=0, writer_max_concurrent=1,
                                     writer_queue=2, writer_queue_bytes=100_000))
    try:
        gate = threading.Event()
        real = s.tiers["ram"].put
        monkeypatch.setattr(s.tiers["ram"], "put", lambda k, p: (gate.wait(5), real(k, p)))
        first = s.save(row_meta([1]), None, payload(1))
        assert first is not None
        wait_until(lambda: s.stats()["writer"]["queued_bytes"] == 0, what="the first save running")
        queued = s.save(row_meta([2]), None, payload(2, 60_000))
        assert queued is not None
        assert s.save(row_meta([3]), None, payload(3, 60_000)) is None  # 120 kB over the queue's 100 kB
        small = s.save(row_meta([4]), None, payload(4, 10_000))
        assert small is not None
        assert s.save(row_meta([5]), None, payload(5, 10)) is None  # two jobs wait already
        assert counters.get("saves_dropped") == 2
        assert s.stats()["writer"] == {"threads": 1, "busy": 3, "queued": 2, "queued_bytes": 70_000}
        waited = s.save(row_meta([6]), None, payload(6, 10), wait=True)  # an evict save is always queued
        assert not s.flush(timeout=0.05)  # the first save still holds the only thread
        gate.set()
        assert s.flush(timeout=5) and s.writer.busy == 0
        assert [f.result(timeout=5) for f in (first, queued, small, waited)] == ["saved"] * 4
        assert s.stats()["writer"]["queued_bytes"] == 0
    finally:
        s.close()


def test_corrupt_row_is_not_served(store):
    toks = list(range(1, 20))
    store.save(row_meta(toks), LOGITS, payload(3, 600_000), wait=True).result(timeout=10)  # too big for ram
    row = store.index.lookup_exact(cache_key(KM, toks))
    assert row.tier == "disk"
    path = row.location
    data = bytearray(path.read_bytes())
    data[-100] ^= 1
    path.write_bytes(bytes(data))
    with store.restore(row.key) as got:
        assert got is None
    assert store.index.get(row.key) is None and not path.exists()
    assert counters.get("corrupt_files") == 1
    assert store.lookup(KM, toks) is None


def test_restart_on_the_same_directories_keeps_file_rows(cfg):
    s = CacheStore.start(cfg)
    try:
        for i in range(12):
            s.save(row_meta([i + 1] * 5), LOGITS, payload(i), tier="disk", wait=True).result(timeout=10)
        s.index  # noqa: B018
        tokens_hit = [1] * 5
        with s.restore(cache_key(KM, tokens_hit)):
            pass  # a hit is persisted in the file header
    finally:
        s.close()
    s2 = CacheStore.start(cfg)
    try:
        assert len(s2.index.rows) == 12
        for i in range(12):
            with s2.restore(cache_key(KM, [i + 1] * 5)) as row:
                assert bytes(row.kv) == payload(i)
        assert s2.index.get(cache_key(KM, tokens_hit)).hits >= 1
    finally:
        s2.close()


CHILD = textwrap.dedent("""
    import os, sys, numpy as np
    os.umask(0)  # nothing may be private by accident
    sys.path.insert(0, {tests!r})
    from test_cache_store import row_meta, payload, LOGITS
    from erllama.cache.store import CacheStore, CacheConfig
    s = CacheStore.start(CacheConfig(ram_quota=0, ram_file_quota=0, disk_dir=sys.argv[1], disk_quota=10**9))
    for i in range(int(sys.argv[2])):
        s.save(row_meta([i + 1, 7, 7]), LOGITS, payload(i, 200_000), tier="disk", wait=True).result()
        print(i, flush=True)
    s.close()
""")


@pytest.mark.parametrize("stage", ["tmp_half_written", "tmp_synced", "linked", "dir_synced", None])
def test_sigkilled_writer_then_restart(tmp_path, stage):
    """A process saving rows dies at a publish stage (or at a random moment): what it left
    is readable by nobody else (its directory 0700; rows, temporaries and the lock 0600,
    though it ran with umask 0), and a cache restarted on its directory serves every
    published row intact and nothing else."""
    disk = tmp_path / "kv"  # made by the writer
    env = dict(os.environ)
    if stage:
        env["ERLLAMA_FAULT_STAGE"] = stage
    code = CHILD.format(tests=str(ROOT / "tests"))
    proc = subprocess.Popen([sys.executable, "-c", code, str(disk), "400"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    out = ""
    if stage is None:  # a random moment once it is saving
        out = proc.stdout.readline()
        time.sleep(random.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
    rest, _ = proc.communicate(timeout=120)
    out += rest
    assert proc.returncode == -signal.SIGKILL
    published = [int(x) for x in out.split()]
    # what the dead writer left (rows, a temporary, the lock) is readable by nobody else
    left = {p.name: stat.S_IMODE(p.lstat().st_mode) for p in disk.iterdir()}
    assert ".lock" in left and (stage != "tmp_half_written" or any(n.endswith(".tmp") for n in left)), left
    assert all(mode == 0o600 for mode in left.values()), {n: oct(m) for n, m in left.items()}
    assert stat.S_IMODE(disk.stat().st_mode) == 0o700
    s = CacheStore.start(CacheConfig(ram_quota=0, ram_file_quota=0, disk_dir=str(disk), disk_quota=10**9))
    try:
        assert not list(disk.glob("*.tmp"))
        assert s.reservations() == 0
        for i in published:
            with s.restore(cache_key(KM, [i + 1, 7, 7])) as row:
                assert row is not None and bytes(row.kv) == payload(i, 200_000)
        for key in list(s.index.rows):
            with s.restore(key) as got:
                i = got.meta.token_ids[0] - 1
                assert bytes(got.kv) == payload(i, 200_000)  # nothing served that differs
        extra = set(s.index.rows) - {cache_key(KM, [i + 1, 7, 7]) for i in published}
        assert len(extra) <= 1  # at most the row that was linked when the writer died
    finally:
        s.close()


def test_module_functions(store):
    import erllama.cache as cache
    from erllama import errors

    cache.detach()
    with pytest.raises(errors.CacheError, match="not running"):
        cache.gc()
    cache.attach(store)
    try:
        store.save(row_meta([1, 2, 3]), LOGITS, payload(1), wait=True).result(timeout=10)
        store.save(row_meta([4, 5, 6]), LOGITS, payload(2), wait=True).result(timeout=10)
        assert cache.counters()["saves_cold"] == 2
        rows, freed = cache.evict_bytes(1, ["ram"])
        assert rows == 1 and freed > 0
        with pytest.raises(errors.InvalidParameter, match="tiers"):
            cache.evict_bytes(1, ["tape"])
        with pytest.raises(errors.InvalidParameter):
            cache.evict_bytes(-1)
        assert cache.gc() == 1 and store.index.rows == {}
        cache.reset_counters()
        assert cache.counters()["saves_cold"] == 0
    finally:
        cache.detach()


def test_disk_full_fails_the_save_cleanly(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k,mode=0700", "tmpfs", str(mnt)], capture_output=True)
    assert res.returncode == 0, f"this test mounts a small tmpfs (needs root): {res.stderr!r}"
    counters.reset()
    s = CacheStore.start(CacheConfig(ram_quota=0, ram_file_quota=0, disk_dir=str(mnt), disk_quota=10**9))
    try:
        assert s.save(row_meta([1, 2]), LOGITS, payload(1, 100_000), tier="disk", wait=True).result(10) == "saved"
        fut = s.save(row_meta([3, 4]), LOGITS, payload(2, 400_000), tier="disk", wait=True)
        from erllama.cache.publish import PublishError

        with pytest.raises(PublishError) as info:
            fut.result(timeout=10)
        assert info.value.errno == 28
        assert counters.get("saves_failed") == 1 and s.reservations() == 0
        assert sorted(p.name for p in mnt.iterdir()) == [".lock", cache_key(KM, [1, 2]).hex() + ".kvc"]
        assert s.lookup(KM, [3, 4]) is None and s.index.used["disk"] == s.index.get(cache_key(KM, [1, 2])).size
    finally:
        s.close()
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_pressure_poller_evicts_through_the_store(tmp_path):
    from erllama.cache.pressure import PressureConfig

    level = {"used": 10, "total": 100}
    counters.reset()
    cfg = CacheConfig(ram_quota=10**6, ram_file_quota=0, disk_quota=0,
                      pressure=PressureConfig(enabled=True, source=lambda: (level["used"], level["total"]),
                                              interval_s=60.0, high=0.8, low=0.5, min_evict_bytes=1,
                                              evict_tiers=("ram",)))
    s = CacheStore.start(cfg)
    try:
        for i in range(3):
            s.save(row_meta([i + 1]), None, payload(i), wait=True).result(timeout=10)
        assert s.check_pressure()["reason"] == "below_watermark"
        level["used"] = 90  # 40 "bytes" over the low watermark: one row is enough
        out = s.check_pressure()
        assert out["action"] == "evicted" and out["rows"] == 1
        assert len(s.index.rows) == 2 and s.lookup(KM, [1]) is None  # the LRU row went
        assert s.pressure_status()["enabled"] is True
    finally:
        s.close()


def test_a_disk_hit_is_promoted_to_tmpfs_when_it_has_room(store):
    toks = list(range(1, 30))
    store.save(row_meta(toks), LOGITS, payload(5), tier="disk", wait=True).result(timeout=10)
    key = cache_key(KM, toks)
    path = store.index.get(key).location
    with store.restore(key) as row:
        assert bytes(row.kv) == payload(5)
    wait_until(lambda: store.index.get(key).tier == "ram_file", what="promotion")
    assert store.flush()  # the move is visible before the writer deletes the disk file and counts it
    assert not path.exists() and counters.get("promotions") == 1
    with store.restore(key) as row:
        assert bytes(row.kv) == payload(5)
    assert store.index.used["disk"] == 0


def test_a_dead_readers_checkout_is_released(store):
    import supervision

    toks = [9, 9, 9]
    store.save(row_meta(toks), LOGITS, payload(9), wait=True).result(timeout=10)
    key = cache_key(KM, toks)

    class Reader(supervision.Actor):
        def on_receive(self, message):
            if message == "take":
                self._cm = store.restore(key, holder=self.actor_ref)
                self._cm.__enter__()  # holds the row and never gives it back
                return store.index.get(key).refcount
            if message == "die":
                raise RuntimeError("reader crashed")

    reader = Reader.start()
    assert reader.ask("take") == 1
    assert store._ask("holders") == 1
    reader.tell("die")
    wait_until(lambda: store.index.get(key).refcount == 0, what="checkout released")
    assert store._ask("holders") == 0
    assert store.evict_bytes(1)[0] == 1  # evictable again


def test_an_overdue_save_releases_its_waiters_but_keeps_its_charge():
    """A writer that hangs past the TTL: readers waiting for its row go on without it,
    but its bytes stay charged (its file may still be written) and the key stays its own
    until it publishes or cancels."""
    from erllama.cache.counters import Counters
    from erllama.cache.index import Conflict
    from erllama.cache.meta import RESERVATION_TTL, MetaServer, group_of
    from erllama.cache.tiers import RamTier

    now = [1000.0]
    ref = MetaServer.start({"ram": RamTier()}, {"ram": 1000}, stats=Counters(), clock=lambda: now[0])
    try:
        call = lambda name, *args: ref.ask(("call", name, args))  # noqa: E731
        key = b"k" * 32
        token = call("reserve", key, group_of(KM), 3, "ram", 100)
        assert isinstance(token, int)
        waiter = call("wait_for", key)
        assert call("sweep") == 0 and call("reservations") == 1
        now[0] += RESERVATION_TTL + 1  # the writer hung
        assert call("sweep") == 1 and waiter.get(timeout=5) is None
        assert call("reservations") == 1 and call("stats")["tiers"]["ram"]["reserved"] == 100
        with pytest.raises(Conflict):
            call("reserve", key, group_of(KM), 3, "ram", 100)
        call("cancel", key, token)  # the writer comes back and gives up
        assert call("reservations") == 0 and call("stats")["tiers"]["ram"]["charged"] == 0
        assert isinstance(call("reserve", key, group_of(KM), 3, "ram", 100), int)  # free again
    finally:
        ref.stop()


def test_a_restore_reads_into_the_buffer_the_save_paged_in(store, monkeypatch):
    toks = list(range(1, 40))
    store.save(row_meta(toks), LOGITS, payload(4, 300_000), tier="ram_file", wait=True).result(timeout=10)
    row = store.index.get(cache_key(KM, toks))
    assert row.tier == "ram_file" and store.buffers.sizes() == [1 << 20]  # left by the publish read-back
    taken = []
    real_take = store.buffers.take
    monkeypatch.setattr(store.buffers, "take", lambda size: taken.append(real_take(size)) or taken[-1])
    free_before = list(store.buffers._free)
    with store.restore(row.key) as got:
        assert bytes(got.kv) == payload(4, 300_000)
    assert taken[0] is free_before[0]  # no fresh memory on the restore path
    store.sync()
    assert store.index.get(row.key).refcount == 0 and store.buffers.sizes() == [1 << 20]


def test_a_duplicate_save_is_dropped_before_its_crc(store, monkeypatch):
    from erllama.cache import store as store_mod

    store.save(row_meta([3, 1, 4]), LOGITS, payload(1), wait=True).result(timeout=10)
    monkeypatch.setattr(store_mod, "encode_row", lambda *a: pytest.fail("encoded a row already present"))
    assert store.save(row_meta([3, 1, 4]), LOGITS, payload(1), wait=True).result(timeout=10) == "duplicate"
    assert counters.get("duplicate_dropped") == 1


def test_hits_reach_the_file_at_checkin_and_tmpfs_rows_stay_trusted(store):
    toks = [2, 7, 1, 8]
    store.save(row_meta(toks), LOGITS, payload(2), tier="ram_file", wait=True).result(timeout=10)
    key = cache_key(KM, toks)
    path = store.index.get(key).location
    for n in (1, 2, 3):
        with store.restore(key) as row:
            assert bytes(row.kv) == payload(2)
        store.sync()
        assert kvc.read_header(path).meta.hit_count == n and store.index.get(key).refcount == 0
    if store.tiers["ram_file"].trusting:
        assert counters.get("loads_crc_skipped") == 3


def _big_payload(i: int) -> bytes:
    from erllama.cache.tiers import PIPELINE_CHUNK, PIPELINE_MIN

    return payload(i, PIPELINE_MIN + PIPELINE_CHUNK)


@pytest.fixture
def big_store(tmp_path):
    counters.reset()
    s = CacheStore.start(CacheConfig(ram_quota=0, ram_file_quota=0, disk_dir=str(tmp_path / "disk"),
                                     disk_quota=10**9))
    yield s
    s.close()


def test_a_late_verified_restore_and_a_corrupt_one(big_store):
    s = big_store
    good, bad = list(range(1, 30)), list(range(2, 31))
    for i, toks in enumerate((good, bad)):
        s.save(row_meta(toks), LOGITS, _big_payload(i), tier="disk", wait=True).result(timeout=30)
    with s.restore(cache_key(KM, good), verify_late=True) as row:
        assert row.verified() and bytes(row.kv) == _big_payload(0)
    path = s.index.get(cache_key(KM, bad)).location
    _flip_file(path, -3)
    with s.restore(cache_key(KM, bad), verify_late=True) as row:
        assert row is not None and not row.verified()  # the caller undoes what it copied
    assert s.index.get(cache_key(KM, bad)) is None and not path.exists()
    assert counters.get("corrupt_files") == 1 and s.buffers.sizes()


def test_a_late_row_left_unverified_raises_when_corrupt(big_store):
    s = big_store
    toks = list(range(5, 40))
    s.save(row_meta(toks), LOGITS, _big_payload(3), tier="disk", wait=True).result(timeout=30)
    key = cache_key(KM, toks)
    _flip_file(s.index.get(key).location, -11)
    with pytest.raises(kvc.CorruptRow, match="late CRC"):
        with s.restore(key, verify_late=True) as row:
            assert row is not None  # used without asking row.verified()
    s.sync()
    assert s.index.get(key) is None and s.reservations() == 0 and s.buffers.sizes()


def _flip_file(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x20
    with open(path, "r+b") as f:
        f.write(data)
