"""The row file format (erllama.cache.kvc): round trips, corruption, truncation, buffer reuse."""

from __future__ import annotations

import gc
import hashlib
import os
import struct
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erllama import errors
from erllama.backend.llama import crc32c
from erllama.cache import kvc

FP = bytes(range(32))
CTX = bytes(range(100, 132))

u32 = st.integers(0, 2**32 - 1)
text = st.one_of(st.none(), st.text(max_size=20))


@st.composite
def metas(draw):
    tokens = draw(st.lists(u32, max_size=40))
    as_bytes = draw(st.booleans())
    return kvc.RowMeta(
        fingerprint=draw(st.binary(min_size=32, max_size=32)),
        quant=draw(st.integers(0, 255)),
        ctx_params_hash=draw(st.binary(min_size=32, max_size=32)),
        tokens=struct.pack(f"<{len(tokens)}I", *tokens) if as_bytes else tuple(tokens),
        namespace=draw(st.one_of(st.none(), st.binary(max_size=24))),
        save_reason=draw(st.sampled_from(kvc.SaveReason)),
        context_size=draw(u32),
        fingerprint_mode=draw(st.integers(0, 255)),
        creation_time=draw(st.integers(0, 2**64 - 1)),
        hostname=draw(text),
        version=draw(text),
        detail=draw(text),
        hit_count=draw(u32),
        prompt=draw(st.binary(max_size=30)),
    )


logits_st = st.one_of(
    st.none(),
    st.lists(st.floats(width=32, allow_nan=False), max_size=24).map(lambda xs: array("f", xs)),
)


def make_row(meta: kvc.RowMeta, logits: array | None, kv: bytes) -> bytes:
    """A whole row file, written the way a writer would: prefix, then logits, then kv."""
    lv = None if logits is None else memoryview(logits)
    prefix = kvc.build_prefix(meta, len(kv), lv, kvc.payload_crc32c(lv, kv))
    return prefix + (b"" if logits is None else logits.tobytes()) + kv


def simple_meta(**kw) -> kvc.RowMeta:
    base = dict(fingerprint=FP, quant=7, ctx_params_hash=CTX, tokens=(1, 2, 3, 4),
                save_reason=kvc.SaveReason.COLD, context_size=512, creation_time=1_700_000_000,
                hostname="host", version="0.1.0")
    base.update(kw)
    return kvc.RowMeta(**base)


def small_row() -> bytes:
    return make_row(simple_meta(namespace=b"tenant", detail="why"), array("f", [1.5, -2.0, 0.25]),
                    bytes(range(40)))


def key_fn(fp: bytes, quant: int, ctx: bytes, ns: bytes | None, tokens: bytes) -> bytes:
    h = hashlib.sha256()
    if ns is not None:
        h.update(b"ns" + struct.pack("<I", len(ns)) + ns)
    h.update(fp + bytes((quant,)) + ctx + tokens)
    return h.digest()


def write_v1(meta: kvc.RowMeta, payload: bytes) -> bytes:
    """A version-1 file, encoded independently from SPEC 4.4 (no logits, no header CRC)."""
    def tlv(tag: int, value: bytes) -> bytes:
        return struct.pack("<BI", tag, len(value)) + value

    n = meta.n_tokens
    tlvs = (tlv(1, meta.fingerprint) + tlv(2, bytes((meta.fingerprint_mode,))) + tlv(3, bytes((meta.quant,)))
            + tlv(4, meta.ctx_params_hash) + tlv(8, struct.pack("<I", n)) + tlv(9, meta.tokens)
            + tlv(5, meta.hostname.encode()) + tlv(6, meta.version.encode()))
    sections = struct.pack("<I", len(meta.prompt)) + meta.prompt + struct.pack("<I", len(tlvs)) + tlvs
    offset = 72 + len(sections)
    header = struct.pack("<3sBBBHIIIIQQQ", b"KVC", 1, 4, meta.save_reason, 0, n, meta.hit_count,
                         meta.context_size, 0, meta.creation_time, meta.creation_time, len(payload))
    trailer = struct.pack("<QQII", offset, len(payload), crc32c(payload), 0)
    return header + trailer + sections + payload


