"""The on-disk row format (``.kvc``), version 2: a KV state with its last-token logits.

A row file is a fixed 72-byte header, a prompt section, a TLV section and the payload, all
little-endian. Version 2 extends the Erlang original's version 1 (SPEC 4.4) without moving
any field: the payload is the last-token logits (``n_logits`` float32) immediately followed
by the opaque llama sequence-state blob, and three TLVs are new (namespace, logits
descriptor, header CRC), plus a padding TLV that puts the payload at a 64-byte file offset::

    off  size  field
    0    3     magic "KVC"
    3    1     version = 2 (1 is still read; anything else: "unsupported_version")
    4    1     quant byte (same value as TLV 0x03)
    5    1     save_reason: 0 unknown, 1 cold, 2 continued, 3 evict, 4 shutdown, 5 finish
    6    2     reserved 0
    8    4     cached_token_count (number of tokens)
    12   4     hit_count (rewritten in place by write_hit_count; outside the header CRC)
    16   4     context_size
    20   4     reserved 0
    24   8     creation_time (unix s)
    32   8     last_used_time (unix s; = creation_time, never updated)
    40   8     payload_byte_count
    48   8     payload_offset          -- 24-byte trailer
    56   8     payload_length (= payload_byte_count = 4 * n_logits + len(kv))
    64   4     payload_crc32c (over logits then kv)
    68   4     reserved 0
    72   4+n   prompt section: u32 n + bytes
    76+n 4+m   TLV section: u32 m + records (tag u8, len u32, value)
    po   ...   payload to EOF: logits (4 * n_logits bytes, float32 LE), then kv

TLVs, in the order written: 0x01 fingerprint (32), 0x02 fingerprint_mode (1), 0x03 quant (1),
0x04 ctx_params_hash (32), 0x0A namespace (any length; only when the key has one), 0x08 token
count (u32), 0x09 token ids (u32 LE each), 0x05 hostname, 0x06 erllama version,
0x07 save_reason_detail (each utf-8, only when set), 0x0B logits descriptor (u32 n_logits,
u32 crc32c of the logits bytes; only when logits are stored), 0x0D padding (zero bytes), and
last 0x0C header CRC (u32).

The header CRC is the CRC32C of the whole prefix, bytes ``[0, payload_offset)``, with bytes
12..15 (the hit count) and the 4 value bytes of the 0x0C record (the prefix's last 4 bytes)
read as zeros. Any change to the prefix other than the hit count is therefore detected, and
the hit count can be rewritten in place without touching the CRC. The payload CRC and the
file size check cover the rest of the file.

Version 1 files (no logits, no header CRC) parse with ``n_logits`` None and the whole
payload as ``kv``. Tags are read the same way in both versions, so a version-2 file whose
version byte is flipped to 1 still fails its header CRC.

Writing is zero-copy: :func:`build_prefix` returns only the prefix, and the caller writes
prefix, logits and kv as separate buffers. Reading reuses a caller-owned buffer
(:func:`read_row`), and a :class:`Row` exposes the logits and kv as memoryviews into it.

This module is the format only and does no I/O; reading and writing row files
(:func:`read_into`, :func:`read_row`, :func:`read_header`, :func:`write_hit_count`) live in
:mod:`erllama.cache.kvcfile` and are re-exported here.
"""

from __future__ import annotations

import operator
import socket
import struct
import sys
import time
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from erllama import errors
from erllama._version import __version__
from erllama.checksum import crc32c

__all__ = [
    "HEADER_SIZE",
    "HIT_COUNT_OFFSET",
    "MAGIC",
    "PAYLOAD_ALIGN",
    "REASONS",
    "VERSION",
    "CorruptRow",
    "FingerprintMode",
    "KeyFn",
    "Parsed",
    "PayloadCrc",
    "Row",
    "RowMeta",
    "SUPPORTED_VERSIONS",
    "SaveReason",
    "Tag",
    "build_prefix",
    "check_payload",
    "decode_tokens",
    "encode_tokens",
    "ensure_capacity",
    "parse",
    "parse_header",
    "payload_crc32c",
]

MAGIC = b"KVC"
VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
HEADER_SIZE = 72
HIT_COUNT_OFFSET = 12
PAYLOAD_ALIGN = 64
"""Payload offsets written by :func:`build_prefix` are multiples of this (readers do not
require it): float32 logits land aligned in a page-aligned read buffer."""

Buffer = bytes | bytearray | memoryview
KeyFn = Callable[[bytes, int, bytes, bytes | None, bytes], bytes]
"""``key_fn(fingerprint, quant, ctx_params_hash, namespace, tokens_u32le) -> key``."""

