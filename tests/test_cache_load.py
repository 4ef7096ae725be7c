"""The cache under a real concurrent load, end to end: two tiny models, tight fast tiers.

What a user saw, reproduced through the public API and the real llama.cpp binding: two
different models (different fingerprints) in one application whose ``ram`` and
``ram_file`` quotas hold only a few rows each and whose ``disk`` quota holds everything,
with the default writer pool (``writer_max_concurrent`` 4, ``writer_queue`` 64). Four client
threads each send twenty distinct prompts of 300-360 tokens, alternating between the
models, with ``max_tokens=4``, in rounds: every thread sends its next prompt at the same
moment, so each round is a burst of four concurrent requests (two per model, two sequences
each). Every prompt makes a cold save of its trimmed prefix, one of the whole prompt and a
finish save: 12 saves per round, 240 in all, almost every one of which demotes a row from
``ram`` to ``ram_file`` and one from ``ram_file`` to ``disk``. From the third round on a fifth
thread replays, alongside each round's burst, one of the early prompts (the first two of
each client; their rows long demoted to ``disk``) and one prompt of the last round whose
row has landed (most likely in ``ram`` or ``ram_file``, being demoted right then): a row
that exists must hit exactly, wherever it is and whatever moves it.

A round starts once the writer pool has room for its 12 saves and the replayer's 2 finish
saves and 2 promotions (``busy <= threads + queue - 16``; the last round's saves may still
run), which is what the default pool promises for a burst: no save is dropped. Unpaced,
the tiny model offers saves about as fast as demoting writers land them on 2 cores (~180
saves/s, each demoting two rows): 0 of 240 dropped in 2 of 3 runs, 8 in the third; that
tests the writers' throughput, not the protocol.

A sampler thread checks, every 10 ms, for the whole run (the burst, the replays, the stop
with its ``persist_ram``, the restart):

* the real bytes of each file tier (``ram_file`` on ``/dev/shm``, ``disk`` in
  ``<cache_dir>/kv``): the sum of ``st_size`` over the distinct inodes of every file in the
  directory, rows and temporaries (the one-byte ``ctime-probe`` file ignored), never above
  the quota; and the bytes the ``ram`` tier holds, never above its quota. The names are
  listed with one ``getdents`` (an atomic snapshot for these small directories) and then
  stat'ed, so a sample never exceeds the charge at the moment of the listing (see
  ``tests/test_cache_stress.py``): an over-quota sample is a real over-quota instant;
* every ``erllama.cache.stats()`` snapshot: ``charged <= quota``, ``charged == bytes +
  reserved + moving_in + leaving`` and ``rows == adopted + saves + moves_in - moves_out -
  evictions - removed`` in every tier.

After the burst (flushed, synced): no save dropped or failed, the index equals the files of
each file tier (and the rows the ``ram`` tier holds), no temporaries, no reservations, no
``disk`` eviction (no row dropped while ``disk`` had room), both models have rows; then the
first two prompts of every thread, long demoted, hit exactly again, each from the tier its
``cache_delta.tier`` names (the ``hits_<tier>`` counters agree), with the first token of the
cold run. Then ``erllama.stop()``: the files left are exactly the rows a fresh start finds
(``ram`` rows were persisted, since ``disk`` had room), with no temporaries, and after the
restart every early prompt hits exactly again.

``ERLLAMA_LOAD_RUNS=N`` repeats the test N times (default 1), ``ERLLAMA_LOAD_PROMPTS=N`` sets
the prompts per thread (default 20); each run prints a summary line (``-s`` shows it).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import random
import shutil
import tempfile
import threading
import time
import traceback
from pathlib import Path

import pytest

import erllama
import erllama.cache
from erllama.testing.tinymodel import tiny_vocab, write_tiny_model

from cache_helpers import Sampler, Warnings, check_snapshot, dir_bytes, ram_bytes
from supervision_helpers import wait_until

RUNS = int(os.environ.get("ERLLAMA_LOAD_RUNS", "1"))

THREADS = 4
PROMPTS_PER_THREAD = int(os.environ.get("ERLLAMA_LOAD_PROMPTS", "20"))
EARLY = 2  # the first prompts of each thread, replayed after the burst and after a restart
MIN_LEN, MAX_LEN = 300, 360
MAX_TOKENS = 4
RAM_ROWS, RAM_FILE_ROWS = 3.5, 4  # quotas, in rows of a 330-token prompt
DISK_QUOTA = 1 << 30  # every row of the run many times over
SAVES_PER_ROUND = THREADS * 3  # each prompt: its trimmed prefix, itself, its finished context
SAMPLE_S = 0.010
REQUEST_TIMEOUT = 60.0
JOIN_TIMEOUT = 120.0

LOAD_OPTIONS = {"n_ctx": 1024, "n_seq_max": 2, "n_batch": 512, "n_threads": 1, "isolation": "none"}
"""Both models: two sequences of 512 tokens each (a prompt and its 4 tokens fit)."""

_, _, _TYPES = tiny_vocab()
NORMAL_TOKENS = [i for i, t in enumerate(_TYPES) if t == 1]  # the SPM pieces and letters
BOS = 1

log = logging.getLogger("erllama.cache")


@pytest.fixture(scope="module")
def two_models(tiny_path, tmp_path_factory):
    """The session's tiny model and a second one with other weights (another fingerprint)."""
    other = write_tiny_model(tmp_path_factory.mktemp("models-load") / "tiny-b.gguf", seed=7)
    return Path(tiny_path), Path(other)