# --- checksums ---------------------------------------------------------------------------

def test_crc32c_check_values_through_the_backend():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(b"6789", crc32c(b"12345")) == 0xE3069283


def test_payload_crc_is_the_crc_of_logits_then_kv():
    logits = array("f", [1.0, 2.0, -3.5])
    kv = os.urandom(1000)
    assert kvc.payload_crc32c(logits, kv) == crc32c(logits.tobytes() + kv)
    assert kvc.payload_crc32c(memoryview(logits), memoryview(kv)) == crc32c(logits.tobytes() + kv)
    assert kvc.payload_crc32c(None, kv) == crc32c(kv)


# --- layout ------------------------------------------------------------------------------

def test_layout_of_a_version_2_file():
    data = small_row()
    (magic, version, quant, reason, res16, count, hits, ctx, res32, ctime, lut, pbc,
     po, plen, pcrc, res_t) = struct.unpack_from("<3sBBBHIIIIQQQQQII", data, 0)
    assert (magic, version, quant, reason, res16, res32, res_t) == (b"KVC", 2, 7, 1, 0, 0, 0)
    assert (count, hits, ctx, ctime, lut) == (4, 0, 512, 1_700_000_000, 1_700_000_000)
    assert kvc.HIT_COUNT_OFFSET == 12 and kvc.HEADER_SIZE == 72
    assert po % kvc.PAYLOAD_ALIGN == 0
    assert plen == pbc == 3 * 4 + 40 == len(data) - po
    assert pcrc == crc32c(data[po:])
    # The header CRC is the last TLV, and covers the prefix with bytes 12..15 and its own value zeroed.
    assert struct.unpack_from("<BI", data, po - 9) == (0x0C, 4)
    stored = struct.unpack_from("<I", data, po - 4)[0]
    assert stored == crc32c(data[:12] + bytes(4) + data[16:po - 4] + bytes(4))
    # Prompt section, then the TLV section ending exactly at the payload.
    (plen_prompt,) = struct.unpack_from("<I", data, 72)
    (tlv_len,) = struct.unpack_from("<I", data, 76 + plen_prompt)
    assert 80 + plen_prompt + tlv_len == po
    tags = []
    pos = 80 + plen_prompt
    while pos < po:
        tag, n = struct.unpack_from("<BI", data, pos)
        tags.append(tag)
        if tag == 0x0B:
            assert struct.unpack_from("<II", data, pos + 5) == (3, crc32c(data[po:po + 12]))
        pos += 5 + n
    assert tags == [0x01, 0x02, 0x03, 0x04, 0x0A, 0x08, 0x09, 0x05, 0x06, 0x07, 0x0B, 0x0D, 0x0C]


def test_header_is_the_first_48_bytes():
    data = small_row()
    assert kvc.parse_header(data).header == data[:48]


# --- round trips -------------------------------------------------------------------------

@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(meta=metas(), logits=logits_st, kv=st.binary(max_size=300))
def test_round_trip(meta, logits, kv):
    data = make_row(meta, logits, kv)
    row = kvc.parse(data)
    assert row.meta == meta
    assert row.parsed.version == 2
    assert bytes(row.kv) == kv
    assert row.kv.obj is data  # a view, not a copy
    if logits is None:
        assert row.logits is None and row.parsed.n_logits is None
    else:
        assert row.logits.format == "f"
        assert row.logits.tolist() == logits.tolist()
        assert row.parsed.n_logits == len(logits)
    head = kvc.parse_header(data[:row.parsed.payload_offset], file_size=len(data))
    assert head == row.parsed
    assert head.file_size == len(data)
    assert kvc.parse(data, expected_key=meta.key(key_fn), key_fn=key_fn).meta == meta


def test_tokens_given_as_ids_or_bytes_are_the_same_meta():
    assert simple_meta(tokens=[5, 2**32 - 1]) == simple_meta(tokens=struct.pack("<2I", 5, 2**32 - 1))
    assert simple_meta(tokens=[5, 2**32 - 1]).token_ids == (5, 2**32 - 1)