_HEADER = struct.Struct("<3sBBBHIIIIQQQQQII")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_PAYLOAD_OFFSET_AT = 48
_TLV_HEAD = struct.Struct("<BI")
_LOGITS_DESC = struct.Struct("<II")
_ZERO4 = bytes(4)
_U32_MAX = 0xFFFFFFFF
_U64_MAX = 0xFFFFFFFFFFFFFFFF
_CRC_RECORD_SIZE = _TLV_HEAD.size + 4
_GROW_STEP = 1 << 20
_BIG_ENDIAN = sys.byteorder == "big"

assert _HEADER.size == HEADER_SIZE
assert array("I").itemsize == 4


class Tag(IntEnum):
    """TLV tags of the row format."""

    FINGERPRINT = 0x01
    FINGERPRINT_MODE = 0x02
    QUANT = 0x03
    CTX_PARAMS_HASH = 0x04
    HOSTNAME = 0x05
    VERSION = 0x06
    SAVE_REASON_DETAIL = 0x07
    TOKEN_COUNT = 0x08
    TOKENS = 0x09
    NAMESPACE = 0x0A
    LOGITS = 0x0B
    HEADER_CRC = 0x0C
    PADDING = 0x0D


_FIXED_SIZES: dict[int, int] = {
    Tag.FINGERPRINT: 32,
    Tag.FINGERPRINT_MODE: 1,
    Tag.QUANT: 1,
    Tag.CTX_PARAMS_HASH: 32,
    Tag.TOKEN_COUNT: 4,
    Tag.LOGITS: _LOGITS_DESC.size,
    Tag.HEADER_CRC: 4,
}
_KNOWN_TAGS = frozenset(int(t) for t in Tag if t is not Tag.PADDING)
_REQUIRED_V1 = (Tag.FINGERPRINT, Tag.FINGERPRINT_MODE, Tag.QUANT, Tag.CTX_PARAMS_HASH, Tag.TOKENS)
_REQUIRED_V2 = (*_REQUIRED_V1, Tag.HEADER_CRC)


class SaveReason(IntEnum):
    """Why a row was saved (header byte 5)."""

    UNKNOWN = 0
    COLD = 1
    CONTINUED = 2
    EVICT = 3
    SHUTDOWN = 4
    FINISH = 5


class FingerprintMode(IntEnum):
    """How the model fingerprint was computed (TLV 0x02); other byte values are kept as ints."""

    SAFE = 0
    GGUF_CHUNKED = 1
    FAST_UNSAFE = 2


REASONS = frozenset({
    "bad_magic", "unsupported_version", "truncated", "trailing_bytes", "bad_trailer",
    "bad_section", "bad_tlv", "missing_tlv", "bad_header", "header_crc_mismatch",
    "crc_mismatch", "key_mismatch", "not_private",
})
"""Every :attr:`CorruptRow.reason`."""


class CorruptRow(errors.CacheError):
    """A row file (or buffer) failed validation. ``reason`` is one of :data:`REASONS`:

    - ``bad_magic``: not a KVC file; ``unsupported_version``: version byte not 1 or 2;
    - ``truncated``: the file (or the buffer given) is shorter than its header says;
      ``trailing_bytes``: the file is longer than ``payload_offset + payload_length``;
    - ``bad_trailer``: ``payload_length != payload_byte_count`` or an impossible
      ``payload_offset``; ``bad_section``: the prompt and TLV sections do not end exactly
      at ``payload_offset``;
    - ``bad_tlv``: TLV framing, a wrong-size or duplicate known TLV, a header CRC TLV that
      is not last, a value inconsistent with another; ``missing_tlv``: a required TLV is
      absent; ``bad_header``: a header field out of range or inconsistent;
    - ``header_crc_mismatch``: the prefix changed since it was written; ``crc_mismatch``:
      the logits or kv changed; ``key_mismatch``: the TLVs hash to another key;
    - ``not_private``: the file is a symbolic link, not a regular file, or another user's
      (:func:`erllama.private.open_private`); its bytes were not read.

    ``expected``/``actual`` carry the two sides of a mismatch (CRCs, keys, sizes) when
    there is one; ``path`` names the file when the row was read from one.
    """

    def __init__(self, reason: str, message: str, *, expected: object = None,
                 actual: object = None, path: str | None = None) -> None:
        super().__init__(f"{message} ({reason})" if path is None else f"{path}: {message} ({reason})")
        self.reason = reason
        self.message = message
        self.expected = expected
        self.actual = actual
        self.path = path

    def with_path(self, path: str) -> CorruptRow:
        """A copy of this error naming ``path``."""
        return CorruptRow(self.reason, self.message, expected=self.expected, actual=self.actual,
                          path=path)