def make_prompts(run: int) -> list[list[list[int]]]:
    """``THREADS`` lists of ``PROMPTS_PER_THREAD`` distinct prompts of 300-360 tokens: BOS,
    then tokens of the vocabulary drawn from a per-prompt seed. No prompt shares even its
    first 32 tokens with another, so no prompt is a prefix hit of another's row."""
    out = []
    seen = set()
    for t in range(THREADS):
        mine = []
        for j in range(PROMPTS_PER_THREAD):
            rng = random.Random(f"load-{run}-{t}-{j}")
            n = rng.randint(MIN_LEN, MAX_LEN)
            # the first token after BOS differs between the prompts of one thread
            first = NORMAL_TOKENS[(t * PROMPTS_PER_THREAD + j) % len(NORMAL_TOKENS)]
            p = [BOS, first] + [rng.choice(NORMAL_TOKENS) for _ in range(n - 2)]
            assert tuple(p[:32]) not in seen
            seen.add(tuple(p[:32]))
            mine.append(p)
        out.append(mine)
    return out


def model_of(t: int, j: int) -> int:
    """Which of the two models prompt ``j`` of thread ``t`` goes to (alternating)."""
    return (t + j) % 2


# ---- real bytes --------------------------------------------------------------------------------


# ---- consistency at rest ---------------------------------------------------------------------------


def files_of(directory: Path) -> tuple[set[str], list[str]]:
    """Row file names and temporaries in ``directory`` (``ctime-probe*`` ignored)."""
    names = [n for n in os.listdir(directory) if not n.startswith("ctime-probe")]
    return {n for n in names if n.endswith(".kvc")}, [n for n in names if n.endswith(".tmp")]


def check_at_rest(where: str, dirs: dict[str, Path]) -> dict:
    """Nothing in flight: the index equals the files of each file tier and the rows of the
    ``ram`` tier, no temporaries, no reservations, the stats agree with the index."""
    store = erllama.cache.current()
    assert store.flush(60), f"{where}: the writer pool did not go idle: {store.writer.stats()}"
    store.sync()
    stats = erllama.cache.stats()
    check_snapshot(stats, where)
    assert stats["reservations"] == 0 and store.reservations() == 0, f"{where}: reservations left"
    w = stats["writer"]
    assert (w["busy"], w["queued"], w["queued_bytes"]) == (0, 0, 0), f"{where}: writer {w}"
    rows = list(store.index.rows.values())
    for r in rows:
        assert r.status.value == "available" and r.refcount == 0 and r.moving_to is None, f"{where}: {r}"
    for tier, t in stats["tiers"].items():
        mine = [r for r in rows if r.tier == tier]
        assert (t["reserved"], t["moving_in"], t["leaving"]) == (0, 0, 0), f"{where}: {tier} {t}"
        assert t["rows"] == len(mine) and t["bytes"] == t["charged"] == sum(r.size for r in mine), \
            f"{where}: {tier} {t} vs {len(mine)} rows of the index"
        if tier == "ram":
            assert set(store.tiers["ram"].keys()) == {r.key for r in mine}, f"{where}: ram holds other rows"
            assert ram_bytes(store) == t["bytes"]
            continue
        files, tmp = files_of(dirs[tier])
        assert not tmp, f"{where}: temporaries left in {tier}: {tmp}"
        want = {r.key.hex() + ".kvc" for r in mine}
        assert files == want, (f"{where}: {tier} files != index: only files {sorted(files - want)}, "
                               f"only index {sorted(want - files)}")
        real, _ = dir_bytes(dirs[tier])
        assert real == t["bytes"], f"{where}: {tier} holds {real} bytes of files, the index {t['bytes']}"
    return stats