def test_logits_from_a_bytes_view_and_empty_payloads():
    logits = array("f", [0.125] * 8)
    data = make_row(simple_meta(tokens=()), logits, b"")
    row = kvc.parse(data)
    assert row.meta.n_tokens == 0 and len(row.kv) == 0 and row.logits.tolist() == [0.125] * 8
    kv = b"x" * 5
    prefix = kvc.build_prefix(simple_meta(), len(kv), memoryview(logits).cast("B"),
                              kvc.payload_crc32c(logits, kv), logits_crc=crc32c(logits))
    assert kvc.parse(prefix + logits.tobytes() + kv).logits.tolist() == [0.125] * 8


def test_bad_arguments_are_refused():
    with pytest.raises(errors.InvalidParameter):
        simple_meta(fingerprint=b"short")
    with pytest.raises(errors.InvalidParameter):
        simple_meta(tokens=[-1])
    with pytest.raises(errors.InvalidParameter):
        simple_meta(tokens=[2**32])
    with pytest.raises(errors.InvalidParameter):
        simple_meta(tokens=b"abc")
    with pytest.raises(errors.InvalidParameter):
        simple_meta(save_reason=6)
    with pytest.raises(errors.InvalidParameter):
        kvc.build_prefix(simple_meta(), 0, array("d", [1.0]), 0)
    with pytest.raises(errors.InvalidParameter):
        kvc.build_prefix(simple_meta(), 0, b"abc", 0)
    with pytest.raises(errors.InvalidParameter):
        kvc.parse(small_row(), expected_key=b"k" * 32)


# --- corruption --------------------------------------------------------------------------

def assert_rejected(data: bytes) -> kvc.CorruptRow:
    with pytest.raises(kvc.CorruptRow) as info:
        kvc.parse(data)
    assert info.value.reason in kvc.REASONS
    assert isinstance(info.value, errors.CacheError)
    return info.value


def mutate(data: bytes, offset: int, new: int) -> bytes:
    return data[:offset] + bytes((new,)) + data[offset + 1:]


def test_every_single_byte_change_is_rejected_except_the_hit_count():
    data = small_row()
    po = kvc.parse(data).parsed.payload_offset
    for offset in range(len(data)):
        for delta in (0x01, 0x80, 0xFF):
            bad = mutate(data, offset, data[offset] ^ delta)
            if 12 <= offset < 16:
                assert kvc.parse(bad).meta.hit_count == struct.unpack_from("<I", bad, 12)[0]
                continue
            err = assert_rejected(bad)
            if offset >= po:
                assert err.reason == "crc_mismatch"
            elif po - 9 <= offset < po - 4:
                assert err.reason == "missing_tlv"  # the header CRC record's own tag and length
            elif offset >= 72:
                assert err.reason in {"header_crc_mismatch", "bad_section"}


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(meta=metas(), logits=logits_st, kv=st.binary(max_size=200), data=st.data())
def test_any_single_byte_change_is_rejected_except_the_hit_count(meta, logits, kv, data):
    row = make_row(meta, logits, kv)
    offset = data.draw(st.integers(0, len(row) - 1), label="offset")
    new = data.draw(st.integers(0, 255).filter(lambda b: b != row[offset]), label="byte")
    bad = mutate(row, offset, new)
    if 12 <= offset < 16:
        parsed = kvc.parse(bad)
        assert parsed.meta.hit_count == struct.unpack_from("<I", bad, 12)[0]
        assert bytes(parsed.kv) == kv
    else:
        assert_rejected(bad)


def test_every_truncation_of_a_small_file_is_rejected():
    data = small_row()
    for n in range(len(data)):
        err = assert_rejected(data[:n])
        assert err.reason == "truncated", (n, err)


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_any_truncation_of_a_large_file_is_rejected(data):
    big = _big_row()
    n = data.draw(st.integers(0, len(big) - 1), label="length")
    assert assert_rejected(big[:n]).reason == "truncated"


_BIG: list[bytes] = []


def _big_row() -> bytes:
    if not _BIG:
        logits = array("f", range(65536))
        _BIG.append(make_row(simple_meta(tokens=range(3000)), logits, os.urandom(300_000)))
    return _BIG[0]


