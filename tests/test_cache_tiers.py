"""The three tiers: same encoded bytes everywhere, crash-safe files, corrupt rows never served."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

from erllama.cache import kvc, publish
from erllama.cache.counters import Counters
from erllama.cache.key import KeyMeta, cache_key
from erllama.cache.tiers import FileTier, RamTier, encode_row

META = KeyMeta(b"f" * 32, 7, b"c" * 32)


def make_row(tokens, kv_size=50_000, n_vocab=300, seed=0):
    rng = np.random.default_rng(seed)
    kv = rng.integers(0, 256, kv_size, dtype=np.uint8).tobytes()
    logits = rng.standard_normal(n_vocab).astype(np.float32)
    meta = kvc.RowMeta(fingerprint=META.fingerprint, quant=META.quant, ctx_params_hash=META.ctx_params_hash,
                       tokens=tokens, save_reason=kvc.SaveReason.COLD, context_size=512)
    return cache_key(META, tokens), encode_row(meta, logits, kv), logits, kv


@pytest.fixture
def stats():
    return Counters()


def test_ram_tier_roundtrip():
    tier = RamTier()
    key, parts, logits, kv = make_row([1, 2, 3])
    tier.put(key, parts)
    row = tier.load(key)
    assert row.meta.token_ids == (1, 2, 3) and bytes(row.kv) == kv
    np.testing.assert_array_equal(np.frombuffer(row.logits, dtype=np.float32), logits)
    assert tier.keys() == [key]
    tier.delete(key)
    tier.delete(key)
    with pytest.raises(KeyError):
        tier.load(key)


def test_file_tier_roundtrip_and_same_bytes_as_ram(tmp_path, stats):
    tier = FileTier("disk", tmp_path, stats)
    key, parts, logits, kv = make_row(list(range(100)))
    path = tier.put(key, parts)
    assert path.name == key.hex() + ".kvc" and path.stat().st_size == parts.size
    assert path.read_bytes() == b"".join(bytes(memoryview(b).cast("B")) for b in parts.buffers())
    buf = bytearray()
    with tier.load(key, buf) as row:
        assert bytes(row.kv) == kv and row.meta.token_ids == tuple(range(100))
        np.testing.assert_array_equal(np.frombuffer(row.logits, dtype=np.float32), logits)
    # promotion reads the same bytes back as parts
    back = tier.parts(key)
    assert back.prefix == parts.prefix and bytes(back.kv) == kv
    tier.write_hits(key, 9)
    assert kvc.read_header(path).meta.hit_count == 9
    tier.load(key).release()  # the hit count is outside the header CRC


def test_corrupt_file_is_deleted_counted_and_never_served(tmp_path, stats):
    tier = FileTier("disk", tmp_path, stats)
    key, parts, _, _ = make_row([5, 6, 7])
    path = tier.put(key, parts)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x40  # one flipped bit in the KV payload
    path.write_bytes(bytes(data))
    with pytest.raises(kvc.CorruptRow) as info:
        tier.load(key)
    assert info.value.reason == "crc_mismatch"
    assert not path.exists() and stats.get("corrupt_files") == 1
    with pytest.raises(FileNotFoundError):
        tier.load(key)


def test_scan_after_restart(tmp_path, stats):
    tier = FileTier("ram_file", tmp_path, stats)
    rows = [make_row([i, i + 1, i + 2], seed=i) for i in range(4)]
    for key, parts, _, _ in rows:
        tier.put(key, parts)
    (tmp_path / (rows[0][0].hex() + ".kvc.123.abc.tmp")).write_bytes(b"partial")
    truncated = tier.path(rows[1][0])
    truncated.write_bytes(truncated.read_bytes()[:-5])
    renamed = tier.path(rows[2][0])
    os.rename(renamed, tmp_path / (rows[3][0].hex()[:-2] + "00.kvc"))  # a name that lies
    found = FileTier("ram_file", tmp_path, stats).scan()
    assert sorted(r.key for r in found) == sorted([rows[0][0], rows[3][0]])
    assert not list(tmp_path.glob("*.tmp"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(r[0].hex() + ".kvc" for r in (rows[0], rows[3]))
    assert stats.get("corrupt_files") == 2  # the truncated file and the misnamed one
    by_key = {r.key: r for r in found}
    assert by_key[rows[3][0]].size == rows[3][1].size and by_key[rows[3][0]].parsed.meta.token_ids == (3, 4, 5)


def test_enospc_fails_cleanly(tmp_path, stats):
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    assert res.returncode == 0, f"this test mounts a small tmpfs (needs root): {res.stderr!r}"
    try:
        tier = FileTier("ram_file", mnt, stats)
        small_key, small, _, _ = make_row([1], kv_size=10_000)
        tier.put(small_key, small)
        key, parts, _, _ = make_row([2], kv_size=400_000)
        with pytest.raises(publish.PublishError) as info:
            tier.put(key, parts)
        assert info.value.errno == 28
        assert sorted(p.name for p in mnt.iterdir()) == [small_key.hex() + ".kvc"]
        tier.load(small_key).release()  # what was there before is intact
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