def replay(mids: list[str], prompts, cold_first: dict, where: str, tiers: tuple[str, ...]) -> collections.Counter:
    """Each early prompt again, one at a time: an exact hit of the whole prompt served from
    one of ``tiers``, whose first token is the cold run's; the ``hits_<tier>`` counters
    count the same tiers."""
    erllama.cache.reset_counters()
    served = collections.Counter()
    for t in range(THREADS):
        for j in range(EARLY):
            p = prompts[t][j]
            c = erllama.complete(mids[model_of(t, j)], p, max_tokens=MAX_TOKENS, timeout=REQUEST_TIMEOUT)
            assert c.cache_hit == "exact", f"{where}: early prompt {t}/{j} was {c.cache_hit} ({c.cache_delta})"
            assert c.cache_delta.read == len(p), f"{where}: {t}/{j} {c.cache_delta}"
            assert c.cache_delta.tier in tiers, f"{where}: {t}/{j} served by {c.cache_delta.tier!r}"
            assert c.tokens[:1] == cold_first[(t, j)], f"{where}: {t}/{j} first token differs from the cold run"
            served[c.cache_delta.tier] += 1
    erllama.cache.current().flush(60)
    cnt = erllama.cache.counters()
    n = THREADS * EARLY
    assert (cnt["hits_exact"], cnt["misses"], cnt["restores_failed"]) == (n, 0, 0), f"{where}: {cnt}"
    got = {t: cnt[f"hits_{t}"] for t in ("ram", "ram_file", "disk")}
    assert got == {t: served[t] for t in ("ram", "ram_file", "disk")}, f"{where}: counters {got} vs served {served}"
    return served


def start_app(cache_dir: Path, shm: Path, quotas: dict[str, int]) -> None:
    erllama.start(cache_dir=str(cache_dir), ram_file_dir=str(shm), ram_quota=quotas["ram"],
                  ram_file_quota=quotas["ram_file"], disk_quota=quotas["disk"])


def measure_row(path: Path, base: Path) -> int:
    """Bytes of the row of one 330-token prompt of this model with these options."""
    shm = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="erllama-load-measure-"))
    try:
        with erllama.running(cache_dir=str(base / "measure"), ram_file_dir=str(shm)):
            mid = erllama.load_model(path, **LOAD_OPTIONS)
            p = [BOS] + [NORMAL_TOKENS[i % len(NORMAL_TOKENS)] for i in range(329)]
            pre = erllama.prefill_only(mid, p)
            assert pre.cache_hit == "cold" and pre.context_tokens == 330
            # the prompt's cold saves (its trimmed prefix, 256 tokens, and itself) may still be
            # being written: see test_prefill_only_returns_once_its_row_is_published
            assert erllama.cache.current().flush(30)
            rows = {r.n_tokens: r.size for r in erllama.cache.current().index.rows.values()}
            st = erllama.cache.stats()["tiers"]["ram"]
            assert sorted(rows) == [256, 330] and st["bytes"] == sum(rows.values()), (rows, st)
            return rows[330]
    finally:
        shutil.rmtree(shm, ignore_errors=True)


# ---- the test --------------------------------------------------------------------------------------