@pytest.mark.parametrize("extra", [b"\0", b"junk", bytes(4096)])
def test_trailing_bytes_are_rejected(extra):
    err = assert_rejected(small_row() + extra)
    assert err.reason == "trailing_bytes"


def test_meta_only_parse_checks_the_file_size():
    data = small_row()
    with pytest.raises(kvc.CorruptRow, match="trailing_bytes"):
        kvc.parse_header(data, file_size=len(data) + 1)
    with pytest.raises(kvc.CorruptRow, match="truncated"):
        kvc.parse_header(data, file_size=len(data) - 1)
    po = kvc.parse_header(data).payload_offset
    assert kvc.parse_header(data[:po]).payload_offset == po  # no size given: not checked
    with pytest.raises(kvc.CorruptRow, match="truncated"):
        kvc.parse_header(data[:po - 1])


def test_meta_only_parse_does_not_read_the_payload():
    data = bytearray(small_row())
    data[-1] ^= 0xFF
    assert kvc.parse_header(data, file_size=len(data)).meta.n_tokens == 4
    assert assert_rejected(bytes(data)).reason == "crc_mismatch"


def test_distinct_reasons():
    data = small_row()
    assert assert_rejected(b"XYZ" + data[3:]).reason == "bad_magic"
    assert assert_rejected(data[:3] + b"\x03" + data[4:]).reason == "unsupported_version"
    assert assert_rejected(data[:3] + b"\x01" + data[4:]).reason == "header_crc_mismatch"
    assert assert_rejected(mutate(data, 80, data[80] ^ 1)).reason == "header_crc_mismatch"
    assert assert_rejected(mutate(data, 40, data[40] ^ 1)).reason == "bad_trailer"
    assert assert_rejected(mutate(data, len(data) - 1, data[-1] ^ 1)).reason == "crc_mismatch"
    po = kvc.parse(data).parsed.payload_offset
    assert assert_rejected(mutate(data, po, data[po] ^ 1)).reason == "crc_mismatch"


def _resign(prefix: bytearray) -> bytes:
    """Recompute the header CRC of a hand-edited prefix, so only the edit itself is judged."""
    po = len(prefix)
    crc = crc32c(bytes(prefix[:12]) + bytes(4) + bytes(prefix[16:po - 4]) + bytes(4))
    struct.pack_into("<I", prefix, po - 4, crc)
    return bytes(prefix)


def test_structural_errors_behind_a_valid_header_crc():
    logits = array("f", [1.0])
    kv = b"payload"
    meta = simple_meta()
    prefix = bytearray(kvc.build_prefix(meta, len(kv), logits, kvc.payload_crc32c(logits, kv)))
    tail = logits.tobytes() + kv
    assert kvc.parse(_resign(prefix) + tail).meta == meta
    # cached_token_count disagreeing with the token ids
    edited = bytearray(prefix)
    struct.pack_into("<I", edited, 8, 5)
    assert assert_rejected(_resign(edited) + tail).reason == "bad_header"
    # an unknown save reason
    edited = bytearray(prefix)
    edited[5] = 9
    assert assert_rejected(_resign(edited) + tail).reason == "bad_header"
    # the fingerprint TLV turned into an unknown tag: it goes missing
    edited = bytearray(prefix)
    pos = 80 + struct.unpack_from("<I", edited, 72)[0]
    assert edited[pos] == 0x01
    edited[pos] = 0x7F
    err = assert_rejected(_resign(edited) + tail)
    assert err.reason == "missing_tlv" and err.expected == 0x01
    # the fingerprint TLV turned into a second quant TLV
    edited[pos] = 0x03
    assert assert_rejected(_resign(edited) + tail).reason == "bad_tlv"


def test_key_mismatch_via_key_fn():
    meta = simple_meta(namespace=b"a")
    data = make_row(meta, None, b"kv")
    key = meta.key(key_fn)
    assert kvc.parse(data, expected_key=key, key_fn=key_fn).meta == meta
    other = simple_meta(namespace=b"b").key(key_fn)
    with pytest.raises(kvc.CorruptRow) as info:
        kvc.parse(data, expected_key=other, key_fn=key_fn)
    assert info.value.reason == "key_mismatch"
    assert (info.value.expected, info.value.actual) == (other, key)
    seen = []
    kvc.parse(data, expected_key=key, key_fn=lambda *a: seen.append(a) or key)
    assert seen == [(FP, 7, CTX, b"a", struct.pack("<4I", 1, 2, 3, 4))]


