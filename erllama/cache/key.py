"""Cache keys: what identifies a saved KV state, down to the token.

A key is 32 bytes, the SHA-256 of a header that names everything that shapes the KV bytes,
followed by the tokens::

    key = SHA-256( fingerprint[32] || quant_byte[1] || ctx_params_hash[32] || u32_le(tokens) )

This is exactly the Erlang original's derivation (SPEC 4.1) when no namespace is given, so a
plain key is the same in both implementations.

A namespace (tenant salt) is folded in *before* the fingerprint, framed so that the hash
input of a namespaced key can never equal the hash input of a plain key::

    SHA-256( NAMESPACE_TAG || u32_le(len(ns)) || ns || zero pad to a multiple of 4
             || fingerprint || quant_byte || ctx_params_hash || u32_le(tokens) )

The length prefix makes the namespace boundary unambiguous, and the 14-byte tag makes every
namespaced input 3 bytes past a multiple of 4 long, while every plain input is 65 + 4k bytes
(1 past a multiple of 4). The two sets of inputs are disjoint, so a collision between a
namespaced and a plain key is a SHA-256 collision.

Longest-prefix lookup at token granularity hashes the header once and the token bytes once,
taking a copy of the running hash state at each candidate length (:func:`prefix_keys`).

Everything here is pure: no I/O, no actors.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from erllama import errors

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = [
    "KEY_SIZE",
    "NAMESPACE_TAG",
    "QUANT_BYTES",
    "UNKNOWN_QUANT",
    "KeyMeta",
    "PrefixHasher",
    "cache_key",
    "ctx_params_hash",
    "decode_tokens",
    "effective_fingerprint",
    "encode_tokens",
    "group_of",
    "key_from_parts",
    "key_hex",
    "prefix_keys",
    "quant_byte",
    "quant_from_ftype_name",
    "quant_name",
]

KEY_SIZE = 32
"""Length in bytes of a key, a fingerprint and a context-parameters hash."""

NAMESPACE_TAG = b"erllama/ns/v1\x00"
"""Domain tag that starts the hash input of every namespaced key (14 bytes; see module doc)."""

UNKNOWN_QUANT = 255
"""Quant byte of any quantization name not in :data:`QUANT_BYTES`."""

QUANT_BYTES: dict[str, int] = {
    "f32": 0,
    "f16": 1,
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 4,
    "q5_1": 5,
    "q8_0": 6,
    "q4_k_m": 7,
    "q4_k_s": 8,
    "q5_k_m": 9,
    "q5_k_s": 10,
    "q6_k": 11,
    "q8_k": 12,
    "q2_k": 13,
    "q3_k_s": 14,
    "q3_k_m": 15,
    "q3_k_l": 16,
    "iq2_xxs": 17,
    "iq2_xs": 18,
    "iq2_s": 19,
    "iq2_m": 20,
    "iq3_xxs": 21,
    "iq3_xs": 22,
    "iq3_s": 23,
    "iq3_m": 24,
    "iq1_s": 25,
    "iq1_m": 26,
    "iq4_nl": 27,
    "iq4_xs": 28,
    "bf16": 29,
}
"""Cache-internal quantization bytes (not GGML type ids), as in the Erlang original."""

_QUANT_NAMES: dict[int, str] = {b: n for n, b in QUANT_BYTES.items()}

_U32_LIMIT = 1 << 32
_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1
_TOKEN_DTYPE = np.dtype("<u4")

_FTYPE_GUESSED_PREFIX = "(guessed) "
# llama.cpp ftype names whose lowercased stem is not already the table name.
_FTYPE_SPECIAL: dict[str, str] = {
    "all f32": "f32",
    "q2_k - medium": "q2_k",
    "iq3_s mix": "iq3_m",
    "mxfp4 moe": "mxfp4_moe",
    "unknown, may not work": "unknown",
}
_FTYPE_SIZE_SUFFIX = {" - small": "_s", " - medium": "_m", " - large": "_l"}


def quant_byte(name: str) -> int:
    """The cache quant byte of a quantization name (case-insensitive); 255 if unknown."""
    return QUANT_BYTES.get(name.lower(), UNKNOWN_QUANT)


def quant_name(byte: int) -> str:
    """The quantization name of a cache quant byte.

    Raises :class:`errors.CacheError` (``unknown_quant``) for 255 or any byte not in the
    table, so a file saved with an unknown quantization cannot be parsed back.
    """
    try:
        return _QUANT_NAMES[byte]
    except (KeyError, TypeError):
        raise errors.CacheError(f"unknown_quant: quant byte {byte!r} is not in the table") from None


def quant_from_ftype_name(ftype_name: str) -> str:
    """Map a llama.cpp ftype name (``llama_model_ftype_name``) to a cache quantization name.

    ``"all F32"`` → ``"f32"``, ``"F16"`` → ``"f16"``, ``"BF16"`` → ``"bf16"``,
    ``"Q8_0"`` → ``"q8_0"``, ``"Q4_K - Medium"`` → ``"q4_k_m"``, ``"Q2_K - Medium"`` →
    ``"q2_k"``, ``"IQ2_XS - 2.3125 bpw"`` → ``"iq2_xs"``, ``"IQ3_S mix - 3.66 bpw"`` →
    ``"iq3_m"``. A leading ``"(guessed) "`` is ignored. Types the table does not list
    (``"Q2_K - Small"`` → ``"q2_k_s"``, ``"TQ1_0 - 1.69 bpw ternary"`` → ``"tq1_0"``,
    ``"MXFP4 MoE"`` → ``"mxfp4_moe"``, …) still get a stable lowercase name, which
    :func:`quant_byte` maps to 255.
    """
    name = ftype_name.strip()
    if name.startswith(_FTYPE_GUESSED_PREFIX):
        name = name[len(_FTYPE_GUESSED_PREFIX) :]
    name = name.lower()
    if name in _FTYPE_SPECIAL:
        return _FTYPE_SPECIAL[name]
    for suffix, short in _FTYPE_SIZE_SUFFIX.items():
        if name.endswith(suffix):
            return name[: -len(suffix)] + short
    stem = name.split(" - ", 1)[0]
    if stem in _FTYPE_SPECIAL:
        return _FTYPE_SPECIAL[stem]
    return stem.replace(" ", "_")


def _as_bytes(field: str, value: object) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise errors.ConfigError(f"{field} must be bytes, got {type(value).__name__} {value!r:.80}")


def _check_digest(field: str, value: object) -> bytes:
    b = _as_bytes(field, value)
    if len(b) != KEY_SIZE:
        raise errors.ConfigError(f"{field} must be {KEY_SIZE} bytes, got {len(b)} bytes")
    return b


@dataclass(frozen=True)
class KeyMeta:
    """Everything but the tokens that goes into a cache key.

    Attributes:
        fingerprint: 32 bytes identifying the model weights (and adapters, see
            :func:`effective_fingerprint`).
        quant: the cache quant byte (:func:`quant_byte`), 0..255.
        ctx_params_hash: 32 bytes identifying the context parameters that shape the KV
            bytes (:func:`ctx_params_hash`).
        namespace: optional tenant salt; keys in different namespaces never match. ``None``
            gives the Erlang original's key. Must not be empty (use ``None``).

    Bytes-like values are stored as ``bytes``. A wrong type or length raises
    :class:`errors.ConfigError` naming the field and the value's length.
    """

    fingerprint: bytes
    quant: int
    ctx_params_hash: bytes
    namespace: bytes | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "fingerprint", _check_digest("fingerprint", self.fingerprint))
        object.__setattr__(
            self, "ctx_params_hash", _check_digest("ctx_params_hash", self.ctx_params_hash)
        )
        q = self.quant
        if isinstance(q, bool) or not isinstance(q, int) or not 0 <= q <= 255:
            raise errors.ConfigError(f"quant must be an int in 0..255, got {q!r}")
        if self.namespace is not None:
            ns = _as_bytes("namespace", self.namespace)
            if not ns:
                raise errors.ConfigError("namespace must not be empty, got 0 bytes (use None)")
            if len(ns) >= _U32_LIMIT:
                raise errors.ConfigError(f"namespace is too long, got {len(ns)} bytes")
            object.__setattr__(self, "namespace", ns)

    def header(self) -> bytes:
        """The hash input that precedes the token bytes (see the module docstring)."""
        plain = self.fingerprint + bytes((self.quant,)) + self.ctx_params_hash
        ns = self.namespace
        if ns is None:
            return plain
        pad = b"\x00" * (-len(ns) % 4)
        return NAMESPACE_TAG + len(ns).to_bytes(4, "little") + ns + pad + plain


def group_of(meta: KeyMeta) -> bytes:
    """The id of the rows that can be prefixes of each other (same fingerprint, quant,
    context shape and namespace)."""
    return hashlib.sha256(meta.header()).digest()


def _token_error(arr: npt.NDArray[Any]) -> errors.InvalidToken:
    bad = np.flatnonzero((arr < 0) | (arr >= _U32_LIMIT))
    i = int(bad[0])
    return errors.InvalidToken(f"token id {int(arr[i])} at position {i} does not fit in u32")


def _as_u32(tokens: Sequence[int] | npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.uint32]:
    if isinstance(tokens, np.ndarray) and tokens.dtype == _TOKEN_DTYPE and tokens.ndim == 1:
        return np.ascontiguousarray(tokens)
    if isinstance(tokens, (str, bytes, bytearray, memoryview)):
        raise errors.InvalidToken(f"tokens must be a sequence of ints, got {type(tokens).__name__}")
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise errors.InvalidToken(f"tokens must be a flat sequence of ints, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=_TOKEN_DTYPE)
    if arr.dtype.kind in "iu":
        if int(arr.min()) < 0 or int(arr.max()) >= _U32_LIMIT:
            raise _token_error(arr)
        return np.ascontiguousarray(arr, dtype=_TOKEN_DTYPE)
    # Ints beyond int64, mixed signs beyond int64 (numpy picks float64) and non-ints land
    # here; check them one by one as Python objects, before any cast.
    items = arr.tolist() if isinstance(tokens, np.ndarray) else list(tokens)
    for i, t in enumerate(items):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise errors.InvalidToken(f"token {t!r} at position {i} is not an int")
        if not 0 <= int(t) < _U32_LIMIT:
            raise errors.InvalidToken(f"token id {t!r} at position {i} does not fit in u32")
    return np.array([int(t) for t in items], dtype=_TOKEN_DTYPE)


def encode_tokens(tokens: Sequence[int] | npt.NDArray[np.integer[Any]]) -> bytes:
    """Tokens as u32 little-endian bytes, 4 per token.

    Accepts any sequence of ints or a 1-d numpy integer array. An id outside
    ``[0, 2**32)`` or a non-int raises :class:`errors.InvalidToken`.
    """
    return _as_u32(tokens).tobytes()


def decode_tokens(data: bytes | bytearray | memoryview) -> list[int]:
    """The inverse of :func:`encode_tokens`; raises :class:`errors.CacheError` if the
    length is not a multiple of 4."""
    if len(data) % 4:
        raise errors.CacheError(f"token bytes length {len(data)} is not a multiple of 4")
    return np.frombuffer(data, dtype=_TOKEN_DTYPE).tolist()


def cache_key(meta: KeyMeta, tokens: Sequence[int] | npt.NDArray[np.integer[Any]]) -> bytes:
    """The 32-byte key of ``tokens`` under ``meta`` (SPEC 4.1, plus the optional namespace)."""
    h = hashlib.sha256(meta.header())
    h.update(_as_u32(tokens).data)
    return h.digest()


def key_hex(key: bytes) -> str:
    """A key as 64 lowercase hex digits; raises :class:`errors.CacheError` if it is not
    32 bytes."""
    if len(key) != KEY_SIZE:
        raise errors.CacheError(f"a key is {KEY_SIZE} bytes, got {len(key)} bytes")
    return bytes(key).hex()


def _round_half_away(x: float) -> int:
    # Erlang's round/1 (half away from zero), not Python's banker's rounding, so the
    # effective fingerprint matches the original's for scales on an exact half.
    a = abs(x)
    f = math.floor(a)
    r = f + 1 if a - f >= 0.5 else f
    return -r if x < 0 else r


def effective_fingerprint(base_fp: bytes, adapters: Iterable[tuple[bytes, float]]) -> bytes:
    """The fingerprint of a model with LoRA adapters attached (SPEC 4.2).

    ``adapters`` holds ``(adapter_sha256, scale)`` pairs. With none, ``base_fp`` is
    returned unchanged. Otherwise the pairs are sorted by (sha, scale), pairs whose sha is
    not 32 bytes are dropped, and the result is
    ``SHA-256(base_fp || for each pair: sha || int64_le(round(scale * 2**32)))``, with
    round half away from zero. The result does not depend on the order of ``adapters``.

    Raises :class:`errors.ConfigError` if ``base_fp`` is not 32 bytes, or a scale is not a
    finite number or does not fit the int64 encoding.
    """
    base = _check_digest("fingerprint", base_fp)
    any_adapter = False
    pairs: list[tuple[bytes, float]] = []
    for sha, scale in adapters:
        any_adapter = True
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise errors.ConfigError(f"adapter scale must be a number, got {scale!r}")
        s = float(scale)
        if not math.isfinite(s):
            raise errors.ConfigError(f"adapter scale must be finite, got {scale!r}")
        if isinstance(sha, (bytes, bytearray, memoryview)) and len(sha) == KEY_SIZE:
            pairs.append((bytes(sha), s))
    if not any_adapter:
        return base
    pairs.sort()
    h = hashlib.sha256(base)
    for sha, s in pairs:
        fixed = _round_half_away(s * 4294967296.0)
        if not _I64_MIN <= fixed <= _I64_MAX:
            raise errors.ConfigError(f"adapter scale {s!r} does not fit the int64 encoding")
        h.update(sha)
        h.update(fixed.to_bytes(8, "little", signed=True))
    return h.digest()


def ctx_params_hash(**params: Any) -> bytes:
    """SHA-256 of the context parameters that shape the KV bytes, as canonical JSON.

    Pass every parameter that changes what a saved sequence state means or whether a
    context accepts it, e.g. ``type_k``, ``type_v``, ``flash_attn``, ``swa_full``,
    ``n_seq_max`` and ``kv_unified``. Callers MUST include ``n_seq_max`` and
    ``kv_unified``: a llama.cpp per-sequence state blob records the KV stream layout, and a
    context with a different ``n_seq_max`` rejects it ("n_stream mismatch"). Parameters
    that do not shape the KV (threads, sampling) should be left out, or they split the cache
    for nothing.

    The encoding is ``json.dumps(params, sort_keys=True, separators=(",", ":"))``, so
    keyword order does not matter but types do (``1`` and ``True`` and ``"1"`` differ).
    Values must be JSON scalars, lists or dicts of them; anything else (or NaN/inf) raises
    :class:`errors.ConfigError` naming the parameter.
    """
    for name, value in params.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise errors.ConfigError(
                f"context parameter {name} is not JSON-encodable: {value!r:.80}"
            ) from None
    text = json.dumps(params, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).digest()


class PrefixHasher:
    """Keys of prefixes of one token list, hashing the header once and the tokens once.

    Built once per lookup; :meth:`keys` feeds the token bytes in order and copies the
    running SHA-256 state at each requested length, so the keys of any number of prefixes
    cost one pass over the tokens plus one copy-and-finish per prefix.
    """

    __slots__ = ("_base", "_data", "_n")

    def __init__(self, meta: KeyMeta, tokens: Sequence[int] | npt.NDArray[np.integer[Any]]):
        """Encode ``tokens`` (see :func:`encode_tokens`) and hash ``meta``'s header."""
        arr = _as_u32(tokens)
        self._n = int(arr.size)
        self._data = memoryview(arr.tobytes())
        self._base = hashlib.sha256(meta.header())

    def __len__(self) -> int:
        """The number of tokens."""
        return self._n

    def key(self, n: int) -> bytes:
        """The key of the first ``n`` tokens (``0 <= n <= len(self)``)."""
        n = operator.index(n)
        if not 0 <= n <= self._n:
            raise errors.InvalidParameter(f"prefix length {n} is outside 0..{self._n}")
        h = self._base.copy()
        h.update(self._data[: 4 * n])
        return h.digest()

    def keys(self, lengths: Iterable[int]) -> list[tuple[int, bytes]]:
        """``(n, key of the first n tokens)`` for each distinct requested ``n`` in
        ``1..len(self)``, longest first; other lengths are ignored."""
        wanted = sorted({n for n in map(operator.index, lengths) if 1 <= n <= self._n})
        out: list[tuple[int, bytes]] = []
        h = self._base.copy()
        data = self._data
        fed = 0
        for n in wanted:
            h.update(data[4 * fed : 4 * n])
            fed = n
            out.append((n, h.copy().digest()))
        out.reverse()
        return out


def prefix_keys(
    meta: KeyMeta,
    tokens: Sequence[int] | npt.NDArray[np.integer[Any]],
    lengths: Iterable[int],
) -> list[tuple[int, bytes]]:
    """``(n, cache_key(meta, tokens[:n]))`` for each distinct ``n`` in ``lengths`` within
    ``1..len(tokens)``, longest first, computed in one pass over the token bytes."""
    return PrefixHasher(meta, tokens).keys(lengths)


def key_from_parts(fingerprint: bytes, quant: int, ctx_params_hash: bytes, namespace: bytes | None,
                   tokens_u32le: bytes) -> bytes:
    """The key of a row read back from a file (the ``key_fn`` of :mod:`erllama.cache.kvc`)."""
    h = hashlib.sha256(KeyMeta(fingerprint, quant, ctx_params_hash, namespace).header())
    h.update(tokens_u32le)
    return h.digest()