@pytest.mark.parametrize("run", range(RUNS))
def test_two_models_under_a_concurrent_load_keep_quotas_and_every_row(run, two_models, tmp_path):
    t_start = time.monotonic()
    path_a, path_b = two_models
    row = measure_row(path_a, tmp_path)
    quotas = {"ram": int(RAM_ROWS * row), "ram_file": int(RAM_FILE_ROWS * row), "disk": DISK_QUOTA}
    cache_dir = tmp_path / "cache"
    shm = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="erllama-load-"))
    dirs = {"ram_file": shm, "disk": cache_dir / "kv"}
    prompts = make_prompts(run)
    warnings = Warnings().__enter__()
    sampler = Sampler(quotas, dirs, interval=SAMPLE_S)
    started = False
    try:
        with sampler:
            start_app(cache_dir, shm, quotas)
            started = True
            store = erllama.cache.current()
            assert store.config.writer_max_concurrent == 4 and store.config.writer_queue == 64  # the defaults
            mids = [erllama.load_model(path_a, **LOAD_OPTIONS), erllama.load_model(path_b, **LOAD_OPTIONS)]
            fps = [erllama.model_info(m).fingerprint for m in mids]
            assert fps[0] != fps[1], "the two models must have different fingerprints"
            erllama.cache.reset_counters()
            sampler.watch(store, erllama.cache.stats)

            # ---- the burst: THREADS clients in rounds of one prompt each, alternating models; a replayer
            results: dict[tuple[int, int], erllama.Completion] = {}
            errors_: list[str] = []
            waits: list[float] = []
            live_hits: collections.Counter = collections.Counter()
            n_round = [0]
            early = [(t, j) for t in range(THREADS) for j in range(EARLY)]

            def pace() -> None:
                """Before each round (run by the barrier). Round EARLY waits until every
                save so far has landed (the early rows exist); the others until the writer
                pool has room for the round's saves and the replayer's two finish saves and
                promotions (busy <= threads + queue - SAVES_PER_ROUND - 4), so no save can be
                refused; the last round's saves may still run."""
                w0 = time.monotonic()
                r = n_round[0]
                n_round[0] += 1
                limit = store.config.writer_max_concurrent + store.config.writer_queue - SAVES_PER_ROUND - 4
                if r == EARLY:
                    limit = 0
                wait_until(lambda: erllama.cache.stats()["writer"]["busy"] <= limit, 30,
                           what=lambda: f"the writer pool to drain: {store.writer.stats()}", step=0.002)
                waits.append(time.monotonic() - w0)

            rounds = threading.Barrier(THREADS + 1, action=pace, timeout=60)

            def client(t: int) -> None:
                try:
                    for j, p in enumerate(prompts[t]):
                        rounds.wait()  # every thread sends its j-th prompt at once
                        results[(t, j)] = erllama.complete(mids[model_of(t, j)], p, max_tokens=MAX_TOKENS,
                                                           timeout=REQUEST_TIMEOUT)
                except Exception:
                    errors_.append(f"client {t}: {traceback.format_exc()}")
                    rounds.abort()

            def replay_one(r: int, t: int, j: int, where: str) -> None:
                c = erllama.complete(mids[model_of(t, j)], prompts[t][j], max_tokens=MAX_TOKENS,
                                     timeout=REQUEST_TIMEOUT)
                assert c.cache_hit == "exact" and c.cache_delta.read == len(prompts[t][j]), \
                    f"round {r}: {where} prompt {t}/{j} was {c.cache_hit} ({c.cache_delta})"
                assert c.cache_delta.tier in ("ram", "ram_file", "disk"), c.cache_delta
                assert c.tokens[:1] == results[(t, j)].tokens[:1], f"round {r}: {t}/{j} first token"
                live_hits[(where, c.cache_delta.tier)] += 1

            def replayer() -> None:
                """From round EARLY on, alongside each round's burst: one early prompt (its
                row long demoted) and, when its row has landed, one prompt of the last round
                (its row likely in ram or ram_file, being demoted right now). A row that
                exists must hit exactly, wherever it is and whatever moves it."""
                try:
                    for r in range(PROMPTS_PER_THREAD):
                        rounds.wait()
                        if r < EARLY:
                            continue
                        t, j = early[(r - EARLY) % len(early)]
                        replay_one(r, t, j, "early")
                        t = r % THREADS
                        p = prompts[t][r - 1]
                        if erllama.cache.longest_prefix(mids[model_of(t, r - 1)], p) == len(p):
                            replay_one(r, t, r - 1, "recent")
                        else:
                            live_hits[("recent", "not landed")] += 1
                except Exception:
                    errors_.append(f"replayer: {traceback.format_exc()}")
                    rounds.abort()

            t_burst = time.monotonic()
            threads = [threading.Thread(target=client, args=(t,), name=f"load-client-{t}", daemon=True)
                       for t in range(THREADS)]
            threads.append(threading.Thread(target=replayer, name="load-replayer", daemon=True))
            for th in threads:
                th.start()
            deadline = time.monotonic() + JOIN_TIMEOUT
            for th in threads:
                th.join(max(0.1, deadline - time.monotonic()))
            assert not any(th.is_alive() for th in threads), "a client thread hung"
            assert not errors_, "\n".join(errors_)
            assert store.flush(60), f"saves did not land: {store.writer.stats()}"
            burst_s = time.monotonic() - t_burst
            assert len(results) == THREADS * PROMPTS_PER_THREAD
            assert all(c.cache_hit == "cold" for c in results.values()), \
                collections.Counter(c.cache_hit for c in results.values())
            assert sum(n for (w, _), n in live_hits.items() if w == "early") == PROMPTS_PER_THREAD - EARLY
            cold_first = {k: c.tokens[:1] for k, c in results.items()}

            cnt = erllama.cache.counters()
            saves = cnt["saves_cold"] + cnt["saves_finish"]
            assert saves >= min(80, 2 * THREADS * PROMPTS_PER_THREAD), f"only {saves} saves: {cnt}"
            assert cnt["saves_dropped"] == 0, f"{cnt['saves_dropped']} saves dropped with the default writer pool"
            assert cnt["saves_failed"] == 0, cnt
            assert cnt["demotions"] > 0, "the quotas were meant to force demotions"
            burst_counters = cnt

            stats = check_at_rest("after the burst", dirs)
            assert sum(t["saves"] for t in stats["tiers"].values()) == saves, (stats["tiers"], cnt)
            assert stats["tiers"]["disk"]["evictions"] == 0, f"a row was dropped while disk had room: {stats['tiers']}"
            assert stats["tiers"]["disk"]["rows"] > 0 and stats["tiers"]["ram_file"]["rows"] > 0
            for m in mids:
                assert sum(stats["models"][m]["rows"].values()) > 0, f"model {m} has no rows: {stats['models']}"
            rows_total = sum(t["rows"] for t in stats["tiers"].values())
            assert rows_total == len(store.index.rows) == saves, \
                f"{rows_total} rows for {saves} saves (a row was lost): {stats['tiers']}"

            # ---- the early prompts, long demoted, hit exactly
            served = replay(mids, prompts, cold_first, "replay", ("ram", "ram_file", "disk"))
            stats = check_at_rest("after the replay", dirs)
            assert stats["tiers"]["disk"]["evictions"] == 0, stats["tiers"]
            keys_before = {r.key: r.n_tokens for r in store.index.rows.values()}

            # ---- stop: the ram rows are persisted; the files are what a fresh start finds
            sampler.watch(store, None)  # keeps sampling the dirs and the old ram tier
            erllama.stop()
            started = False
            after_stop = {}
            for tier, d in dirs.items():
                files, tmp = files_of(d)
                assert not tmp, f"temporaries left in {tier} after stop: {tmp}"
                after_stop[tier] = files
            on_files = set().union(*after_stop.values())
            lost = {k.hex() + ".kvc" for k in keys_before} - on_files
            assert not lost, f"{len(lost)} rows of {len(keys_before)} not persisted at stop"

            start_app(cache_dir, shm, quotas)
            started = True
            store2 = erllama.cache.current()
            sampler.watch(store2, erllama.cache.stats)
            stats = check_at_rest("after the restart", dirs)
            for tier in dirs:
                mine = {r.key.hex() + ".kvc" for r in store2.index.rows.values() if r.tier == tier}
                assert mine == after_stop[tier], f"{tier}: a fresh start finds other rows than the files"
                assert stats["tiers"][tier]["adopted"] == stats["tiers"][tier]["rows"] == len(mine)
            assert stats["tiers"]["ram"]["rows"] == 0
            assert {r.key for r in store2.index.rows.values()} == set(keys_before)
            mids = [erllama.load_model(path_a, **LOAD_OPTIONS), erllama.load_model(path_b, **LOAD_OPTIONS)]
            assert [erllama.model_info(m).fingerprint for m in mids] == fps
            stats = erllama.cache.stats()
            for m in mids:
                assert sum(stats["models"][m]["rows"].values()) > 0, stats["models"]
            served2 = replay(mids, prompts, cold_first, "replay after restart", ("ram_file", "disk"))
            stats = check_at_rest("after the replay after the restart", dirs)
            assert stats["tiers"]["disk"]["evictions"] == 0, stats["tiers"]
            sampler.watch(store2, None)
            erllama.stop()
            started = False
            for tier, d in dirs.items():
                assert not files_of(d)[1], f"temporaries left in {tier} after the second stop"
        sampler.check("sampler")
        bad = [w for w in warnings.records if "failed" in w or "cannot" in w or "not persisted" in w]
        assert not bad, f"cache warnings: {bad}"
        c = burst_counters
        print(f"\n[load run {run}] row(330 tokens)={row} B quotas ram={quotas['ram']} "
              f"ram_file={quotas['ram_file']} disk={quotas['disk']}; burst {burst_s:.2f} s (pacing waits "
              f"{sum(waits):.2f} s), saves={saves} (cold {c['saves_cold']}, finish {c['saves_finish']}), "
              f"dropped={c['saves_dropped']} spilled={c['saves_spilled']} room_waits={c['room_waits']} "
              f"demotions={c['demotions']} evictions={c['evictions']} duplicates={c['duplicate_dropped']}; "
              f"max real bytes ram={sampler.max_seen['ram']} ram_file={sampler.max_seen['ram_file']} "
              f"disk={sampler.max_seen['disk']}; samples={sampler.samples} (stats {sampler.stat_samples}); "
              f"hits during the burst {sorted(live_hits.items())}, replay tiers {dict(served)}, after restart "
              f"{dict(served2)}; warnings {len(warnings.records)}; total {time.monotonic() - t_start:.1f} s")
    except BaseException:
        if sampler.problems:  # what the sampler saw before the failure
            print("sampler problems:\n" + "\n".join(sampler.problems))
        raise
    finally:
        warnings.__exit__()
        if started:
            with contextlib.suppress(Exception):
                erllama.stop()
        shutil.rmtree(shm, ignore_errors=True)


