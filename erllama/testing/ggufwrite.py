"""A minimal GGUF writer with full control over every field, and numpy quantizers for the
common ggml block types.

It needs only numpy (never the ``gguf`` package), so a plain install can write a model: the
runtime self-check uses it through :func:`erllama.testing.tinymodel.write_known_good_model`,
and :mod:`erllama.testing.malformed` builds its broken files with it.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "KV", "TensorSpec", "Spec", "spec_bytes", "write_spec", "quantize", "ggml_nbytes",
    "GGML_TYPE_NAMES", "GGML_TYPES",
]

# GGUF value types (gguf.GGUFValueType)
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_SCALAR_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f",
               BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}
# ggml types (enum ggml_type)
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q8_0, GGML_Q4_K, GGML_Q6_K = 0, 1, 2, 8, 12, 14
GGML_TYPE_NAMES = {GGML_F32: "F32", GGML_F16: "F16", GGML_Q4_0: "Q4_0", GGML_Q8_0: "Q8_0",
                   GGML_Q4_K: "Q4_K", GGML_Q6_K: "Q6_K"}
GGML_TYPES = {name: t for t, name in GGML_TYPE_NAMES.items()}
# type -> (elements per block, bytes per block), as in ggml-common.h
_BLOCK = {GGML_F32: (1, 4), GGML_F16: (1, 2), GGML_Q4_0: (32, 2 + 16), GGML_Q8_0: (32, 2 + 32),
          GGML_Q4_K: (256, 2 + 2 + 12 + 128), GGML_Q6_K: (256, 128 + 64 + 16 + 2)}
_ALIGN = 32


@dataclass
class KV:
    key: str
    vtype: int
    value: Any
    sub: int | None = None      # element type of an ARRAY


@dataclass
class TensorSpec:
    name: str
    ne: tuple[int, ...]          # ggml order: ne[0] is the row length
    data: bytes
    ggml_type: int = GGML_F32
    offset: int | None = None    # None: the correct aligned offset


@dataclass
class Spec:
    """An editable GGUF: header fields, ordered KV pairs and tensors."""

    kvs: list[KV] = field(default_factory=list)
    tensors: list[TensorSpec] = field(default_factory=list)
    magic: bytes = b"GGUF"
    version: int = 3
    n_tensors: int | None = None   # None: len(tensors)
    n_kv: int | None = None        # None: len(kvs)

    def get(self, key: str) -> KV | None:
        return next((kv for kv in self.kvs if kv.key == key), None)

    def set(self, key: str, value: Any, vtype: int | None = None, sub: int | None = None) -> Spec:
        kv = self.get(key)
        if kv is None:
            if vtype is None:
                raise KeyError(f"{key} is new: give its vtype")
            self.kvs.append(KV(key, vtype, value, sub))
        else:
            kv.value = value
            if vtype is not None:
                kv.vtype, kv.sub = vtype, sub
        return self

    def drop(self, key: str) -> Spec:
        n = len(self.kvs)
        self.kvs = [kv for kv in self.kvs if kv.key != key]
        if len(self.kvs) == n:
            raise KeyError(key)
        return self

    def tensor(self, name: str) -> TensorSpec:
        return next(t for t in self.tensors if t.name == name)

    def drop_tensor(self, name: str) -> Spec:
        self.tensors.remove(self.tensor(name))
        return self

    def put_tensor(self, name: str, array: np.ndarray, ggml_type: int = GGML_F32) -> Spec:
        """Replace or add a tensor (numpy shape, i.e. reversed ggml ``ne``), stored as
        ``ggml_type`` (f32 by default)."""
        t = _tensor(name, array, ggml_type)
        for i, old in enumerate(self.tensors):
            if old.name == name:
                self.tensors[i] = t
                return self
        self.tensors.append(t)
        return self


def _tensor(name: str, array: np.ndarray, ggml_type: int = GGML_F32) -> TensorSpec:
    a = np.ascontiguousarray(array, dtype=np.float32)
    data = a.tobytes() if ggml_type == GGML_F32 else quantize(a, ggml_type)
    return TensorSpec(name, tuple(reversed(a.shape)), data, ggml_type)


def _str(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _value(vtype: int, value: Any, sub: int | None) -> bytes:
    if vtype == STR:
        return _str(value)
    if vtype == ARR:
        if sub is None:
            raise ValueError("an array value needs its element type")
        out = struct.pack("<IQ", sub, len(value))
        return out + b"".join(_value(sub, v, None) for v in value)
    return struct.pack(_SCALAR_FMT[vtype], value)


def _pad(n: int) -> int:
    return (-n) % _ALIGN


def spec_bytes(spec: Spec) -> bytes:
    """Serialise ``spec`` (GGUF v3 layout, 32-byte alignment)."""
    out = bytearray(spec.magic)
    out += struct.pack("<IQQ", spec.version,
                       len(spec.tensors) if spec.n_tensors is None else spec.n_tensors,
                       len(spec.kvs) if spec.n_kv is None else spec.n_kv)
    for kv in spec.kvs:
        out += _str(kv.key) + struct.pack("<I", kv.vtype) + _value(kv.vtype, kv.value, kv.sub)
    offset = 0
    for t in spec.tensors:
        out += _str(t.name) + struct.pack("<I", len(t.ne)) + b"".join(struct.pack("<Q", d & (2**64 - 1)) for d in t.ne)
        out += struct.pack("<IQ", t.ggml_type, offset if t.offset is None else t.offset)
        offset += len(t.data) + _pad(len(t.data))
    if spec.tensors:
        out += b"\0" * _pad(len(out))
        for t in spec.tensors:
            out += t.data + b"\0" * _pad(len(t.data))
    return bytes(out)


def write_spec(path: str | os.PathLike, spec: Spec) -> Path:
    """Write ``spec_bytes(spec)`` to ``path`` and return it as a :class:`~pathlib.Path`."""
    path = Path(path)
    path.write_bytes(spec_bytes(spec))
    return path


# ---- quantization (simple round-to-nearest, in the exact ggml block layouts) ------------------

def ggml_nbytes(ne: tuple[int, ...], ggml_type: int) -> int:
    """Bytes of a tensor of shape ``ne`` (ggml order) stored as ``ggml_type``."""
    per, size = _BLOCK[ggml_type]
    if ne and ne[0] % per:
        raise ValueError(f"row length {ne[0]} is not a multiple of {per} ({GGML_TYPE_NAMES[ggml_type]})")
    return int(np.prod(ne, dtype=np.int64)) // per * size


def quantize(array: np.ndarray, ggml_type: int) -> bytes:
    """``array`` (last axis = ggml row, a multiple of the type's block size) as ggml
    ``ggml_type`` bytes. Deterministic; not ggml's error-minimising search, only its layout."""
    a = np.ascontiguousarray(array, dtype=np.float32)
    if ggml_type == GGML_F32:
        return a.tobytes()
    if ggml_type == GGML_F16:
        return a.astype("<f2").tobytes()
    per, _ = _BLOCK[ggml_type]
    if a.ndim == 0 or a.shape[-1] % per:
        raise ValueError(f"row length {a.shape[-1] if a.ndim else 0} is not a multiple of {per}")
    x = a.reshape(-1, per)
    return {GGML_Q4_0: _q4_0, GGML_Q8_0: _q8_0, GGML_Q4_K: _q4_k, GGML_Q6_K: _q6_k}[ggml_type](x)


def _f16(v: np.ndarray) -> np.ndarray:
    return v.astype("<f2").reshape(-1, 1).view(np.uint8)


def _inv(d: np.ndarray) -> np.ndarray:
    return np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)