def _byte_view(data: object, what: str) -> memoryview:
    try:
        view = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        raise errors.InvalidParameter(
            f"{what} must be a bytes-like object, got {type(data).__name__}") from None
    if not view.c_contiguous:
        raise errors.InvalidParameter(f"{what} must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _as_bytes(value: object, what: str, size: int | None = None) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise errors.InvalidParameter(f"{what} must be bytes, got {type(value).__name__}")
    b = bytes(_byte_view(value, what))
    if size is not None and len(b) != size:
        raise errors.InvalidParameter(f"{what} must be {size} bytes, got {len(b)}")
    return b


def _as_uint(value: object, what: str, maximum: int) -> int:
    try:
        v = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise errors.InvalidParameter(f"{what} must be an integer, got {value!r}") from None
    if not 0 <= v <= maximum:
        raise errors.InvalidParameter(f"{what} must be in 0..{maximum}, got {v}")
    return v


def _as_text(value: object, what: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise errors.InvalidParameter(f"{what} must be a str or None, got {type(value).__name__}")


def encode_tokens(tokens: Iterable[int] | Buffer) -> bytes:
    """Token ids as u32 little-endian bytes; bytes-like input is taken as already encoded."""
    if isinstance(tokens, (bytes, bytearray, memoryview)):
        b = bytes(_byte_view(tokens, "tokens"))
        if len(b) % 4:
            raise errors.InvalidParameter(f"tokens bytes must be a multiple of 4 long, got {len(b)}")
        return b
    try:
        arr = array("I", tokens)
    except (OverflowError, TypeError) as exc:
        raise errors.InvalidParameter(f"token ids must be integers in 0..{_U32_MAX}: {exc}") from None
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr.tobytes()


def decode_tokens(data: Buffer) -> tuple[int, ...]:
    """Token ids from u32 little-endian bytes."""
    arr = array("I")
    arr.frombytes(data)
    if _BIG_ENDIAN:
        arr.byteswap()
    return tuple(arr)


@dataclass(frozen=True, kw_only=True, slots=True)
class RowMeta:
    """What a row says about itself, apart from its payload.

    The key fields are ``fingerprint``, ``quant``, ``ctx_params_hash``, ``namespace`` and
    ``tokens``; the rest is bookkeeping. ``tokens`` may be given as token ids or as u32
    little-endian bytes and is stored as bytes (see :attr:`token_ids`). ``hostname`` and
    ``version`` default to this host and this erllama; ``None`` leaves them out of the file.
    Values are validated on construction (:class:`erllama.errors.InvalidParameter`).
    """

    fingerprint: bytes
    quant: int
    ctx_params_hash: bytes
    tokens: bytes
    namespace: bytes | None = None
    save_reason: SaveReason = SaveReason.UNKNOWN
    context_size: int = 0
    fingerprint_mode: int = FingerprintMode.SAFE
    creation_time: int = field(default_factory=lambda: int(time.time()))
    hostname: str | None = field(default_factory=socket.gethostname)
    version: str | None = __version__
    detail: str | None = None
    hit_count: int = 0
    prompt: bytes = b""

    def __post_init__(self) -> None:
        s = object.__setattr__
        s(self, "fingerprint", _as_bytes(self.fingerprint, "fingerprint", 32))
        s(self, "quant", _as_uint(self.quant, "quant", 0xFF))
        s(self, "ctx_params_hash", _as_bytes(self.ctx_params_hash, "ctx_params_hash", 32))
        s(self, "tokens", encode_tokens(self.tokens))
        if len(self.tokens) // 4 > _U32_MAX:
            raise errors.InvalidParameter(f"too many tokens: {len(self.tokens) // 4}")
        if self.namespace is not None:
            s(self, "namespace", _as_bytes(self.namespace, "namespace"))
        try:
            s(self, "save_reason", SaveReason(_as_uint(self.save_reason, "save_reason", 0xFF)))
        except ValueError:
            raise errors.InvalidParameter(f"save_reason must be one of {[int(r) for r in SaveReason]}, "
                                          f"got {self.save_reason!r}") from None
        s(self, "context_size", _as_uint(self.context_size, "context_size", _U32_MAX))
        s(self, "fingerprint_mode", _as_uint(self.fingerprint_mode, "fingerprint_mode", 0xFF))
        s(self, "creation_time", _as_uint(self.creation_time, "creation_time", _U64_MAX))
        s(self, "hostname", _as_text(self.hostname, "hostname"))
        s(self, "version", _as_text(self.version, "version"))
        s(self, "detail", _as_text(self.detail, "detail"))
        s(self, "hit_count", _as_uint(self.hit_count, "hit_count", _U32_MAX))
        s(self, "prompt", _as_bytes(self.prompt, "prompt"))

    @property
    def n_tokens(self) -> int:
        """Number of tokens the row holds the KV state of."""
        return len(self.tokens) // 4

    @property
    def token_ids(self) -> tuple[int, ...]:
        """The tokens as ids."""
        return decode_tokens(self.tokens)

    def key(self, key_fn: KeyFn) -> bytes:
        """The cache key of this row, computed by ``key_fn`` from the key fields."""
        return key_fn(self.fingerprint, self.quant, self.ctx_params_hash, self.namespace, self.tokens)


@dataclass(frozen=True, slots=True)
class Parsed:
    """The result of a meta-only parse: the row's metadata and where its payload lies.

    Holds no reference to the parsed buffer.
    """

    meta: RowMeta
    version: int
    cached_token_count: int
    last_used_time: int
    payload_offset: int
    payload_length: int
    payload_crc: int
    n_logits: int | None
    """float32 logits stored before the kv blob; ``None`` when the row has none."""
    logits_crc: int | None
    header: bytes
    """The first 48 bytes of the file (what the index keeps for a row)."""

    @property
    def logits_length(self) -> int:
        """Bytes of logits at the start of the payload."""
        return 0 if self.n_logits is None else 4 * self.n_logits

    @property
    def kv_offset(self) -> int:
        """File offset of the kv blob."""
        return self.payload_offset + self.logits_length

    @property
    def kv_length(self) -> int:
        """Bytes of the kv blob."""
        return self.payload_length - self.logits_length

    @property
    def file_size(self) -> int:
        """Size of the complete file."""
        return self.payload_offset + self.payload_length


@dataclass(frozen=True, slots=True, eq=False)
class Row:
    """A validated row: its metadata and zero-copy views of its payload.

    ``logits`` (format ``"f"``, or ``None``) and ``kv`` (format ``"B"``) point into the
    buffer that was parsed; they are only meaningful until that buffer is reused. Release
    them (:meth:`release`, or use the row as a context manager) before reading a larger file
    into the same buffer, which must then grow.

    ``check`` is set on a row whose payload CRC was still being computed when it was handed
    out (``FileTier.load(late=True)``): its header, size and key are verified, its payload
    not yet. Use the payload only after :meth:`verified` returned ``True``.
    """

    parsed: Parsed
    logits: memoryview[float] | None
    kv: memoryview
    check: Callable[[], bool] | None = field(default=None, repr=False)
    tier: str | None = None
    """The cache tier that served the row (set by ``CacheStore.restore``)."""

    @property
    def meta(self) -> RowMeta:
        """The row's metadata."""
        return self.parsed.meta

    def verified(self) -> bool:
        """Whether the payload matches its CRCs (waits for a check still running; ``True``
        at once for a row verified before it was handed out)."""
        return True if self.check is None else self.check()

    def release(self) -> None:
        """Release the payload views, so the underlying buffer can be resized."""
        if self.logits is not None:
            self.logits.release()
        self.kv.release()

    def __enter__(self) -> Row:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _logits_bytes(logits: object) -> memoryview | None:
    if logits is None:
        return None
    try:
        view = memoryview(logits)  # type: ignore[arg-type]
    except TypeError:
        raise errors.InvalidParameter(
            f"logits must be a float32 buffer, got {type(logits).__name__}") from None
    if view.format.lstrip("@=<") not in ("f", "B", "b", "c"):
        raise errors.InvalidParameter(
            f"logits must be float32 (or raw bytes), got buffer format {view.format!r}")
    if not view.c_contiguous:
        raise errors.InvalidParameter("logits must be C-contiguous")
    b = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    if len(b) % 4:
        raise errors.InvalidParameter(f"logits must be a whole number of float32, got {len(b)} bytes")
    return b


def payload_crc32c(logits: Buffer | None, kv: Buffer) -> int:
    """CRC32C of the payload (logits bytes, then kv) without concatenating them."""
    lv = _logits_bytes(logits)
    return crc32c(kv, 0 if lv is None else crc32c(lv))


def _tlv(out: bytearray, tag: Tag, value: Buffer) -> None:
    out += _TLV_HEAD.pack(tag, len(value))
    out += value


def _header_crc(buf: memoryview, end: int) -> int:
    """CRC32C of ``buf[:end]`` with the hit count and the last 4 bytes (the CRC value) zeroed."""
    crc = crc32c(buf[:HIT_COUNT_OFFSET])
    crc = crc32c(_ZERO4, crc)
    crc = crc32c(buf[HIT_COUNT_OFFSET + 4:end - 4], crc)
    return crc32c(_ZERO4, crc)


def build_prefix(meta: RowMeta, kv_len: int, logits: Buffer | None, payload_crc: int,
                 *, logits_crc: int | None = None) -> bytes:
    """The header, prompt and TLV sections of a version-2 row.

    Write the returned prefix, then the logits bytes (when given), then the ``kv_len``
    bytes of kv: that is the whole file. ``logits`` is a float32 buffer (e.g. a
    ``memoryview`` of the context's logits) or ``None``; ``payload_crc`` is
    :func:`payload_crc32c` of the same logits and kv. ``logits_crc`` (``crc32c`` of the
    logits bytes) is computed when not given.
    """
    kv_len = _as_uint(kv_len, "kv_len", _U64_MAX)
    payload_crc = _as_uint(payload_crc, "payload_crc", _U32_MAX)
    lv = _logits_bytes(logits)
    logits_len = 0 if lv is None else len(lv)
    payload_length = logits_len + kv_len
    n_tokens = meta.n_tokens

    tlvs = bytearray()
    _tlv(tlvs, Tag.FINGERPRINT, meta.fingerprint)
    _tlv(tlvs, Tag.FINGERPRINT_MODE, bytes((meta.fingerprint_mode,)))
    _tlv(tlvs, Tag.QUANT, bytes((meta.quant,)))
    _tlv(tlvs, Tag.CTX_PARAMS_HASH, meta.ctx_params_hash)
    if meta.namespace is not None:
        _tlv(tlvs, Tag.NAMESPACE, meta.namespace)
    _tlv(tlvs, Tag.TOKEN_COUNT, _U32.pack(n_tokens))
    _tlv(tlvs, Tag.TOKENS, meta.tokens)
    for tag, text in ((Tag.HOSTNAME, meta.hostname), (Tag.VERSION, meta.version),
                      (Tag.SAVE_REASON_DETAIL, meta.detail)):
        if text is not None:
            _tlv(tlvs, tag, text.encode("utf-8", "surrogateescape"))
    if lv is not None:
        lcrc = crc32c(lv) if logits_crc is None else _as_uint(logits_crc, "logits_crc", _U32_MAX)
        _tlv(tlvs, Tag.LOGITS, _LOGITS_DESC.pack(len(lv) // 4, lcrc))
    unpadded = HEADER_SIZE + 4 + len(meta.prompt) + 4 + len(tlvs) + _TLV_HEAD.size + _CRC_RECORD_SIZE
    _tlv(tlvs, Tag.PADDING, bytes(-unpadded % PAYLOAD_ALIGN))
    tlvs += _TLV_HEAD.pack(Tag.HEADER_CRC, 4)
    tlvs += _ZERO4

    payload_offset = HEADER_SIZE + 4 + len(meta.prompt) + 4 + len(tlvs)
    buf = bytearray(payload_offset)
    _HEADER.pack_into(
        buf, 0, MAGIC, VERSION, meta.quant, meta.save_reason, 0, n_tokens, meta.hit_count,
        meta.context_size, 0, meta.creation_time, meta.creation_time, payload_length,
        payload_offset, payload_length, payload_crc, 0)
    pos = HEADER_SIZE
    _U32.pack_into(buf, pos, len(meta.prompt))
    buf[pos + 4:pos + 4 + len(meta.prompt)] = meta.prompt
    pos += 4 + len(meta.prompt)
    _U32.pack_into(buf, pos, len(tlvs))
    buf[pos + 4:payload_offset] = tlvs
    with memoryview(buf) as view:
        crc = _header_crc(view, payload_offset)
    _U32.pack_into(buf, payload_offset - 4, crc)
    return bytes(buf)


def _parse_prefix(mv: memoryview, file_size: int | None) -> Parsed:
    (_, version, _, reason, _, cached_count, hit_count, context_size, _,
     creation_time, last_used_time, _, po, plen, pcrc, _) = _check_header(mv, file_size)
    tlv_len_at, tlv_start = _check_sections(mv, po)
    if version >= 2:
        _check_header_crc(mv, tlv_start, po)
    values = _read_tlvs(mv, tlv_start, po, version)
    tokens = _check_tokens(values, version, cached_count)

    n_logits = logits_crc = None
    if Tag.LOGITS in values:
        n_logits, logits_crc = _LOGITS_DESC.unpack(values[Tag.LOGITS])
        if 4 * n_logits > plen:
            raise CorruptRow("bad_tlv", f"{n_logits} logits do not fit in a {plen}-byte payload")
    if reason not in SaveReason._value2member_map_:
        raise CorruptRow("bad_header", f"unknown save_reason {reason}", actual=reason)

    def text(tag: Tag) -> str | None:
        v = values.get(tag)
        return None if v is None else v.decode("utf-8", "surrogateescape")

    meta = RowMeta(
        fingerprint=values[Tag.FINGERPRINT],
        quant=values[Tag.QUANT][0],
        ctx_params_hash=values[Tag.CTX_PARAMS_HASH],
        tokens=tokens,
        namespace=values.get(Tag.NAMESPACE),
        save_reason=SaveReason(reason),
        context_size=context_size,
        fingerprint_mode=values[Tag.FINGERPRINT_MODE][0],
        creation_time=creation_time,
        hostname=text(Tag.HOSTNAME),
        version=text(Tag.VERSION),
        detail=text(Tag.SAVE_REASON_DETAIL),
        hit_count=hit_count,
        prompt=bytes(mv[HEADER_SIZE + 4:tlv_len_at]),
    )
    return Parsed(meta=meta, version=version, cached_token_count=cached_count,
                  last_used_time=last_used_time, payload_offset=po, payload_length=plen,
                  payload_crc=pcrc, n_logits=n_logits, logits_crc=logits_crc,
                  header=bytes(mv[:48]))


def _check_header(mv: memoryview, file_size: int | None) -> tuple[Any, ...]:
    """The fixed header's fields, once its magic, version, trailer and sizes are checked."""
    n = len(mv)
    if bytes(mv[:3]) != MAGIC[:n]:
        raise CorruptRow("bad_magic", "not a KVC row")
    if n < HEADER_SIZE:
        raise CorruptRow("truncated", f"{n} bytes, shorter than the {HEADER_SIZE}-byte header",
                         expected=HEADER_SIZE, actual=n)
    fields = _HEADER.unpack_from(mv, 0)
    version, byte_count, po, plen = fields[1], fields[11], fields[12], fields[13]
    if version not in SUPPORTED_VERSIONS:
        raise CorruptRow("unsupported_version", f"version byte {version}", actual=version)
    if plen != byte_count:
        raise CorruptRow("bad_trailer", f"payload_length {plen} != payload_byte_count {byte_count}",
                         expected=byte_count, actual=plen)
    if po < HEADER_SIZE + 8:
        raise CorruptRow("bad_trailer", f"payload_offset {po} inside the header", actual=po)
    if file_size is not None:
        end = po + plen
        if file_size < end:
            raise CorruptRow("truncated", f"file is {file_size} bytes, header says {end}",
                             expected=end, actual=file_size)
        if file_size > end:
            raise CorruptRow("trailing_bytes", f"file is {file_size} bytes, header says {end}",
                             expected=end, actual=file_size)
    if n < po:
        raise CorruptRow("truncated", f"{n} bytes given, the prefix is {po}", expected=po, actual=n)
    return fields


def _check_sections(mv: memoryview, po: int) -> tuple[int, int]:
    """``(tlv_len_at, tlv_start)`` once the prompt and TLV sections end exactly at ``po``."""
    prompt_len = _U32.unpack_from(mv, HEADER_SIZE)[0]
    tlv_len_at = HEADER_SIZE + 4 + prompt_len
    if tlv_len_at + 4 > po:
        raise CorruptRow("bad_section",
                         f"prompt section ({prompt_len} bytes) runs past payload_offset {po}")
    tlv_start = tlv_len_at + 4
    tlv_end = tlv_start + _U32.unpack_from(mv, tlv_len_at)[0]
    if tlv_end != po:
        raise CorruptRow("bad_section", f"TLV section ends at {tlv_end}, payload_offset is {po}",
                         expected=po, actual=tlv_end)
    return tlv_len_at, tlv_start


def _read_tlvs(mv: memoryview, tlv_start: int, po: int, version: int) -> dict[int, bytes]:
    """The known TLVs by tag, checking framing, sizes, duplicates, the required tags and
    that the header CRC record is last (and, for version 1, the CRC itself)."""
    values: dict[int, bytes] = {}
    crc_value_at = None
    pos = tlv_start
    while pos < po:
        if pos + _TLV_HEAD.size > po:
            raise CorruptRow("bad_tlv", f"TLV header at {pos} runs past the section end {po}")
        tag, length = _TLV_HEAD.unpack_from(mv, pos)
        start = pos + _TLV_HEAD.size
        if start + length > po:
            raise CorruptRow("bad_tlv", f"TLV 0x{tag:02x} at {pos} ({length} bytes) "
                                        f"runs past the section end {po}")
        pos = start + length
        if tag not in _KNOWN_TAGS:
            continue
        if tag in values:
            raise CorruptRow("bad_tlv", f"duplicate TLV 0x{tag:02x}")
        size = _FIXED_SIZES.get(tag)
        if size is not None and length != size:
            raise CorruptRow("bad_tlv", f"TLV 0x{tag:02x} is {length} bytes, expected {size}",
                             expected=size, actual=length)
        if tag == Tag.HEADER_CRC:
            crc_value_at = start
        values[tag] = bytes(mv[start:pos])

    for required in _REQUIRED_V2 if version >= 2 else _REQUIRED_V1:
        if required not in values:
            raise CorruptRow("missing_tlv",
                             f"required TLV 0x{required:02x} ({required.name.lower()}) is absent",
                             expected=int(required))
    if crc_value_at is not None:
        if crc_value_at != po - 4:
            raise CorruptRow("bad_tlv", "the header CRC TLV is not the last record")
        if version < 2:
            _check_header_crc(mv, tlv_start, po)
    return values


def _check_tokens(values: dict[int, bytes], version: int, cached_count: int) -> bytes:
    """The token ids TLV, checked against the header's count and the token count TLV."""
    tokens = values[Tag.TOKENS]
    if len(tokens) % 4:
        raise CorruptRow("bad_tlv", f"token ids TLV is {len(tokens)} bytes, not a multiple of 4")
    n_tokens = len(tokens) // 4
    if version >= 2:
        if cached_count != n_tokens:
            raise CorruptRow("bad_header", f"cached_token_count {cached_count} != {n_tokens} token ids",
                             expected=n_tokens, actual=cached_count)
        count = values.get(Tag.TOKEN_COUNT)
        if count is not None and (stated := _U32.unpack(count)[0]) != n_tokens:
            raise CorruptRow("bad_tlv", f"token count TLV {stated} != {n_tokens} token ids",
                             expected=n_tokens, actual=stated)
    return tokens


def _check_header_crc(mv: memoryview, tlv_start: int, po: int) -> None:
    at = po - _CRC_RECORD_SIZE
    if at < tlv_start or _TLV_HEAD.unpack_from(mv, at) != (Tag.HEADER_CRC, 4):
        raise CorruptRow("missing_tlv", "the header CRC TLV is not the last record",
                         expected=int(Tag.HEADER_CRC))
    stored = _U32.unpack_from(mv, po - 4)[0]
    actual = _header_crc(mv, po)
    if stored != actual:
        raise CorruptRow("header_crc_mismatch", f"header CRC 0x{actual:08x} != stored 0x{stored:08x}",
                         expected=stored, actual=actual)


def _open_view(data: object) -> memoryview:
    try:
        mv = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        raise errors.InvalidParameter(
            f"data must be a bytes-like object, got {type(data).__name__}") from None
    if mv.format == "B" and mv.ndim == 1:
        return mv
    with mv:
        if not mv.c_contiguous:
            raise errors.InvalidParameter("data must be C-contiguous")
        return mv.cast("B")


def parse_header(data: Buffer, *, file_size: int | None = None) -> Parsed:
    """Meta-only parse of a row, from the whole file or any prefix of it that holds the
    header, prompt and TLV sections (``payload_offset`` bytes).

    Checks the header shape, version, trailer, section framing, TLV framing and sizes,
    required TLVs, the header CRC (version 2) and ``payload_length ==
    payload_byte_count``; with ``file_size``, also that the file is exactly
    ``payload_offset + payload_length`` bytes ("truncated" / "trailing_bytes"). The payload
    is not read. Raises :class:`CorruptRow`.
    """
    mv = _open_view(data)
    try:
        return _parse_prefix(mv, file_size)
    finally:
        mv.release()


def parse(data: Buffer, *, expected_key: bytes | None = None, key_fn: KeyFn | None = None,
          verify_payload: bool = True, crcs: PayloadCrc | None = None) -> Row:
    """Full parse of a whole row file held in ``data``: everything :func:`parse_header`
    checks, with ``len(data)`` as the file size, plus the logits and payload CRCs and, when
    ``expected_key`` is given, that ``key_fn`` recomputes it from the row's TLVs.

    ``verify_payload=False`` skips only the two payload CRCs (the header, its CRC, the size
    and the key are still checked): for bytes the caller already verified and knows are
    unchanged (``FileTier``'s trusted rows). ``crcs``: the payload CRCs already computed
    over these bytes while they were read (:class:`PayloadCrc`); used when they cover
    exactly this row's payload, else the CRCs are computed here. The returned
    :class:`Row` views ``data`` without copying. Raises :class:`CorruptRow`.
    """
    if expected_key is not None:
        if key_fn is None:
            raise errors.InvalidParameter("expected_key needs a key_fn to recompute the key")
        expected_key = bytes(expected_key)
    mv = _open_view(data)
    try:
        parsed = _parse_prefix(mv, len(mv))
        if expected_key is not None and key_fn is not None:
            actual_key = parsed.meta.key(key_fn)
            if actual_key != expected_key:
                raise CorruptRow("key_mismatch",
                                 f"row hashes to {actual_key.hex()}, expected {expected_key.hex()}",
                                 expected=expected_key, actual=actual_key)
        po, ko, end = parsed.payload_offset, parsed.kv_offset, parsed.file_size
        if not verify_payload:
            logits = None if parsed.n_logits is None else mv[po:ko].cast("f")
            return Row(parsed, logits, mv[ko:end])
        with mv[po:ko] as lv, mv[ko:end] as kv:  # released even when a mismatch raises
            _check_crcs(parsed, lv, kv, crcs)
        logits = None if parsed.n_logits is None else mv[po:ko].cast("f")
        return Row(parsed, logits, mv[ko:end])
    finally:
        mv.release()


def _check_crcs(parsed: Parsed, logits: memoryview[Any], kv: memoryview, crcs: PayloadCrc | None) -> None:
    po, ko, end = parsed.payload_offset, parsed.kv_offset, parsed.file_size
    done = crcs.covering(po, ko, end) if crcs is not None else None
    crc = 0
    if parsed.n_logits is not None:
        crc = crc32c(logits) if done is None else done[0]
        if crc != parsed.logits_crc:
            raise CorruptRow("crc_mismatch",
                             f"logits CRC 0x{crc:08x} != stored 0x{parsed.logits_crc:08x}",
                             expected=parsed.logits_crc, actual=crc)
    crc = crc32c(kv, crc) if done is None else done[1]
    if crc != parsed.payload_crc:
        raise CorruptRow("crc_mismatch",
                         f"payload CRC 0x{crc:08x} != stored 0x{parsed.payload_crc:08x}",
                         expected=parsed.payload_crc, actual=crc)


def check_payload(row: Row, crcs: PayloadCrc | None = None) -> None:
    """Check a row parsed with ``verify_payload=False`` against its stored CRCs, using
    ``crcs`` computed while it was read when they cover it. Raises :class:`CorruptRow`."""
    empty = memoryview(b"")
    _check_crcs(row.parsed, empty if row.logits is None else row.logits, row.kv, crcs)


def _grow(buffer: bytearray, size: int) -> None:
    target = -(-size // _GROW_STEP) * _GROW_STEP
    try:
        buffer.extend(bytes(target - len(buffer)))
    except BufferError:
        raise BufferError("the read buffer is still viewed by an earlier Row and cannot grow: "
                          "release that row (row.release()) before reading a larger file") from None


def ensure_capacity(buffer: bytearray, size: int) -> None:
    """Grow ``buffer`` (in 1 MiB steps) to hold at least ``size`` bytes."""
    if len(buffer) < size:
        _grow(buffer, size)


class PayloadCrc:
    """The payload CRCs of a row computed while its file is read into ``buffer``: call
    :meth:`feed` as bytes arrive (from another thread than the reader's, so the CRC runs
    alongside the read), then hand it to :func:`parse` (``crcs=``), which still checks
    everything else and compares these CRCs with the stored ones.

    The prefix is parsed only to learn where the logits and kv lie; a bad prefix raises
    :class:`CorruptRow` from :meth:`feed` (:func:`parse` then reports it properly).
    """

    def __init__(self, buffer: bytearray) -> None:
        self._buf = buffer
        self._span: tuple[int, int, int] | None = None
        self._pos = 0
        self._crc = 0
        self._logits_crc = 0

    def feed(self, got: int) -> None:
        """Bytes ``[0, got)`` of the buffer hold the start of the file."""
        with memoryview(self._buf) as mv:
            if self._span is None:
                if got < HEADER_SIZE:
                    return
                po = _U64.unpack_from(mv, _PAYLOAD_OFFSET_AT)[0]
                if not HEADER_SIZE < po <= got:
                    if po > got and po <= len(mv):
                        return  # the prefix is not all here yet
                    raise CorruptRow("bad_trailer", f"payload_offset {po}")
                with mv[:po] as prefix:
                    parsed = _parse_prefix(prefix, None)
                self._span = (po, parsed.kv_offset, parsed.file_size)
                self._pos = po
            _, ko, end = self._span
            stop = min(got, end)
            if self._pos < ko:
                cut = min(stop, ko)
                self._crc = crc32c(mv[self._pos:cut], self._crc)
                self._pos = cut
                if cut == ko:
                    self._logits_crc = self._crc  # the payload CRC goes on from it
            if ko <= self._pos < stop:
                self._crc = crc32c(mv[self._pos:stop], self._crc)
                self._pos = stop

    def covering(self, po: int, ko: int, end: int) -> tuple[int, int] | None:
        """``(logits CRC, payload CRC)`` when exactly bytes ``[po, end)`` with the kv at
        ``ko`` were covered, else ``None``."""
        if self._span != (po, ko, end) or self._pos != end:
            return None
        return (self._logits_crc if ko > po else 0), self._crc


_FILE_IO = frozenset({"read_header", "read_into", "read_row", "write_hit_count"})


def __getattr__(name: str) -> Any:
    # the file functions are re-exported lazily: kvcfile imports this module
    if name in _FILE_IO:
        from erllama.cache import kvcfile

        return getattr(kvcfile, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
