"""Cache keys: SPEC 4.1/4.2 known answers, namespaces, token checks, prefix hashing."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from erllama import errors
from erllama.cache import key as K

FP = bytes(range(32))
CTX = hashlib.sha256(b"ctx").digest()
META = K.KeyMeta(fingerprint=FP, quant=K.quant_byte("q4_k_m"), ctx_params_hash=CTX)

tokens_st = st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=200)


def spec_key(fp: bytes, quant: int, ctx: bytes, tokens: list[int]) -> bytes:
    """SPEC 4.1 written out independently of the module."""
    return hashlib.sha256(
        fp + bytes([quant]) + ctx + b"".join(struct.pack("<I", t) for t in tokens)
    ).digest()


# --- quant table ------------------------------------------------------------------------


def test_quant_table_matches_spec():
    spec = (
        "f32 f16 q4_0 q4_1 q5_0 q5_1 q8_0 q4_k_m q4_k_s q5_k_m q5_k_s q6_k q8_k q2_k "
        "q3_k_s q3_k_m q3_k_l iq2_xxs iq2_xs iq2_s iq2_m iq3_xxs iq3_xs iq3_s iq3_m "
        "iq1_s iq1_m iq4_nl iq4_xs bf16"
    ).split()
    assert K.QUANT_BYTES == {name: i for i, name in enumerate(spec)}


@pytest.mark.parametrize("name", sorted(K.QUANT_BYTES))
def test_quant_round_trip(name):
    assert K.quant_name(K.quant_byte(name)) == name
    assert K.quant_byte(name.upper()) == K.quant_byte(name)


def test_unknown_quant():
    assert K.quant_byte("q9_zz") == 255
    assert K.quant_byte("") == 255
    for b in (255, 30, 200, -1):
        with pytest.raises(errors.CacheError, match="unknown_quant"):
            K.quant_name(b)


@pytest.mark.parametrize(
    ("ftype", "name"),
    [
        ("all F32", "f32"),
        ("F16", "f16"),
        ("BF16", "bf16"),
        ("Q8_0", "q8_0"),
        ("Q4_0", "q4_0"),
        ("Q4_K - Medium", "q4_k_m"),
        ("Q4_K - Small", "q4_k_s"),
        ("(guessed) Q5_K - Medium", "q5_k_m"),
        ("Q3_K - Large", "q3_k_l"),
        ("Q2_K - Medium", "q2_k"),
        ("Q6_K", "q6_k"),
        ("IQ2_XXS - 2.0625 bpw", "iq2_xxs"),
        ("IQ3_S mix - 3.66 bpw", "iq3_m"),
        ("IQ3_S - 3.4375 bpw", "iq3_s"),
        ("IQ4_NL - 4.5 bpw", "iq4_nl"),
    ],
)
def test_quant_from_ftype_name_known(ftype, name):
    assert K.quant_from_ftype_name(ftype) == name
    assert K.quant_byte(K.quant_from_ftype_name(ftype)) == K.QUANT_BYTES[name]


@pytest.mark.parametrize(
    ("ftype", "name"),
    [
        ("Q2_K - Small", "q2_k_s"),
        ("TQ1_0 - 1.69 bpw ternary", "tq1_0"),
        ("MXFP4 MoE", "mxfp4_moe"),
        ("unknown, may not work", "unknown"),
    ],
)
def test_quant_from_ftype_name_outside_table(ftype, name):
    assert K.quant_from_ftype_name(ftype) == name
    assert K.quant_byte(name) == 255


# --- KeyMeta ----------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["fingerprint", "ctx_params_hash"])
@pytest.mark.parametrize("length", [0, 16, 31, 33])
def test_meta_rejects_bad_digest_length(field, length):
    kwargs = {"fingerprint": FP, "quant": 1, "ctx_params_hash": CTX, field: b"x" * length}
    with pytest.raises(errors.ConfigError, match=rf"{field}.*{length} bytes"):
        K.KeyMeta(**kwargs)


def test_meta_rejects_non_bytes_and_bad_quant():
    with pytest.raises(errors.ConfigError, match="fingerprint"):
        K.KeyMeta("a" * 32, 1, CTX)  # type: ignore[arg-type]
    for q in (-1, 256, True, 1.0, "q4_0"):
        with pytest.raises(errors.ConfigError, match="quant"):
            K.KeyMeta(FP, q, CTX)  # type: ignore[arg-type]
    with pytest.raises(errors.ConfigError, match="namespace"):
        K.KeyMeta(FP, 1, CTX, namespace=b"")
    with pytest.raises(errors.ConfigError, match="namespace"):
        K.KeyMeta(FP, 1, CTX, namespace="tenant")  # type: ignore[arg-type]


def test_meta_normalizes_bytes_like():
    m = K.KeyMeta(bytearray(FP), 1, memoryview(CTX), namespace=bytearray(b"t"))
    assert m == K.KeyMeta(FP, 1, CTX, namespace=b"t")
    assert type(m.fingerprint) is bytes and type(m.namespace) is bytes
    assert hash(m) == hash(K.KeyMeta(FP, 1, CTX, namespace=b"t"))


# --- cache_key --------------------------------------------------------------------------


def test_spec_known_answer():
    tokens = [0, 1, 2, 255, 256, 65535, 2**31, 2**32 - 1]
    expected = hashlib.sha256(
        FP + b"\x07" + CTX + np.array(tokens, dtype="<u4").tobytes()
    ).digest()
    assert expected == spec_key(FP, 7, CTX, tokens)
    got = K.cache_key(META, tokens)
    assert got == expected
    assert len(got) == 32
    assert K.key_hex(got) == expected.hex()
    assert K.key_hex(got) == K.key_hex(got).lower()


def test_empty_tokens_key_is_header_hash():
    assert K.cache_key(META, []) == hashlib.sha256(FP + b"\x07" + CTX).digest()


@given(tokens=tokens_st, quant=st.integers(0, 255))
def test_key_matches_spec_property(tokens, quant):
    meta = K.KeyMeta(FP, quant, CTX)
    assert K.cache_key(meta, tokens) == spec_key(FP, quant, CTX, tokens)


def test_key_deterministic_and_sensitive():
    toks = [10, 20, 30]
    k = K.cache_key(META, toks)
    assert k == K.cache_key(META, list(toks))
    others = {
        K.cache_key(META, [10, 20, 31]),
        K.cache_key(META, [10, 20]),
        K.cache_key(META, [10, 20, 30, 0]),
        K.cache_key(K.KeyMeta(bytes(32), META.quant, CTX), toks),
        K.cache_key(K.KeyMeta(FP, META.quant + 1, CTX), toks),
        K.cache_key(K.KeyMeta(FP, META.quant, bytes(32)), toks),
    }
    assert k not in others
    assert len(others) == 6


@pytest.mark.parametrize(
    "tokens",
    [
        np.array([5, 6, 7], dtype=np.int64),
        np.array([5, 6, 7], dtype=np.uint16),
        np.array([5, 6, 7], dtype=">u4"),
        np.array([5, 0, 6, 0, 7], dtype="<u4")[::2],
        (5, 6, 7),
        [np.int32(5), np.int64(6), np.uint64(7)],
    ],
)
def test_token_containers(tokens):
    assert K.cache_key(META, tokens) == spec_key(FP, 7, CTX, [5, 6, 7])
    assert K.encode_tokens(tokens) == struct.pack("<3I", 5, 6, 7)


@pytest.mark.parametrize(
    "tokens",
    [
        [-1],
        [2**32],
        [1, 2, 2**32 + 5],
        [2**64],
        [-1, 2**63],
        np.array([3, -2], dtype=np.int32),
        np.array([2**32], dtype=np.uint64),
        [1.0],
        [True],
        ["1"],
        [[1, 2]],
        "12",
        b"\x01\x02",
    ],
)
def test_tokens_out_of_range_raise_invalid_token(tokens):
    with pytest.raises(errors.InvalidToken):
        K.cache_key(META, tokens)
    with pytest.raises(errors.InvalidToken):
        K.encode_tokens(tokens)
    with pytest.raises(errors.InvalidToken):
        K.prefix_keys(META, tokens, [1])


def test_invalid_token_names_value_and_position():
    with pytest.raises(errors.InvalidToken, match=r"4294967296 at position 2"):
        K.encode_tokens([0, 1, 2**32])
    with pytest.raises(errors.InvalidToken, match=r"-7 at position 1"):
        K.encode_tokens(np.array([0, -7], dtype=np.int16))


@given(tokens_st)
def test_encode_decode_round_trip(tokens):
    data = K.encode_tokens(tokens)
    assert len(data) == 4 * len(tokens)
    assert data == b"".join(struct.pack("<I", t) for t in tokens)
    assert K.decode_tokens(data) == tokens


def test_decode_rejects_ragged_length():
    with pytest.raises(errors.CacheError, match="5"):
        K.decode_tokens(b"\x00" * 5)


def test_key_hex_rejects_wrong_length():
    with pytest.raises(errors.CacheError):
        K.key_hex(b"\x00" * 31)


# --- namespace --------------------------------------------------------------------------


def test_namespace_changes_key_and_matches_documented_framing():
    toks = [1, 2, 3]
    plain = K.cache_key(META, toks)
    ns_meta = K.KeyMeta(FP, 7, CTX, namespace=b"tenant-a")
    ns_key = K.cache_key(ns_meta, toks)
    assert ns_key != plain
    expected = hashlib.sha256(
        K.NAMESPACE_TAG
        + struct.pack("<I", 8)
        + b"tenant-a"
        + FP
        + b"\x07"
        + CTX
        + struct.pack("<3I", *toks)
    ).digest()
    assert ns_key == expected
    assert K.cache_key(K.KeyMeta(FP, 7, CTX, namespace=b"tenant-b"), toks) != ns_key


@given(
    ns=st.binary(min_size=1, max_size=40),
    tokens=st.lists(st.integers(0, 2**32 - 1), max_size=30),
)
def test_namespaced_input_never_equals_plain_input(ns, tokens):
    meta = K.KeyMeta(FP, 7, CTX, namespace=ns)
    plain = K.KeyMeta(FP, 7, CTX)
    ns_input = meta.header() + K.encode_tokens(tokens)
    # Any plain hash input is 65 + 4k bytes long; a namespaced one never is.
    assert len(plain.header() + K.encode_tokens(tokens)) % 4 == 1
    assert len(ns_input) % 4 == 3
    assert K.cache_key(meta, tokens) != K.cache_key(plain, tokens)
    assert meta.header().startswith(K.NAMESPACE_TAG)


def test_namespace_framing_is_unambiguous():
    # Moving bytes between the namespace and what follows must change the key.
    a = K.KeyMeta(FP, 7, CTX, namespace=b"ab")
    b = K.KeyMeta(FP, 7, CTX, namespace=b"a")
    c = K.KeyMeta(FP, 7, CTX, namespace=b"ab\x00\x00")
    keys = {K.cache_key(m, [1]) for m in (a, b, c)}
    assert len(keys) == 3


# --- effective fingerprint --------------------------------------------------------------


SHA_A = hashlib.sha256(b"adapter a").digest()
SHA_B = hashlib.sha256(b"adapter b").digest()


def test_effective_fp_empty_is_base():
    assert K.effective_fingerprint(FP, []) == FP


def test_effective_fp_known_answer():
    pairs = [(SHA_B, 1.0), (SHA_A, 0.5)]
    expected = hashlib.sha256(
        FP + b"".join(sha + struct.pack("<q", int(s * 2**32)) for sha, s in sorted(pairs))
    ).digest()
    got = K.effective_fingerprint(FP, pairs)
    assert got == expected
    assert len(got) == 32 and got != FP


def test_effective_fp_same_sha_sorted_by_scale():
    expected = hashlib.sha256(
        FP + SHA_A + struct.pack("<q", 2**31) + SHA_A + struct.pack("<q", 2**32)
    ).digest()
    assert K.effective_fingerprint(FP, [(SHA_A, 1.0), (SHA_A, 0.5)]) == expected


def test_effective_fp_negative_scale_and_rounding():
    # -0.25 * 2**32 = -2**30 exactly; 2**-33 * 2**32 = 0.5 rounds away from zero (Erlang).
    expected = hashlib.sha256(FP + SHA_A + struct.pack("<q", -(2**30))).digest()
    assert K.effective_fingerprint(FP, [(SHA_A, -0.25)]) == expected
    half = hashlib.sha256(FP + SHA_A + struct.pack("<q", 1)).digest()
    assert K.effective_fingerprint(FP, [(SHA_A, 2.0**-33)]) == half
    neg_half = hashlib.sha256(FP + SHA_A + struct.pack("<q", -1)).digest()
    assert K.effective_fingerprint(FP, [(SHA_A, -(2.0**-33))]) == neg_half


@given(
    pairs=st.lists(
        st.tuples(
            st.binary(min_size=32, max_size=32),
            st.floats(min_value=-100, max_value=100, allow_nan=False),
        ),
        max_size=6,
    ),
    data=st.data(),
)
def test_effective_fp_order_independent(pairs, data):
    shuffled = data.draw(st.permutations(pairs))
    assert K.effective_fingerprint(FP, pairs) == K.effective_fingerprint(FP, shuffled)


def test_effective_fp_scale_and_adapter_change_it():
    base = K.effective_fingerprint(FP, [(SHA_A, 1.0)])
    assert base != FP
    assert K.effective_fingerprint(FP, [(SHA_A, 0.75)]) != base
    assert K.effective_fingerprint(FP, [(SHA_B, 1.0)]) != base
    assert K.effective_fingerprint(FP, [(SHA_A, 1.0), (SHA_B, 1.0)]) != base
    assert K.effective_fingerprint(bytes(32), [(SHA_A, 1.0)]) != base


def test_effective_fp_drops_bad_sha():
    good = K.effective_fingerprint(FP, [(SHA_A, 1.0)])
    assert K.effective_fingerprint(FP, [(SHA_A, 1.0), (b"short", 2.0)]) == good
    assert K.effective_fingerprint(FP, [(b"x" * 33, 2.0), (SHA_A, 1.0)]) == good
    # A non-empty list whose shas are all bad still hashes the base (SPEC 4.2).
    assert K.effective_fingerprint(FP, [(b"short", 1.0)]) == hashlib.sha256(FP).digest()


def test_effective_fp_rejects_bad_inputs():
    with pytest.raises(errors.ConfigError, match="fingerprint.*31 bytes"):
        K.effective_fingerprint(FP[:31], [])
    for bad in (float("nan"), float("inf"), "1.0", None, 3e9):
        with pytest.raises(errors.ConfigError, match="scale"):
            K.effective_fingerprint(FP, [(SHA_A, bad)])  # type: ignore[list-item]


# --- ctx_params_hash --------------------------------------------------------------------


def test_ctx_params_hash_canonical():
    params = {"type_k": "f16", "type_v": "f16", "flash_attn": False, "n_seq_max": 4,
              "kv_unified": True, "swa_full": False}
    h = K.ctx_params_hash(**params)
    expected = hashlib.sha256(
        json.dumps(params, sort_keys=True, separators=(",", ":")).encode()
    ).digest()
    assert h == expected
    assert len(h) == 32
    assert K.ctx_params_hash(**dict(reversed(list(params.items())))) == h
    assert K.ctx_params_hash(**{**params, "n_seq_max": 1}) != h
    assert K.ctx_params_hash(**{**params, "kv_unified": False}) != h
    assert K.ctx_params_hash(**{**params, "n_seq_max": True}) != K.ctx_params_hash(
        **{**params, "n_seq_max": 1}
    )


def test_ctx_params_hash_rejects_non_json():
    with pytest.raises(errors.ConfigError, match="type_k"):
        K.ctx_params_hash(type_k=object())
    with pytest.raises(errors.ConfigError, match="rope"):
        K.ctx_params_hash(rope=float("nan"))


# --- prefix keys ------------------------------------------------------------------------


@settings(max_examples=200)
@given(
    tokens=st.lists(st.integers(0, 2**32 - 1), max_size=80),
    lengths=st.lists(st.integers(-5, 90), max_size=30),
    ns=st.none() | st.binary(min_size=1, max_size=9),
)
def test_prefix_keys_equal_cache_key_longest_first(tokens, lengths, ns):
    meta = K.KeyMeta(FP, 3, CTX, namespace=ns)
    got = K.prefix_keys(meta, tokens, lengths)
    wanted = sorted({n for n in lengths if 1 <= n <= len(tokens)}, reverse=True)
    assert [n for n, _ in got] == wanted
    for n, k in got:
        assert k == K.cache_key(meta, tokens[:n])
        if ns is None:
            assert k == spec_key(FP, 3, CTX, tokens[:n])


def test_prefix_keys_numpy_and_generator_lengths():
    toks = np.arange(100, dtype=np.int64)
    got = K.prefix_keys(META, toks, (n for n in (100, 1, 50, 50, 0, 101)))
    assert [n for n, _ in got] == [100, 50, 1]
    assert got[0][1] == K.cache_key(META, toks)


def test_prefix_hasher_single_keys():
    toks = list(range(10))
    ph = K.PrefixHasher(META, toks)
    assert len(ph) == 10
    assert ph.key(0) == K.cache_key(META, [])
    assert ph.key(10) == K.cache_key(META, toks)
    assert ph.key(4) == K.cache_key(META, toks[:4])
    # The hasher can be asked again; each call is independent.
    assert ph.keys([3, 7]) == ph.keys([7, 3])
    with pytest.raises(errors.InvalidParameter):
        ph.key(11)
    with pytest.raises(errors.InvalidParameter):
        ph.key(-1)


def test_prefix_keys_large():
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 262144, size=32768)
    lengths = rng.choice(np.arange(1, 32769), size=10000, replace=False)
    got = K.prefix_keys(META, toks, lengths.tolist())
    assert len(got) == 10000
    assert [n for n, _ in got] == sorted(lengths.tolist(), reverse=True)
    for n, k in (got[0], got[len(got) // 2], got[-1]):
        assert k == K.cache_key(META, toks[:n])