def _q8_0(x: np.ndarray) -> bytes:
    # block_q8_0: f16 d, int8 qs[32]; y = d * q
    d = (np.abs(x).max(axis=1) / 127).astype(np.float16).astype(np.float32)
    q = np.clip(np.rint(x * _inv(d)[:, None]), -127, 127).astype(np.int8)
    return np.hstack([_f16(d), q.view(np.uint8)]).tobytes()


def _q4_0(x: np.ndarray) -> bytes:
    # block_q4_0: f16 d, uint8 qs[16]; y[j] = d*((qs[j] & 15) - 8), y[j+16] = d*((qs[j] >> 4) - 8)
    idx = np.abs(x).argmax(axis=1)
    d = (x[np.arange(len(x)), idx] / -8).astype(np.float16).astype(np.float32)
    q = np.clip(np.rint(x * _inv(d)[:, None]) + 8, 0, 15).astype(np.uint8)
    qs = q[:, :16] | (q[:, 16:] << 4)
    return np.hstack([_f16(d), qs]).tobytes()


def _q4_k(x: np.ndarray) -> bytes:
    # block_q4_K: f16 d, f16 dmin, uint8 scales[12], uint8 qs[128]; 8 sub-blocks of 32 with
    # 6-bit scale sc and min m: y = d*sc*q - dmin*m, q in 0..15 (see get_scale_min_k4)
    n = len(x)
    sub = x.reshape(n, 8, 32)
    lo = np.minimum(sub.min(axis=2), 0)
    scale = (sub.max(axis=2) - lo) / 15
    mins = -lo
    d = (scale.max(axis=1) / 63).astype(np.float16).astype(np.float32)
    dmin = (mins.max(axis=1) / 63).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(scale * _inv(d)[:, None]), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(mins * _inv(dmin)[:, None]), 0, 63).astype(np.uint8)
    step = d[:, None] * sc
    q = np.clip(np.rint((sub + (dmin[:, None] * m)[:, :, None]) * _inv(step)[:, :, None]), 0, 15).astype(np.uint8)
    scales = np.empty((n, 12), np.uint8)
    scales[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
    # each 64-element chunk c: 32 bytes, low nibble = sub-block 2c, high nibble = 2c+1
    q = q.reshape(n, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    return np.hstack([_f16(d), _f16(dmin), scales, qs]).tobytes()


def _q6_k(x: np.ndarray) -> bytes:
    # block_q6_K: uint8 ql[128], uint8 qh[64], int8 scales[16], f16 d; 16 sub-blocks of 16:
    # y = d * scales[i/16] * (q - 32), q in 0..63, low 4 bits in ql, high 2 in qh
    n = len(x)
    sub = x.reshape(n, 16, 16)
    s = np.abs(sub).max(axis=2) / 31
    d = (s.max(axis=1) / 127).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(s * _inv(d)[:, None]), -128, 127).astype(np.int8)
    step = d[:, None] * sc
    q = (np.clip(np.rint(sub * _inv(step)[:, :, None]), -32, 31) + 32).astype(np.uint8)
    # each 128-element half: quarters q1..q4 at offsets 0, 32, 64, 96
    q = q.reshape(n, 2, 4, 32)
    q1, q2, q3, q4 = q[:, :, 0], q[:, :, 1], q[:, :, 2], q[:, :, 3]
    ql = np.concatenate([(q1 & 15) | ((q3 & 15) << 4), (q2 & 15) | ((q4 & 15) << 4)], axis=2).reshape(n, 128)
    qh = ((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)).reshape(n, 64)
    return np.hstack([ql, qh, sc.view(np.uint8), _f16(d)]).tobytes()
