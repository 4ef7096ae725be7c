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
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mnt)], capture_output=True)
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


def test_ram_tier_keeps_read_only_copies_of_writable_buffers():
    tier = RamTier()
    key, parts, logits, kv = make_row([1, 2, 3])
    kv_buf = bytearray(kv)
    logits_buf = logits.copy()
    tier.put(key, encode_row(kvc.parse_header(parts.prefix).meta, logits_buf, kv_buf))
    kv_buf[:4] = b"\xff\xff\xff\xff"  # the caller reuses its buffers
    logits_buf[:] = 0
    with tier.load(key) as row:
        assert bytes(row.kv) == kv and row.kv.readonly
        np.testing.assert_array_equal(np.frombuffer(row.logits, dtype=np.float32), logits)
    frozen = RamTier()
    frozen.put(key, parts)
    assert frozen.parts(key).kv is parts.kv  # read-only bytes are kept without a copy


def _flip(path, offset):
    with open(path, "r+b") as f:  # in place: same inode and size
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes((b[0] ^ 0x10,)))


@pytest.fixture
def trusting(tmp_path, stats):
    tier = FileTier("ram_file", tmp_path, stats, trust_verified=True)
    if not tier.trusting:
        pytest.skip("this kernel stamps file changes with a coarse clock")
    return tier


def test_ram_file_skips_the_payload_crc_of_rows_it_verified(trusting, stats):
    key, parts, logits, kv = make_row(list(range(50)))
    path = trusting.put(key, parts)  # the publish read-back verifies it
    for n in (1, 2):
        with trusting.load(key, bytearray()) as row:
            assert bytes(row.kv) == kv
        assert stats.get("loads_crc_skipped") == n
    trusting.write_hits(key, 5)  # our own write of the hit count keeps the trust
    with trusting.load(key) as row:
        assert row.meta.hit_count == 5
    assert stats.get("loads_crc_skipped") == 3
    os.utime(path)  # any change through the file system: verified again, then trusted again
    trusting.load(key).release()
    assert stats.get("loads_crc_skipped") == 3
    trusting.load(key).release()
    assert stats.get("loads_crc_skipped") == 4


@pytest.mark.parametrize("where", ["kv", "logits", "truncate", "replace"])
def test_a_trusted_row_changed_on_disk_is_never_served(trusting, stats, where):
    key, parts, _, _ = make_row(list(range(50)))
    path = trusting.put(key, parts)
    trusting.load(key).release()
    assert stats.get("loads_crc_skipped") == 1
    po = len(parts.prefix)
    if where == "kv":
        _flip(path, parts.size - 7)
    elif where == "logits":
        _flip(path, po + 8)
    elif where == "truncate":
        os.truncate(path, parts.size - 1)
    else:  # another file with the same bytes but one, renamed over it
        data = bytearray(path.read_bytes())
        data[-3] ^= 1
        other = path.with_suffix(".new")
        other.write_bytes(bytes(data))
        os.replace(other, path)
    with pytest.raises(kvc.CorruptRow) as info:
        trusting.load(key)
    assert info.value.reason == ("truncated" if where == "truncate" else "crc_mismatch")
    assert not path.exists() and stats.get("corrupt_files") == 1
    assert stats.get("loads_crc_skipped") == 1


def test_disk_and_coarse_clocks_always_check_the_crc(tmp_path, stats, monkeypatch):
    disk = FileTier("disk", tmp_path / "d", stats)
    key, parts, _, kv = make_row([1, 2])
    disk.put(key, parts)
    for _ in range(2):
        disk.load(key).release()
    assert not disk.trusting and stats.get("loads_crc_skipped") == 0
    from erllama.cache import tiers

    monkeypatch.setattr(tiers, "fine_ctime", lambda directory: False)
    coarse = FileTier("ram_file", tmp_path / "r", stats, trust_verified=True)
    assert not coarse.trusting
    coarse.put(key, parts)
    coarse.load(key).release()
    assert stats.get("loads_crc_skipped") == 0
    assert not list((tmp_path / "r").glob("*.tmp"))


def test_fine_ctime_probe_cleans_up(tmp_path):
    from erllama.cache.tiers import fine_ctime

    assert isinstance(fine_ctime(tmp_path), bool)
    assert list(tmp_path.iterdir()) == []
    assert fine_ctime(tmp_path / "missing") is False