def test_prefill_only_returns_once_its_row_is_published(two_models, tmp_path):
    """``prefill_only`` promises its row is published when it returns ("so its
    ``finish_key`` is usable at once", docs/guides/caching.md). A prompt of at least
    ``cold_min_tokens`` also gets the cold saves of a cold prefill, handed to the writer pool
    first; the prefill save of the same key then finds the cold save's reservation
    (``Conflict``), counts a duplicate and resolves at once, so ``prefill_only`` returned
    while the row was still being written (seen once in 25 runs of the load test's row
    measurement: ``index.rows`` had the 330-token row, ``stats()`` showed it ``reserved``).
    Here the ``ram`` tier's ``put`` is slowed by 0.3 s so the window is always open."""
    path_a, _ = two_models
    shm = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="erllama-load-prefill-"))
    try:
        with erllama.running(cache_dir=str(tmp_path / "c"), ram_file_dir=str(shm)):
            mid = erllama.load_model(path_a, **LOAD_OPTIONS)
            store = erllama.cache.current()
            ram = store.tiers["ram"]
            real_put = ram.put

            def slow_put(key, parts):
                time.sleep(0.3)
                return real_put(key, parts)

            ram.put = slow_put
            erllama.cache.reset_counters()
            try:
                p = [BOS] + [NORMAL_TOKENS[(i * 7) % len(NORMAL_TOKENS)] for i in range(329)]
                pre = erllama.prefill_only(mid, p)
                published = store.index.lookup_exact(pre.finish_key) if pre.finish_key else None
                reserved = erllama.cache.stats()["tiers"]["ram"]["reserved"]
                assert store.flush(30)
            finally:
                ram.put = real_put
            assert pre.cache_hit == "cold" and pre.context_tokens == len(p) and pre.finish_key is not None
            assert published is not None, (
                f"prefill_only returned before its row was published (ram reserved {reserved} B, "
                f"duplicate_dropped {erllama.cache.counters()['duplicate_dropped']})")
    finally:
        shutil.rmtree(shm, ignore_errors=True)
