"""The application as one supervision tree: what ``erllama.tree()`` shows, escalations that
reach the root and are reported, a replaced writer worker, and a model stop that waits
for its shutdown saves on a slow disk."""

from __future__ import annotations

import threading
import time

import pytest

import erllama
import erllama.cache
import supervision
from erllama import errors
from erllama.cache.counters import counters
from erllama.cache.key import KeyMeta
from erllama.cache.store import CacheConfig, CacheStore
from supervision._actor import life_of

from supervision_helpers import wait_until
from test_cache_store import LOGITS, payload, row_meta

POLICY = {"min_tokens": 16, "cold_min_tokens": 16}


@pytest.fixture
def app(tmp_path):
    with erllama.running(cache_dir=str(tmp_path / "c"), ram_file_dir=str(tmp_path / "shm"), policy=POLICY) as a:
        yield a


def child(sup, child_id):
    return next(c for c in supervision.inspect(sup).children if c.id == child_id)


def test_the_tree_shows_the_root_and_every_actor(app, tiny_path):
    erllama.load_model(tiny_path, model_id="tiny", n_ctx=256, isolation="none")
    text = erllama.tree()
    lines = text.splitlines()
    assert lines[0].startswith("erllama_sup [supervisor permanent one_for_one 5/30s]")
    for needle in ("registry [worker permanent] TableOwner running", "inflight [worker permanent] TableOwner running",
                   "cache [supervisor permanent one_for_one", "meta [worker permanent] MetaServer running",
                   "writer [supervisor permanent one_for_one", "pressure [worker permanent] PressurePoller running",
                   "models [supervisor permanent simple_one_for_one", "tiny [worker transient] ModelActor running"):
        assert any(needle in line for line in lines), (needle, text)
    assert sum("WriterWorker running" in line for line in lines) == app.config.writer_max_concurrent
    node = erllama.tree(text=False)
    assert [c["id"] for c in node["children"]] == ["registry", "inflight", "cache", "models"]  # the start order
    assert all(c["thread"] for c in node["children"])
    assert erllama.health() == {"state": "running", "failure": None,
                                "restarts": {"registry": 0, "inflight": 0, "cache": 0, "models": 0}}


def kill_meta_past_intensity(store) -> None:
    """Kill the cache's meta server 6 times (its supervisor allows 5 restarts in 30 s)."""
    name = store._name
    for _ in range(6):
        ref = supervision.registry.whereis(name, timeout=10)
        life_of(ref).kill()
        wait_until(lambda r=ref: life_of(r) is None, what="the meta server exited")


def test_an_escalation_in_the_cache_reaches_the_root_and_is_reported(tmp_path, tiny_path):
    with pytest.raises(errors.ErllamaError, match="root supervisor exited"):
        with erllama.running(cache_dir=str(tmp_path / "c"), ram_file_dir=str(tmp_path / "shm")) as app:
            mid = erllama.load_model(tiny_path, n_ctx=256, isolation="none")
            kill_meta_past_intensity(app.cache)
            # the cache supervisor gave up; the root restarted it with a new meta server
            wait_until(lambda: erllama.health()["restarts"]["cache"] == 1, what="the root restarted the cache")
            assert erllama.health()["state"] == "running"
            assert len(erllama.complete(mid, "the cat", max_tokens=3).tokens) == 3  # the tree works again
            assert erllama.cache.stats()["reservations"] == 0
            for _ in range(5):  # five more escalations: the root itself gives up
                kill_meta_past_intensity(app.cache)
                wait_until(lambda: app.failure is not None or child(app.root, "cache").status == "running",
                           what="the cache restarted or the root gave up")
            wait_until(lambda: app.failure is not None, what="the root gave up")
            h = erllama.health()
            assert h["state"] == "failed" and "root supervisor exited" in h["failure"]
            with pytest.raises(errors.ErllamaError, match="root supervisor exited"):
                erllama.complete(mid, "the cat", max_tokens=3)
            with pytest.raises(errors.ErllamaError, match="root supervisor exited"):
                erllama.load_model(tiny_path, n_ctx=256, isolation="none")
    # running() raised on exit, after stopping what was left
    with pytest.raises(errors.ErllamaError, match="not running"):
        erllama.health()