def test_large_rows_are_checked_while_read_and_every_change_is_caught(tmp_path, stats, monkeypatch):
    from erllama.cache import tiers

    fed = []
    real_feed = kvc.PayloadCrc.feed
    monkeypatch.setattr(kvc.PayloadCrc, "feed", lambda self, got: (fed.append(got), real_feed(self, got))[1])
    tier = FileTier("disk", tmp_path, stats)
    key, parts, logits, kv = make_row(list(range(3000)), kv_size=tiers.PIPELINE_MIN + 3 * tiers.PIPELINE_CHUNK // 2,
                                      n_vocab=70_000)
    path = tier.put(key, parts)
    good = path.read_bytes()
    with tier.load(key, bytearray(100)) as row:  # a buffer too small grows before the helper sees it
        assert bytes(row.kv) == kv
        np.testing.assert_array_equal(np.frombuffer(row.logits, dtype=np.float32), logits)
    assert len(fed) >= 3 and fed[-1] == len(good)  # chunk by chunk, on the helper thread
    po = len(parts.prefix)
    for offset in (40, po - 2, po, po + 4 * 70_000 - 1, po + 4 * 70_000, len(good) // 2, len(good) - 1):
        path.write_bytes(good[:offset] + bytes((good[offset] ^ 0x01,)) + good[offset + 1:])
        with pytest.raises(kvc.CorruptRow) as info:
            tier.load(key)
        assert info.value.reason == "crc_mismatch" if offset >= po else info.value.reason in kvc.REASONS
    path.write_bytes(good[: len(good) - 100])
    with pytest.raises(kvc.CorruptRow, match="truncated"):
        tier.load(key)
    assert stats.get("corrupt_files") == 8


def test_buffer_pool():
    from erllama.cache.tiers import BufferPool

    pool = BufferPool(keep=2)
    a = pool.take(10)
    assert len(a) == 1 << 20
    b = pool.take(3 << 20)
    pool.give(a)
    pool.give(b)
    assert pool.take(2 << 20) is b and pool.take(5) is a  # the smallest that fits
    pool.give(a)
    pool.give(b)
    pool.give(bytearray(5 << 20))
    assert pool.sizes() == [3 << 20, 5 << 20]  # at most keep free buffers, the smallest dropped
    with pool.buffer(4 << 20) as c:
        assert len(c) == 5 << 20 and pool.sizes() == [3 << 20]
    assert pool.sizes() == [3 << 20, 5 << 20]


def _big(tokens, seed=0):
    from erllama.cache import tiers

    return make_row(tokens, kv_size=tiers.PIPELINE_MIN + tiers.PIPELINE_CHUNK, n_vocab=5000, seed=seed)


@pytest.mark.parametrize("tier_name", ["ram_file", "disk"])
def test_late_check_hands_the_row_out_before_its_crc_ends(tmp_path, stats, tier_name):
    tier = FileTier(tier_name, tmp_path, stats, trust_verified=tier_name == "ram_file")
    key, parts, logits, kv = _big(list(range(20)))
    path = tier.put(key, parts)
    os.utime(path)  # not trusted: this load checks the CRC
    corrupt = []
    with tier.load(key, bytearray(), late=True, on_corrupt=lambda: corrupt.append(1)) as row:
        assert row.check is not None and bytes(row.kv[:100]) == kv[:100]
        assert row.verified() and row.verified()  # answered once, then remembered
    assert not corrupt and stats.get("corrupt_files") == 0
    with tier.load(key, late=True) as row:  # trusted now on tmpfs: nothing left to check
        assert (row.check is None) == tier.trusting and row.verified()
    small_key, small, _, _ = make_row([1, 2, 3])
    tier.put(small_key, small)
    with tier.load(small_key, late=True) as row:
        assert row.check is None and row.verified()  # small files are checked before they are handed out


def test_late_check_of_a_corrupt_row_says_no_and_deletes_it(tmp_path, stats):
    tier = FileTier("disk", tmp_path, stats)
    key, parts, _, _ = _big(list(range(20)))
    path = tier.put(key, parts)
    _flip(path, parts.size - 5)
    corrupt = []
    row = tier.load(key, bytearray(), late=True, on_corrupt=lambda: corrupt.append(1))
    try:
        assert not row.verified() and not row.verified()
    finally:
        row.release()
    assert corrupt == [1] and not path.exists() and stats.get("corrupt_files") == 1
    path.write_bytes(b"".join(bytes(memoryview(b).cast("B")) for b in parts.buffers()))
    _flip(path, 100)  # the header: refused at once, before any payload is handed out
    with pytest.raises(kvc.CorruptRow):
        tier.load(key, bytearray(), late=True)