# --- version 1 ---------------------------------------------------------------------------

def test_version_1_files_parse_without_logits():
    meta = simple_meta(prompt=b"hello", hit_count=3)
    payload = os.urandom(500)
    data = write_v1(meta, payload)
    row = kvc.parse(data, expected_key=meta.key(key_fn), key_fn=key_fn)
    assert row.parsed.version == 1
    assert row.meta == meta
    assert row.logits is None and row.parsed.n_logits is None
    assert bytes(row.kv) == payload
    assert assert_rejected(data[:-1]).reason == "truncated"
    assert assert_rejected(data + b"x").reason == "trailing_bytes"
    assert assert_rejected(mutate(data, len(data) - 1, data[-1] ^ 1)).reason == "crc_mismatch"


# --- files -------------------------------------------------------------------------------

def test_read_row_reuses_the_buffer(tmp_path):
    big = make_row(simple_meta(tokens=range(100)), array("f", range(1000)), os.urandom(200_000))
    small = small_row()
    (tmp_path / "big.kvc").write_bytes(big)
    (tmp_path / "small.kvc").write_bytes(small)
    buf = bytearray()
    row = kvc.read_row(tmp_path / "big.kvc", buffer=buf)
    assert len(buf) >= len(big)
    assert row.kv.obj is buf and bytes(row.kv) == big[-200_000:]
    assert row.logits.tolist() == list(map(float, range(1000)))
    size = len(buf)
    row.release()
    with kvc.read_row(tmp_path / "small.kvc", buffer=buf) as row2:
        assert len(buf) == size  # no growth
        assert row2.kv.obj is buf
        assert bytes(row2.kv) == bytes(range(40))
        assert row2.meta == kvc.parse(small).meta
    # Reading the big file again fits too, and nothing else holds the buffer.
    kvc.read_row(tmp_path / "big.kvc", buffer=buf).release()
    assert len(buf) == size
    buf.extend(b"x")


def test_read_row_without_a_buffer_and_key_check(tmp_path):
    meta = simple_meta()
    path = tmp_path / "r.kvc"
    path.write_bytes(make_row(meta, None, b"state"))
    row = kvc.read_row(path, expected_key=meta.key(key_fn), key_fn=key_fn)
    assert bytes(row.kv) == b"state" and row.logits is None
    with pytest.raises(kvc.CorruptRow) as info:
        kvc.read_row(path, expected_key=bytes(32), key_fn=key_fn)
    assert info.value.reason == "key_mismatch" and info.value.path == str(path)
    with pytest.raises(FileNotFoundError):
        kvc.read_row(tmp_path / "missing.kvc")


def test_a_growing_buffer_still_viewed_by_a_row_is_refused(tmp_path):
    huge = make_row(simple_meta(), None, os.urandom(3 << 20))
    (tmp_path / "small.kvc").write_bytes(small_row())
    (tmp_path / "huge.kvc").write_bytes(huge)
    buf = bytearray()
    row = kvc.read_row(tmp_path / "small.kvc", buffer=buf)
    assert len(buf) < len(huge)
    with pytest.raises(BufferError, match="release"):
        kvc.read_row(tmp_path / "huge.kvc", buffer=buf)
    row.release()
    assert bytes(kvc.read_row(tmp_path / "huge.kvc", buffer=buf).kv) == huge[-(3 << 20):]