def test_a_killed_writer_worker_is_replaced_and_no_save_is_half_done(tmp_path, monkeypatch):
    """A worker killed while it writes finishes that save (a thread is never cut short),
    is replaced, and the queued save runs on its replacement; a save handed to a worker
    that exits before running it fails cleanly, with nothing reserved or published."""
    counters.reset()
    store = CacheStore.start(CacheConfig(ram_quota=10**6, ram_file_quota=0, disk_quota=0, writer_max_concurrent=1))
    km = KeyMeta(b"f" * 32, 7, b"c" * 32)
    try:
        gate = threading.Event()
        real = store.tiers["ram"].put
        monkeypatch.setattr(store.tiers["ram"], "put", lambda k, p: (gate.wait(10), real(k, p))[1])
        writer_sup = child(store._sup, "writer").ref

        def worker():
            return child(writer_sup, "worker-0").ref

        # killed while writing: the save lands, the queued one goes to the replacement
        first_worker = worker()
        first = store.save(row_meta([1]), LOGITS, payload(1))
        wait_until(lambda: store.stats()["reservations"] == 1, what="the first save running")
        queued = store.save(row_meta([2]), LOGITS, payload(2))
        life_of(first_worker).kill()
        gate.set()
        assert first.result(timeout=10) == "saved" and queued.result(timeout=10) == "saved"
        wait_until(lambda: child(writer_sup, "worker-0").restarts == 1 and worker() is not first_worker,
                   what="the worker replaced")
        # a save handed to a worker that then exits before running it
        gate.clear()
        second_worker = worker()
        pool = store.writer
        handed = threading.Event()
        free = pool._free

        def free_then_die(index, ref):
            free(index, ref)  # hands the next job to this worker's inbox
            if ref is second_worker and not handed.is_set():
                handed.set()
                life_of(ref).kill()

        monkeypatch.setattr(pool, "_free", free_then_die)
        running = store.save(row_meta([3]), LOGITS, payload(3))
        wait_until(lambda: store.stats()["reservations"] == 1, what="the third save running")
        lost = store.save(row_meta([4]), LOGITS, payload(4))
        gate.set()
        assert running.result(timeout=10) == "saved"
        with pytest.raises(errors.CacheError, match="exited before the job ran"):
            lost.result(timeout=10)
        wait_until(lambda: child(writer_sup, "worker-0").restarts == 2, what="the worker replaced again")
        st = store.stats()
        assert st["reservations"] == 0 and st["tiers"]["ram"]["rows"] == 3  # nothing of the failed save
        assert store.lookup(km, [4]) is None
        assert store.save(row_meta([5]), LOGITS, payload(5)).result(timeout=10) == "saved"  # the new worker works
        assert store.flush(5) and store.writer.busy == 0 and store.stats()["writer"]["queued_bytes"] == 0
    finally:
        store.close()


def test_a_model_stop_waits_for_its_shutdown_save_on_a_slow_disk(app, tiny_path, monkeypatch):
    """The model's shutdown saves take longer than a default 5 s worker shutdown: the
    unload waits for them and the row lands."""
    mid = erllama.load_model(tiny_path, n_ctx=512, isolation="none", tier="disk")
    prompt = erllama.tokenize(mid, "the cat and the dog " * 6)
    store = erllama.cache.current()
    real = store.tiers["disk"].put
    slow = []
    stall = threading.Event()

    def slow_put(key, parts):
        if stall.is_set():
            slow.append(key)
            time.sleep(6.0)  # a disk stalling past the old 5 s shutdown
        return real(key, parts)

    monkeypatch.setattr(store.tiers["disk"], "put", slow_put)
    stream = erllama.infer(mid, prompt, max_tokens=400, temperature=0.0)
    it = iter(stream)
    for _ in range(3):  # the request is decoding: its context is saved nowhere yet
        next(it)
    assert store.flush(10)
    rows_before = store.stats()["tiers"]["disk"]["rows"]
    counters.reset()
    stall.set()
    t0 = time.monotonic()
    erllama.unload(mid)
    took = time.monotonic() - t0
    assert slow and took >= 6.0, took
    assert counters.get("saves_shutdown") == 1 and counters.get("saves_failed") == 0
    st = store.stats()
    assert st["tiers"]["disk"]["rows"] == rows_before + 1 and st["reservations"] == 0
