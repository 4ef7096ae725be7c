"""The shared cold tier: two stores with their own tiers and one shared directory stand for
two nodes. Real files, the real publish protocol; a row one node saved is a disk hit on the
other, a corrupt or half-written row is never served."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from erllama.cache import kvc, publish
from erllama.cache.counters import counters
from erllama.cache.key import KeyMeta, cache_key
from erllama.cache.store import CacheConfig, CacheStore

KM = KeyMeta(b"s" * 32, 3, b"h" * 32)
LOGITS = np.arange(32, dtype=np.float32)


def row_meta(tokens):
    return kvc.RowMeta(fingerprint=KM.fingerprint, quant=KM.quant, ctx_params_hash=KM.ctx_params_hash,
                       tokens=tokens, save_reason=kvc.SaveReason.COLD)


def payload(i: int, size: int = 30_000) -> bytes:
    return (i.to_bytes(4, "little") * (size // 4 + 1))[:size]


def node(tmp_path, name: str, shared) -> CacheStore:
    local = tmp_path / name
    return CacheStore.start(CacheConfig(ram_quota=1_000_000, ram_file_dir=str(local / "shm"), ram_file_quota=0,
                                        disk_dir=str(local / "disk"), disk_quota=5_000_000,
                                        shared_dir=str(shared), shared_scan_s=0.0))


@pytest.fixture
def nodes(tmp_path):
    counters.reset()
    shared = tmp_path / "shared"
    a, b = node(tmp_path, "a", shared), node(tmp_path, "b", shared)
    yield a, b, shared
    a.close()
    b.close()


def rows_in(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(publish.ROW_SUFFIX))


def test_a_row_saved_on_one_node_is_a_disk_hit_on_the_other(nodes):
    a, b, shared = nodes
    base = list(range(1, 201))
    assert a.save(row_meta(base), LOGITS, payload(1), wait=True).result(timeout=10) == "saved"
    assert rows_in(shared) == [cache_key(KM, base).hex() + ".kvc"]
    assert counters.get("shared_published") == 1
    hit = b.lookup(KM, base + [7, 8])
    assert hit is not None and hit.kind == "partial" and hit.n_tokens == 200
    assert b.index.get(hit.key).tier == "disk"  # imported into b's own disk tier
    with b.restore(hit.key) as row:
        assert bytes(row.kv) == payload(1) and row.meta.token_ids == tuple(base)
        np.testing.assert_array_equal(np.frombuffer(row.logits, dtype=np.float32), LOGITS)
    assert counters.get("shared_imports") == 1 and counters.get("hits_disk") == 1
    # the next lookup on b is local: no second import
    assert b.lookup(KM, base).kind == "exact"
    assert counters.get("shared_imports") == 1


def test_a_longer_shared_prefix_beats_a_shorter_local_one(nodes):
    a, b, _ = nodes
    short, long = list(range(1, 101)), list(range(1, 301))
    b.save(row_meta(short), LOGITS, payload(2), wait=True).result(timeout=10)
    a.save(row_meta(long), LOGITS, payload(3), wait=True).result(timeout=10)
    hit = b.lookup(KM, long + [9])
    assert hit.kind == "partial" and hit.n_tokens == 300
    # a shorter shared row never replaces a longer local one
    assert b.lookup(KM, long + [9]).n_tokens == 300
    assert counters.get("shared_imports") == 1


def test_two_nodes_publishing_the_same_key_resolve_by_adoption(nodes):
    a, b, shared = nodes
    base = list(range(5, 405))
    fa = a.save(row_meta(base), LOGITS, payload(4), wait=True)
    fb = b.save(row_meta(base), LOGITS, payload(4), wait=True)
    assert fa.result(timeout=10) == fb.result(timeout=10) == "saved"
    assert rows_in(shared) == [cache_key(KM, base).hex() + ".kvc"]
    assert counters.get("shared_published") == 2 and counters.get("shared_failed") == 0
    assert not [p for p in shared.iterdir() if p.name.endswith(publish.TMP_SUFFIX)]
    parts = a.shared.parts(cache_key(KM, base))
    assert bytes(parts.kv) == payload(4)


def test_a_corrupt_shared_row_is_deleted_and_never_served(nodes):
    a, b, shared = nodes
    base = list(range(1, 201))
    a.save(row_meta(base), LOGITS, payload(5), wait=True).result(timeout=10)
    path = a.shared.path(cache_key(KM, base))
    with open(path, "r+b") as f:  # one payload byte flipped: the header still parses
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    before = counters.get("corrupt_files")
    assert b.lookup(KM, base + [1]) is None
    assert counters.get("corrupt_files") == before + 1
    assert not path.exists() and counters.get("shared_imports") == 0
    assert b.index.get(cache_key(KM, base)) is None


def test_a_half_written_row_is_never_listed_and_only_a_stale_one_is_swept(tmp_path):
    counters.reset()
    shared = tmp_path / "shared"
    a = node(tmp_path, "a", shared)
    base = list(range(1, 201))
    key = cache_key(KM, base)
    try:
        # what a writer killed mid-write leaves: a temporary file, never a final name
        young = publish.write_tmp(a.shared.directory, key, [b"partial row bytes"])
        old = publish.write_tmp(a.shared.directory, cache_key(KM, base[:100]), [b"older partial"])
        past = time.time() - 2 * 3600
        os.utime(old, (past, past))
    finally:
        a.close()
    b = node(tmp_path, "b", shared)
    try:
        assert b.lookup(KM, base + [1]) is None
        assert young.exists(), "another node's write in progress must not be removed"
        assert not old.exists(), "a temporary file older than an hour is swept"
        assert counters.get("shared_imports") == 0
    finally:
        b.close()


def test_a_file_under_another_rows_name_is_discarded(nodes):
    a, b, shared = nodes
    base, other = list(range(1, 201)), list(range(2, 202))
    a.save(row_meta(base), LOGITS, payload(6), wait=True).result(timeout=10)
    src = a.shared.path(cache_key(KM, base))
    wrong = a.shared.path(cache_key(KM, other))
    os.link(src, wrong)
    assert b.lookup(KM, other + [3]) is None
    assert not wrong.exists() and src.exists()