def test_a_rejected_file_leaves_the_buffer_free(tmp_path):
    data = bytearray(small_row())
    data[-1] ^= 1
    (tmp_path / "bad.kvc").write_bytes(data)
    (tmp_path / "huge.kvc").write_bytes(make_row(simple_meta(), None, bytes(3 << 20)))
    buf = bytearray()
    with pytest.raises(kvc.CorruptRow) as info:
        kvc.read_row(tmp_path / "bad.kvc", buffer=buf)
    assert info.value.reason == "crc_mismatch" and str(tmp_path / "bad.kvc") in str(info.value)
    kept = info.value  # the error and its traceback stay alive
    size = len(buf)
    kvc.read_row(tmp_path / "huge.kvc", buffer=buf).release()
    assert len(buf) > size
    assert kept.reason == "crc_mismatch"
    gc.collect()


def test_read_header_and_truncated_files(tmp_path):
    big = _big_row()
    path = tmp_path / "big.kvc"
    path.write_bytes(big)
    assert kvc.read_header(path) == kvc.parse(big).parsed
    path.write_bytes(big[:-1])
    with pytest.raises(kvc.CorruptRow, match="truncated"):
        kvc.read_header(path)
    with pytest.raises(kvc.CorruptRow, match="truncated"):
        kvc.read_row(path)
    path.write_bytes(big + b"\0")
    with pytest.raises(kvc.CorruptRow, match="trailing_bytes"):
        kvc.read_header(path)


def test_write_hit_count_in_place(tmp_path):
    path = tmp_path / "r.kvc"
    path.write_bytes(small_row())
    assert kvc.write_hit_count(path, 41)
    assert kvc.read_row(path).meta.hit_count == 41
    assert kvc.write_hit_count(path, 2**40)
    assert kvc.read_header(path).meta.hit_count == 2**32 - 1
    assert not kvc.write_hit_count(tmp_path / "gone.kvc", 1)
    assert not (tmp_path / "gone.kvc").exists()
    with pytest.raises(errors.InvalidParameter):
        kvc.write_hit_count(path, -1)


def _crc_while_reading(row: bytes, cuts: list[int]) -> kvc.PayloadCrc:
    """PayloadCrc fed the way a reader hands it chunks: the bytes up to each cut."""
    buf = bytearray(row)
    crc = kvc.PayloadCrc(buf)
    for got in [*sorted(c for c in cuts if 0 < c < len(row)), len(row)]:
        crc.feed(got)
    return crc


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(meta=metas(), logits=logits_st, kv=st.binary(max_size=300), data=st.data())
def test_crcs_computed_while_reading_equal_the_parse_and_catch_any_change(meta, logits, kv, data):
    row = make_row(meta, logits, kv)
    cuts = data.draw(st.lists(st.integers(0, len(row)), max_size=6), label="cuts")
    parsed = kvc.parse(row, crcs=_crc_while_reading(row, cuts))
    assert bytes(parsed.kv) == kv
    offset = data.draw(st.integers(0, len(row) - 1).filter(lambda o: not 12 <= o < 16), label="offset")
    new = data.draw(st.integers(0, 255).filter(lambda b: b != row[offset]), label="byte")
    bad = mutate(row, offset, new)
    try:
        crcs = _crc_while_reading(bad, cuts)
    except kvc.CorruptRow:
        crcs = None  # a bad prefix: the reader's parse reports it
    with pytest.raises(kvc.CorruptRow):
        kvc.parse(bad, crcs=crcs)


def test_crcs_of_other_bytes_are_not_used():
    row = small_row()
    other = make_row(simple_meta(tokens=range(7)), array("f", [1.0, 2.0]), b"other kv")
    crcs = _crc_while_reading(other, [10])
    assert bytes(kvc.parse(row, crcs=crcs).kv) == bytes(kvc.parse(row).kv)  # recomputed, not taken
    partial = kvc.PayloadCrc(bytearray(row))
    partial.feed(len(row) - 1)  # one byte short of the end
    po = kvc.parse(row).parsed
    assert partial.covering(po.payload_offset, po.kv_offset, po.file_size) is None


def test_payload_left_unverified_only_when_asked():
    row = bytearray(small_row())
    row[-1] ^= 0xFF
    assert_rejected(bytes(row))
    assert kvc.parse(bytes(row), verify_payload=False).kv[-1] == row[-1]  # header, size, key still checked
    with pytest.raises(kvc.CorruptRow, match="truncated"):
        kvc.parse(bytes(row[:-1]), verify_payload=False)
