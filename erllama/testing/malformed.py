"""Malformed GGUF files for robustness tests of the loader, built from the tiny model.

Every writer takes a path, writes one broken file (or a FIFO / directory) there and returns
the path as a :class:`~pathlib.Path`; its docstring says what is wrong. Three tables index
them for parametrised tests:

``ALL_CASES``
    name -> writer of a *model* file that ``Model.load`` must reject cleanly (raising
    ``MalformedGGUF`` or ``LoadFailed``). Each was proven in a child process not to abort.
``ADAPTER_CASES``
    name -> writer of a *LoRA* file that ``Adapter.load`` on the tiny model must reject cleanly.
``ABORT_CASES``
    name -> ``(writer, stage, observed)``: files that make llama.cpp ``abort()`` or crash the
    whole process. ``stage`` is where the process dies: ``"load"`` (``Model.load``),
    ``"context"`` (``Context.create(model, n_ctx=256)``), ``"tokenize"``
    (``model.tokenize("hello world", add_special=True)``), ``"decode"`` (first
    ``ctx.step``), ``"adapter_load"`` or ``"adapter_decode"`` (the writer writes a LoRA for
    the valid tiny model; the process dies loading it or at the first decode after
    ``ctx.set_adapters``). ``observed`` is the exit status seen when probing (``"SIGABRT"``,
    ``"SIGFPE"``, ``"SIGSEGV"``, ...); ``ABORT_LOG[name]`` is the last line llama.cpp printed.
    **Never load these in the test process**; use a child process (see :func:`probe`).

Byte-level corruptions start from :func:`erllama.testing.tinymodel.write_tiny_model`
output; structural variants are written by :func:`write_spec` from a :class:`Spec` that
:func:`llama_spec` builds with the tiny model's keys, vocabulary and tensor shapes (fresh
random weights; with the defaults the result loads and decodes like the tiny model).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

# the minimal writer lives in ggufwrite (no gguf package, no cases built at import)
from erllama.testing.ggufwrite import (  # noqa: F401  (historical names of this module)
    _ALIGN,
    _SCALAR_FMT,
    ARR,
    BOOL,
    F32,
    F64,
    GGML_F16,
    GGML_F32,
    GGML_Q4_0,
    I8,
    I16,
    I32,
    I64,
    KV,
    STR,
    U8,
    U16,
    U32,
    U64,
    Spec,
    TensorSpec,
    _pad,
    _str,
    _tensor,
    _value,
    spec_bytes,
    write_spec,
)
from erllama.testing.tinymodel import N_EMBD, N_FF, N_HEAD, N_HEAD_KV, N_LAYER, tiny_vocab, write_tiny_model

__all__ = [
    "KV", "TensorSpec", "Spec", "llama_spec", "lora_spec", "spec_bytes", "write_spec", "tiny_layout",
    "ALL_CASES", "ADAPTER_CASES", "ABORT_CASES", "ABORT_LOG", "EXPECTED", "ADAPTER_EXPECTED", "probe",
]

HUGE = 2 ** 62


def _put(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.write_bytes(data)
    return path


# ---- the tiny model as a Spec ----------------------------------------------------------------

def _weights(rng: np.random.Generator, *shape: int, scale: float = 0.5) -> np.ndarray:
    return (rng.standard_normal(shape) * scale / np.sqrt(max(shape[-1], 1))).astype(np.float32)


def llama_spec(*, n_embd: int = N_EMBD, n_head: int = N_HEAD, n_head_kv: int = N_HEAD_KV,
               n_ff: int = N_FF, n_layer: int = N_LAYER, n_rot: int | None = None,
               head_dim: int | None = None, n_ctx_train: int = 256, arch: str = "llama",
               tokens: list[str] | None = None, seed: int = 0) -> Spec:
    """The tiny llama model as a :class:`Spec`, with optionally changed hyperparameters.

    Tensor shapes follow the given hyperparameters (so the loader's shape checks pass even
    for nonsensical values): q/o use ``n_head * head_dim``, k/v ``n_head_kv * head_dim``
    (``head_dim`` defaults to ``n_embd // n_head``, or 0 when ``n_head`` is 0).
    """
    if head_dim is None:
        head_dim = n_embd // n_head if n_head else 0
    if n_rot is None:
        n_rot = head_dim
    vtokens, scores, types = tiny_vocab()
    if tokens is not None:
        vtokens, scores, types = tokens, [0.0] * len(tokens), [1] * len(tokens)
    n_vocab = len(vtokens)
    rng = np.random.default_rng(seed)
    a = arch
    kvs = [
        KV("general.architecture", STR, arch),
        KV("general.name", STR, "erllama-tiny-malformed"),
        KV(f"{a}.context_length", U32, n_ctx_train),
        KV(f"{a}.embedding_length", U32, n_embd),
        KV(f"{a}.block_count", U32, n_layer),
        KV(f"{a}.feed_forward_length", U32, n_ff),
        KV(f"{a}.attention.head_count", U32, n_head),
        KV(f"{a}.attention.head_count_kv", U32, n_head_kv),
        KV(f"{a}.attention.layer_norm_rms_epsilon", F32, 1e-5),
        KV(f"{a}.rope.dimension_count", U32, n_rot),
        KV("general.file_type", U32, 0),
        KV("tokenizer.ggml.model", STR, "llama"),
        KV("tokenizer.ggml.tokens", ARR, vtokens, STR),
        KV("tokenizer.ggml.scores", ARR, scores, F32),
        KV("tokenizer.ggml.token_type", ARR, types, I32),
        KV("tokenizer.ggml.bos_token_id", U32, 1),
        KV("tokenizer.ggml.eos_token_id", U32, 2),
        KV("tokenizer.ggml.unknown_token_id", U32, 0),
        KV("tokenizer.ggml.add_bos_token", BOOL, True),
        KV("tokenizer.ggml.add_eos_token", BOOL, False),
    ]
    q, kv = n_head * head_dim, n_head_kv * head_dim
    ts = [
        _tensor("token_embd.weight", _weights(rng, n_vocab, n_embd)),
        _tensor("output_norm.weight", np.ones(n_embd, np.float32)),
        _tensor("output.weight", _weights(rng, n_vocab, n_embd)),
    ]
    for i in range(n_layer):
        ts += [
            _tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, np.float32)),
            _tensor(f"blk.{i}.attn_q.weight", _weights(rng, q, n_embd)),
            _tensor(f"blk.{i}.attn_k.weight", _weights(rng, kv, n_embd)),
            _tensor(f"blk.{i}.attn_v.weight", _weights(rng, kv, n_embd)),
            _tensor(f"blk.{i}.attn_output.weight", _weights(rng, n_embd, q)),
            _tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, np.float32)),
            _tensor(f"blk.{i}.ffn_gate.weight", _weights(rng, n_ff, n_embd)),
            _tensor(f"blk.{i}.ffn_up.weight", _weights(rng, n_ff, n_embd)),
            _tensor(f"blk.{i}.ffn_down.weight", _weights(rng, n_embd, n_ff)),
        ]
    return Spec(kvs=kvs, tensors=ts)


def lora_spec(*, rank: int = 4, alpha: float = 8.0, arch: str = "llama", seed: int = 1) -> Spec:
    """A LoRA adapter for the tiny model (attn_q and attn_v of every layer) as a :class:`Spec`."""
    rng = np.random.default_rng(seed)
    kvs = [KV("general.architecture", STR, arch), KV("general.type", STR, "adapter"),
           KV("adapter.type", STR, "lora"), KV("adapter.lora.alpha", F32, float(alpha))]
    ts = []
    for i in range(N_LAYER):
        for name, n_out in (("attn_q", N_EMBD), ("attn_v", N_HEAD_KV * (N_EMBD // N_HEAD))):
            ts.append(_tensor(f"blk.{i}.{name}.weight.lora_a", _weights(rng, rank, N_EMBD)))
            ts.append(_tensor(f"blk.{i}.{name}.weight.lora_b", _weights(rng, n_out, rank)))
    return Spec(kvs=kvs, tensors=ts)


# ---- byte layout of the valid tiny model -----------------------------------------------------

@dataclass(frozen=True)
class Layout:
    data: bytes
    kv: dict              # key -> (start, value_offset)
    tensor: dict          # name -> (start, n_dims_offset, type_offset, offset_offset)
    kv_start: int
    tensor_info_start: int
    data_offset: int


@lru_cache(maxsize=4)
def tiny_layout(seed: int = 0) -> Layout:
    """Bytes of :func:`write_tiny_model` and the offsets of its fields (read with ``gguf``)."""
    import gguf

    with tempfile.TemporaryDirectory() as d:
        p = write_tiny_model(Path(d) / "tiny.gguf", seed=seed)
        data = p.read_bytes()
        r = gguf.GGUFReader(str(p))
        kv = {}
        for name, f in r.fields.items():
            if name.startswith("GGUF."):
                continue
            kv[name] = (f.offset, f.offset + 8 + len(name.encode()) + 4)
        tensor = {}
        for t in r.tensors:
            start = t.field.offset
            nd = start + 8 + len(t.name.encode())
            n_dims = struct.unpack_from("<I", data, nd)[0]
            type_off = nd + 4 + 8 * n_dims
            tensor[t.name] = (start, nd, type_off, type_off + 4)
        data_offset = r.data_offset
        del r
    kv_start = 24
    return Layout(data, kv, tensor, kv_start, min(v[0] for v in tensor.values()), data_offset)


def _patched(seed: int, at: int, fmt: str, value: Any) -> bytes:
    b = bytearray(tiny_layout(seed).data)
    struct.pack_into(fmt, b, at, value)
    return bytes(b)


# ---- model cases that fail cleanly -----------------------------------------------------------

def empty(path):
    """A zero-byte file."""
    return _put(path, b"")


def text_file(path):
    """A short text file, not a GGUF at all."""
    return _put(path, b"this is not a model\n" * 8)


def bad_magic(path):
    """The tiny model with magic ``GGUX`` instead of ``GGUF``."""
    return _put(path, b"GGUX" + tiny_layout().data[4:])


def magic_only(path):
    """Only the 4 magic bytes."""
    return _put(path, b"GGUF")


def _version(v):
    def writer(path):
        return _put(path, _patched(0, 4, "<I", v))
    writer.__doc__ = f"The tiny model with GGUF version {v} (supported: 2 and 3)."
    writer.__name__ = f"version_{v}"
    return writer


version_0 = _version(0)
version_1 = _version(1)
version_4 = _version(4)
version_999 = _version(999)
version_big_endian = _version(0x03000000)
version_big_endian.__doc__ = "The tiny model with version 3 stored big-endian (0x03000000)."


def _truncate(where: str):
    def writer(path):
        lay = tiny_layout()
        toks_start, toks_val = lay.kv["tokenizer.ggml.tokens"]
        emb = lay.tensor["token_embd.weight"]
        last = lay.tensor["blk.1.ffn_down.weight"]
        cut = {
            "header": 12,                                  # inside n_tensors
            "header_end": 24,                              # header complete, no KV pairs
            "kv_key": lay.kv_start + 8 + 5,                # inside the first key's bytes
            "kv_array": toks_val + 12 + 500,               # inside the token list
            "tensor_info": emb[1] + 6,                     # inside token_embd's dims
            "tensor_info_end": last[3] + 4,                # inside the last tensor offset
            "before_data": lay.data_offset,                # all metadata, no tensor data
            "tensor_data": lay.data_offset + (len(lay.data) - lay.data_offset) // 2,
            "last_byte": len(lay.data) - 1,
        }[where]
        return _put(path, lay.data[:cut])
    writer.__doc__ = f"The tiny model truncated at {where.replace('_', ' ')}."
    writer.__name__ = f"truncated_{where}"
    return writer


truncated_header = _truncate("header")
truncated_header_end = _truncate("header_end")
truncated_kv_key = _truncate("kv_key")
truncated_kv_array = _truncate("kv_array")
truncated_tensor_info = _truncate("tensor_info")
truncated_tensor_info_end = _truncate("tensor_info_end")
truncated_before_data = _truncate("before_data")
truncated_tensor_data = _truncate("tensor_data")
truncated_last_byte = _truncate("last_byte")


def tensor_offset_past_eof(path):
    """The last tensor's data offset points 1 TiB past the end of the file."""
    return _put(path, _patched(0, tiny_layout().tensor["blk.1.ffn_down.weight"][3], "<Q", 2 ** 40))


def tensor_offset_misaligned(path):
    """The last tensor's data offset is moved by 4 bytes (not where the data is, not aligned)."""
    lay = tiny_layout()
    at = lay.tensor["blk.1.ffn_down.weight"][3]
    old = struct.unpack_from("<Q", lay.data, at)[0]
    return _put(path, _patched(0, at, "<Q", old + 4))


def tensor_data_past_eof(path):
    """The last tensor claims twice its rows, so its data runs past the end of the file."""
    lay = tiny_layout()
    nd = lay.tensor["blk.1.ffn_down.weight"][1]
    return _put(path, _patched(0, nd + 4 + 8, "<Q", 2 * N_EMBD))   # ne[1] 64 -> 128


def n_tensors_huge(path):
    """The header claims 2**62 tensors."""
    return _put(path, _patched(0, 8, "<Q", HUGE))


def n_kv_huge(path):
    """The header claims 2**62 key-value pairs."""
    return _put(path, _patched(0, 16, "<Q", HUGE))


def n_kv_plus_one(path):
    """The header claims one KV pair more than the file has (the first tensor info is read as a KV)."""
    n = len(tiny_layout().kv)
    return _put(path, _patched(0, 16, "<Q", n + 1))


def n_tensors_plus_one(path):
    """The header claims one tensor more than the file has (tensor data is read as tensor info)."""
    n = len(tiny_layout().tensor)
    return _put(path, _patched(0, 8, "<Q", n + 1))


def kv_string_len_huge(path):
    """The value of ``general.name`` claims a length of 2**62 bytes."""
    return _put(path, _patched(0, tiny_layout().kv["general.name"][1], "<Q", HUGE))


def kv_string_len_past_eof(path):
    """The value of ``general.name`` claims a length of 1 MiB, more than the file holds."""
    return _put(path, _patched(0, tiny_layout().kv["general.name"][1], "<Q", 1 << 20))


def kv_key_len_huge(path):
    """The first key claims a length of 2**62 bytes."""
    return _put(path, _patched(0, tiny_layout().kv_start, "<Q", HUGE))


def kv_array_len_huge(path):
    """``tokenizer.ggml.tokens`` claims 2**62 elements."""
    return _put(path, _patched(0, tiny_layout().kv["tokenizer.ggml.tokens"][1] + 4, "<Q", HUGE))


def kv_invalid_type(path):
    """``general.name`` has value type 99 (no such GGUF type)."""
    return _put(path, _patched(0, tiny_layout().kv["general.name"][1] - 4, "<I", 99))


def tensor_n_dims_huge(path):
    """``token_embd.weight`` claims 1000 dimensions (GGML_MAX_DIMS is 4)."""
    return _put(path, _patched(0, tiny_layout().tensor["token_embd.weight"][1], "<I", 1000))


def tensor_invalid_type(path):
    """``token_embd.weight`` has ggml type 200 (no such type)."""
    return _put(path, _patched(0, tiny_layout().tensor["token_embd.weight"][2], "<I", 200))


def tensor_removed_type(path):
    """``token_embd.weight`` has ggml type 4 (the removed Q4_2: block size 0)."""
    return _put(path, _patched(0, tiny_layout().tensor["token_embd.weight"][2], "<I", 4))


def tensor_dim_negative(path):
    """``token_embd.weight`` has a dimension of 2**63 (negative as int64)."""
    nd = tiny_layout().tensor["token_embd.weight"][1]
    return _put(path, _patched(0, nd + 4 + 8, "<Q", 2 ** 63))


def tensor_dims_overflow(path):
    """``token_embd.weight`` has dims whose product overflows int64 (2**40 x 2**40)."""
    nd = tiny_layout().tensor["token_embd.weight"][1]
    b = bytearray(tiny_layout().data)
    struct.pack_into("<QQ", b, nd + 4, 2 ** 40, 2 ** 40)
    return _put(path, bytes(b))


def _spec_case(doc: str, edit: Callable[[Spec], Any], **hp):
    def writer(path):
        spec = llama_spec(**hp)
        edit(spec)
        return write_spec(path, spec)
    writer.__doc__ = doc
    return writer


spec_control = _spec_case("Control, NOT malformed: the tiny model re-written by write_spec.", lambda s: None)
missing_block_count = _spec_case("No ``llama.block_count`` key.", lambda s: s.drop("llama.block_count"))
missing_embedding_length = _spec_case("No ``llama.embedding_length`` key.",
                                      lambda s: s.drop("llama.embedding_length"))
missing_context_length = _spec_case("No ``llama.context_length`` key.", lambda s: s.drop("llama.context_length"))
missing_architecture = _spec_case("No ``general.architecture`` key.", lambda s: s.drop("general.architecture"))
missing_token_list = _spec_case("No ``tokenizer.ggml.tokens`` (nor scores, types).",
                                lambda s: [s.drop(k) for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                                                               "tokenizer.ggml.token_type")])
unknown_architecture = _spec_case("``general.architecture`` is ``notanarch`` (keys prefixed to match).",
                                  lambda s: None, arch="notanarch")
unknown_tokenizer = _spec_case("``tokenizer.ggml.model`` is ``bogus``.",
                               lambda s: s.set("tokenizer.ggml.model", "bogus"))
wrong_key_type = _spec_case("``llama.block_count`` is a string.",
                            lambda s: s.set("llama.block_count", "two", STR))
wrong_tensor_shape = _spec_case("``blk.0.attn_q.weight`` is 64x32 instead of 64x64.",
                                lambda s: s.put_tensor("blk.0.attn_q.weight", np.zeros((32, N_EMBD), np.float32)))
wrong_embd_shape = _spec_case("``token_embd.weight`` rows are 32 wide while n_embd is 64.",
                              lambda s: s.put_tensor("token_embd.weight", np.zeros((306, 32), np.float32)))
missing_tensor = _spec_case("No ``blk.1.ffn_down.weight`` tensor.", lambda s: s.drop_tensor("blk.1.ffn_down.weight"))
extra_tensor = _spec_case("An extra unused tensor ``blk.0.bogus.weight``.",
                          lambda s: s.put_tensor("blk.0.bogus.weight", np.zeros(4, np.float32)))
duplicate_tensor = _spec_case("``output_norm.weight`` appears twice.",
                              lambda s: s.tensors.append(s.tensor("output_norm.weight")))
duplicate_key = _spec_case("``llama.block_count`` appears twice.",
                           lambda s: s.kvs.append(KV("llama.block_count", U32, 2)))
tensor_name_too_long = _spec_case("A tensor name of 100 characters (GGML_MAX_NAME is 64).",
                                  lambda s: s.put_tensor("x" * 100, np.zeros(4, np.float32)))
rope_dims_mismatch = _spec_case("``llama.rope.dimension_count`` is 8 while the head dim is 16.",
                                lambda s: s.set("llama.rope.dimension_count", 8))
token_types_short = _spec_case("``tokenizer.ggml.token_type`` has 10 entries for 306 tokens.",
                               lambda s: s.set("tokenizer.ggml.token_type", [1] * 10))
token_scores_short = _spec_case("``tokenizer.ggml.scores`` has 10 entries for 306 tokens.",
                                lambda s: s.set("tokenizer.ggml.scores", [0.0] * 10))
token_types_wrong_type = _spec_case("``tokenizer.ggml.token_type`` is an array of strings.",
                                    lambda s: s.set("tokenizer.ggml.token_type", ["1"] * 306, ARR, STR))
alignment_not_pow2 = _spec_case("``general.alignment`` is 48 (not a power of 2).",
                                lambda s: s.set("general.alignment", 48, U32))
alignment_wrong_type = _spec_case("``general.alignment`` is a string.",
                                  lambda s: s.set("general.alignment", "32", STR))


def fifo(path):
    """A named pipe (FIFO) instead of a regular file."""
    path = Path(path)
    os.mkfifo(path)
    return path


def directory(path):
    """A directory instead of a regular file."""
    path = Path(path)
    path.mkdir()
    return path


# name -> writer. EXPECTED[name] is (exception class name, a fragment of its message) as
# observed: "MalformedGGUF" means exactly that class; "LoadFailed" means any LoadFailed (the
# binding raises plain LoadFailed today although the file is arguably malformed).
ALL_CASES: dict[str, Callable[[Any], Path]] = {}
EXPECTED: dict[str, tuple[str, str]] = {}


def _register(table, expected_table, name, writer, expected):
    table[name] = writer
    expected_table[name] = expected


for _name, _w, _exp, _why in [
    ("empty", empty, "MalformedGGUF", 'failed to read magic'),
    ("text_file", text_file, "MalformedGGUF", "invalid magic characters: 'this'"),
    ("bad_magic", bad_magic, "MalformedGGUF", "invalid magic characters: 'GGUX'"),
    ("magic_only", magic_only, "MalformedGGUF", 'failed to read header'),
    ("version_0", version_0, "MalformedGGUF", 'bad GGUF version: 0'),
    ("version_1", version_1, "MalformedGGUF", 'GGUFv1 is no longer supported'),
    ("version_4", version_4, "MalformedGGUF", 'version 4 but this software only supports up to version 3'),
    ("version_999", version_999, "MalformedGGUF", 'version 999 but'),
    ("version_big_endian", version_big_endian, "MalformedGGUF", 'failed to read header'),
    ("truncated_header", truncated_header, "MalformedGGUF", 'failed to read header'),
    ("truncated_header_end", truncated_header_end, "MalformedGGUF", 'failed to read key-value pairs'),
    ("truncated_kv_key", truncated_kv_key, "MalformedGGUF", 'exceeds remaining file size'),
    ("truncated_kv_array", truncated_kv_array, "MalformedGGUF", 'failed to read key-value pairs'),
    ("truncated_tensor_info", truncated_tensor_info, "MalformedGGUF", 'failed to read tensor info'),
    ("truncated_tensor_info_end", truncated_tensor_info_end, "MalformedGGUF", 'failed to read tensor info'),
    ("truncated_before_data", truncated_before_data, "MalformedGGUF",
     "'token_embd.weight' data is not within the file bounds"),
    ("truncated_tensor_data", truncated_tensor_data, "MalformedGGUF", 'data is not within the file bounds'),
    ("truncated_last_byte", truncated_last_byte, "MalformedGGUF",
     "'blk.1.ffn_down.weight' data is not within the file bounds"),
    ("tensor_offset_past_eof", tensor_offset_past_eof, "MalformedGGUF", 'has offset 1099511627776'),
    ("tensor_offset_misaligned", tensor_offset_misaligned, "MalformedGGUF",
     "'blk.1.ffn_down.weight' has offset"),
    ("tensor_data_past_eof", tensor_data_past_eof, "MalformedGGUF",
     "'blk.1.ffn_down.weight' data is not within the file bounds"),
    ("n_tensors_huge", n_tensors_huge, "MalformedGGUF", 'number of tensors is 4611686018427387904'),
    ("n_kv_huge", n_kv_huge, "MalformedGGUF", 'number of key value pairs is 4611686018427387904'),
    ("n_kv_plus_one", n_kv_plus_one, "MalformedGGUF", 'exceeds maximum'),
    ("n_tensors_plus_one", n_tensors_plus_one, "MalformedGGUF", 'invalid ggml type'),
    ("kv_string_len_huge", kv_string_len_huge, "MalformedGGUF",
     'string length 4611686018427387904 exceeds maximum'),
    ("kv_string_len_past_eof", kv_string_len_past_eof, "MalformedGGUF",
     'string length 1048576 exceeds remaining file size'),
    ("kv_key_len_huge", kv_key_len_huge, "MalformedGGUF",
     'string length 4611686018427387904 exceeds maximum'),
    ("kv_array_len_huge", kv_array_len_huge, "MalformedGGUF", 'failed to read key-value pairs'),
    ("kv_invalid_type", kv_invalid_type, "MalformedGGUF", "key 'general.name' has invalid GGUF type 99"),
    ("tensor_n_dims_huge", tensor_n_dims_huge, "MalformedGGUF", 'invalid number of dimensions: 1000 > 4'),
    ("tensor_invalid_type", tensor_invalid_type, "MalformedGGUF", 'invalid ggml type 200'),
    ("tensor_removed_type", tensor_removed_type, "MalformedGGUF", 'not a multiple of block size'),
    ("tensor_dim_negative", tensor_dim_negative, "MalformedGGUF", 'has invalid number of elements'),
    ("tensor_dims_overflow", tensor_dims_overflow, "MalformedGGUF", 'may cause overflow errors'),
    ("missing_block_count", missing_block_count, "MalformedGGUF",
     'key not found in model: llama.block_count'),
    ("missing_embedding_length", missing_embedding_length, "MalformedGGUF",
     'key not found in model: llama.embedding_length'),
    ("missing_context_length", missing_context_length, "MalformedGGUF",
     'key not found in model: llama.context_length'),
    ("missing_architecture", missing_architecture, "MalformedGGUF", "unknown model architecture: ''"),
    ("missing_token_list", missing_token_list, "MalformedGGUF", 'cannot find tokenizer vocab'),
    ("unknown_architecture", unknown_architecture, "MalformedGGUF",
     "unknown model architecture: 'notanarch'"),
    ("unknown_tokenizer", unknown_tokenizer, "MalformedGGUF", "unknown tokenizer: 'bogus'"),
    ("wrong_key_type", wrong_key_type, "MalformedGGUF", 'key llama.block_count has wrong type'),
    ("wrong_tensor_shape", wrong_tensor_shape, "MalformedGGUF",
     "tensor 'blk.0.attn_q.weight' has wrong shape"),
    ("wrong_embd_shape", wrong_embd_shape, "MalformedGGUF", "tensor 'token_embd.weight' has wrong shape"),
    ("missing_tensor", missing_tensor, "MalformedGGUF", "tensor 'blk.1.ffn_down.weight' not found"),
    ("extra_tensor", extra_tensor, "MalformedGGUF", 'wrong number of tensors; expected 22, got 21'),
    ("duplicate_tensor", duplicate_tensor, "MalformedGGUF", "duplicate tensor name 'output_norm.weight'"),
    ("duplicate_key", duplicate_key, "MalformedGGUF", "duplicate key 'llama.block_count'"),
    ("tensor_name_too_long", tensor_name_too_long, "MalformedGGUF", 'is too long: 100 >= 64'),
    ("rope_dims_mismatch", rope_dims_mismatch, "MalformedGGUF", 'invalid n_rot: 8, expected 16'),
    ("token_types_short", token_types_short, "MalformedGGUF",
     'Index out of array bounds for toktypes (10 < 306)'),
    ("token_scores_short", token_scores_short, "MalformedGGUF",
     'Index out of array bounds for scores (10 < 306)'),
    ("token_types_wrong_type", token_types_wrong_type, "MalformedGGUF",
     'invalid gguf type for tokenizer.ggml.token_type'),
    ("alignment_not_pow2", alignment_not_pow2, "MalformedGGUF", 'alignment 48 is not a power of 2'),
    ("alignment_wrong_type", alignment_wrong_type, "MalformedGGUF",
     "key 'general.alignment' must be of type u32 but is str"),
    ("fifo", fifo, "MalformedGGUF", 'is not a regular file'),
    ("directory", directory, "MalformedGGUF", 'is not a regular file'),
]:
    _register(ALL_CASES, EXPECTED, _name, _w, (_exp, _why))


# ---- LoRA adapter cases that fail cleanly ----------------------------------------------------

def _lora_case(doc: str, edit: Callable[[Spec], Any], **kw):
    def writer(path):
        spec = lora_spec(**kw)
        edit(spec)
        return write_spec(path, spec)
    writer.__doc__ = doc
    return writer


def lora_empty(path):
    """A zero-byte adapter file."""
    return _put(path, b"")


def lora_bad_magic(path):
    """The tiny LoRA with magic ``GGUX``."""
    return _put(path, b"GGUX" + spec_bytes(lora_spec())[4:])


lora_control = _lora_case("Control, NOT malformed: the tiny LoRA re-written by write_spec.", lambda s: None)
lora_arch_mismatch = _lora_case("A LoRA whose ``general.architecture`` is ``gpt2`` (the model is llama).",
                                lambda s: None, arch="gpt2")
lora_not_adapter = _lora_case("``general.type`` is ``model`` instead of ``adapter``.",
                              lambda s: s.set("general.type", "model"))
lora_not_lora = _lora_case("``adapter.type`` is ``control_vector`` instead of ``lora``.",
                           lambda s: s.set("adapter.type", "control_vector"))
lora_wrong_shape = _lora_case(
    "``blk.0.attn_q.weight.lora_a`` is 4x32 (the base tensor's rows are 64 wide).",
    lambda s: s.put_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 32), np.float32)))
lora_rank_mismatch = _lora_case(
    "``blk.0.attn_q.weight.lora_a`` has rank 4 but its ``lora_b`` has rank 8.",
    lambda s: s.put_tensor("blk.0.attn_q.weight.lora_b", np.zeros((N_EMBD, 8), np.float32)))
lora_missing_b = _lora_case("``blk.0.attn_q.weight.lora_b`` is missing.",
                            lambda s: s.drop_tensor("blk.0.attn_q.weight.lora_b"))
lora_unknown_tensor = _lora_case(
    "A LoRA pair for ``blk.7.attn_q.weight``, which the 2-layer model does not have.",
    lambda s: [s.put_tensor("blk.7.attn_q.weight.lora_a", np.zeros((4, N_EMBD), np.float32)),
               s.put_tensor("blk.7.attn_q.weight.lora_b", np.zeros((N_EMBD, 4), np.float32))])
lora_bad_suffix = _lora_case("A tensor ``blk.0.attn_q.weight.lora_c`` with an unknown suffix.",
                             lambda s: s.put_tensor("blk.0.attn_q.weight.lora_c", np.zeros(4, np.float32)))


def lora_truncated(path):
    """The tiny LoRA truncated in the middle of its tensor data."""
    data = spec_bytes(lora_spec())
    return _put(path, data[: len(data) - 700])


lora_rank_0 = _lora_case("A LoRA of rank 0 (lora_a 64x0, lora_b 0xN): nothing to allocate.", lambda s: None, rank=0)


def lora_is_model(path):
    """A full model file (the tiny model) given as an adapter."""
    return write_tiny_model(path)


ADAPTER_CASES: dict[str, Callable[[Any], Path]] = {}
ADAPTER_EXPECTED: dict[str, tuple[str, str]] = {}
for _name, _w, _exp, _why in [
    ("lora_empty", lora_empty, "MalformedGGUF", 'failed to read magic'),
    ("lora_bad_magic", lora_bad_magic, "MalformedGGUF", "invalid magic characters: 'GGUX'"),
    ("lora_arch_mismatch", lora_arch_mismatch, "MalformedGGUF", 'model arch and LoRA arch mismatch'),
    ("lora_not_adapter", lora_not_adapter, "MalformedGGUF",
     "expect general.type to be 'adapter', but got: model"),
    ("lora_not_lora", lora_not_lora, "MalformedGGUF",
     "expect adapter.type to be 'lora', but got: control_vector"),
    ("lora_wrong_shape", lora_wrong_shape, "MalformedGGUF",
     "tensor 'blk.0.attn_q.weight' has incorrect shape"),
    ("lora_rank_mismatch", lora_rank_mismatch, "MalformedGGUF", 'lora_a tensor is not transposed'),
    ("lora_missing_b", lora_missing_b, "MalformedGGUF",
     "LoRA tensor pair for 'blk.0.attn_q.weight' is missing one component"),
    ("lora_unknown_tensor", lora_unknown_tensor, "MalformedGGUF",
     "LoRA tensor 'blk.7.attn_q.weight' does not exist in base model"),
    ("lora_bad_suffix", lora_bad_suffix, "MalformedGGUF", 'has unexpected suffix'),
    ("lora_truncated", lora_truncated, "MalformedGGUF", 'data is not within the file bounds'),
    ("lora_is_model", lora_is_model, "MalformedGGUF", "expect general.type to be 'adapter', but got:"),
    ("lora_rank_0", lora_rank_0, "MalformedGGUF", 'failed to allocate buffer for lora adapter'),
]:
    _register(ADAPTER_CASES, ADAPTER_EXPECTED, _name, _w, (_exp, _why))


# ---- files that kill the process (probe only in a child process) -----------------------------

def _set(key, value, vtype=None, sub=None):
    return lambda s: s.set(key, value, vtype, sub)


abort_block_count_0 = _spec_case("``llama.block_count`` is 0 (no tensors for layers).", lambda s: None, n_layer=0)
abort_block_count_huge = _spec_case("``llama.block_count`` is 1000 (LLAMA_MAX_LAYERS is 512).",
                                    _set("llama.block_count", 1000))
abort_expert_used_without_experts = _spec_case("``llama.expert_used_count`` is 2 but the model has no experts.",
                                               _set("llama.expert_used_count", 2, U32))
abort_expert_count_huge = _spec_case("``llama.expert_count`` is 5000 (LLAMA_MAX_EXPERTS is 1024).",
                                     _set("llama.expert_count", 5000, U32))
abort_rope_scaling_unknown = _spec_case("``llama.rope.scaling.type`` is ``bogus``.",
                                        _set("llama.rope.scaling.type", "bogus", STR))
abort_nextn_layers_gt_blocks = _spec_case("``llama.nextn_predict_layers`` is 5 for a 2-layer model.",
                                          _set("llama.nextn_predict_layers", 5, U32))
abort_head_count_0 = _spec_case("``llama.attention.head_count`` (and _kv) are 0; q/k/v tensors are 64x0.",
                                lambda s: None, n_head=0, n_head_kv=0)
abort_n_ff_0 = _spec_case("``llama.feed_forward_length`` is 0; the ffn tensors are 64x0 / 0x64.",
                          lambda s: None, n_ff=0)
abort_n_embd_0 = _spec_case("``llama.embedding_length`` is 0; all tensors shaped to match.",
                            lambda s: None, n_embd=0)


def _dup_token(s: Spec) -> None:
    kv = s.get("tokenizer.ggml.tokens")
    if kv is None:
        raise ValueError("the spec has no tokenizer.ggml.tokens")
    toks = list(kv.value)
    toks[2] = toks[1]
    s.set("tokenizer.ggml.tokens", toks)


abort_duplicate_token = _spec_case("Token 2 has the same text as token 1 (``<s>``).", _dup_token)
abort_head_count_kv_gt_head = _spec_case("head_count 2, head_count_kv 4 (more KV heads than heads), shapes consistent.",
                                         lambda s: None, n_head=2, n_head_kv=4)
abort_head_count_kv_not_dividing = _spec_case("head_count 4, head_count_kv 3 (does not divide), shapes consistent.",
                                              lambda s: None, n_head=4, n_head_kv=3)
abort_head_count_kv_layer_zero = _spec_case("``llama.attention.head_count_kv`` is the per-layer array [2, 0].",
                                            _set("llama.attention.head_count_kv", [2, 0], ARR, U32))
abort_empty_token_list = _spec_case("An empty ``tokenizer.ggml.tokens`` (0-token vocabulary, add_bos true).",
                                    lambda s: None, tokens=[])
abort_one_token_vocab = _spec_case("A 1-token SPM vocabulary: the BOS id is out of range but add_bos is true.",
                                   lambda s: None, tokens=["<unk>"])
abort_bert_small_vocab = _spec_case("A 50-token ``bert`` (WPM) vocabulary: no SEP token (default id 102).",
                                    _set("tokenizer.ggml.model", "bert"), tokens=[f"t{i}" for i in range(50)])
abort_head_count_odd_head_dim = _spec_case("head_count 3, n_embd 64: head dim 21 (odd rope dims), consistent shapes.",
                                           lambda s: None, n_head=3, n_head_kv=3)
abort_embd_odd_head_dim = _spec_case("n_embd 60 with 4 heads: head dim 15 (odd rope dims), shapes consistent.",
                                     lambda s: None, n_embd=60)

abort_lora_general_type_not_str = _lora_case("A LoRA whose ``general.type`` is a u32.", _set("general.type", 7, U32))
abort_lora_arch_not_str = _lora_case("A LoRA whose ``general.architecture`` is a u32.",
                                     _set("general.architecture", 7, U32))
abort_lora_adapter_type_not_str = _lora_case("A LoRA whose ``adapter.type`` is a u32.", _set("adapter.type", 7, U32))
abort_lora_alpha_not_f32 = _lora_case("A LoRA whose ``adapter.lora.alpha`` is a string.",
                                      _set("adapter.lora.alpha", "eight", STR))
abort_lora_a_3d = _lora_case(
    "``blk.0.attn_q.weight.lora_a`` is 3-D (2x4x64): passes the 2-D shape checks, breaks the mul_mat.",
    lambda s: s.put_tensor("blk.0.attn_q.weight.lora_a", np.zeros((2, 4, N_EMBD), np.float32)))
abort_lora_b_3d = _lora_case(
    "``blk.0.attn_q.weight.lora_b`` is 3-D (2x64x4): passes the 2-D shape checks, breaks the mul_mat.",
    lambda s: s.put_tensor("blk.0.attn_q.weight.lora_b", np.zeros((2, N_EMBD, 4), np.float32)))

_M = "src/llama-model.cpp"
_G = "ggml/src/ggml.c"
_V = "src/llama-vocab.cpp"
# name -> (writer, stage, observed). Probed with the pinned llama.cpp (see
# deps/llama.cpp/.erllama-source); ABORT_LOG holds the last line llama.cpp printed.
ABORT_CASES: dict[str, tuple[Callable[[Any], Path], str, str]] = {}
ABORT_LOG: dict[str, str] = {}
for _name, _w, _stage, _obs, _line in [
    ("block_count_0", abort_block_count_0, "load", "SIGABRT",
     f"{_M}:1328: GGML_ASSERT(hparams.n_layer_all > 0 && hparams.n_layer_all <= LLAMA_MAX_LAYERS) failed"),
    ("block_count_huge", abort_block_count_huge, "load", "SIGABRT",
     f"{_M}:1328: GGML_ASSERT(hparams.n_layer_all > 0 && hparams.n_layer_all <= LLAMA_MAX_LAYERS) failed"),
    ("expert_used_without_experts", abort_expert_used_without_experts, "load", "SIGABRT",
     f"{_M}:1362: GGML_ASSERT(n_expert_used_max <= hparams.n_expert) failed"),
    ("expert_count_huge", abort_expert_count_huge, "load", "SIGABRT",
     f"{_M}:1361: GGML_ASSERT(hparams.n_expert <= LLAMA_MAX_EXPERTS) failed"),
    ("rope_scaling_unknown", abort_rope_scaling_unknown, "load", "SIGABRT",
     f"{_M}:1420: GGML_ASSERT(hparams.rope_scaling_type_train != LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED) failed"),
    ("nextn_layers_gt_blocks", abort_nextn_layers_gt_blocks, "load", "SIGABRT",
     f"{_M}:1330: GGML_ASSERT(hparams.n_layer_nextn <= hparams.n_layer_all) failed"),
    ("head_count_0", abort_head_count_0, "load",
     "SIGABRT", f"{_G}:3355: GGML_ASSERT(!ggml_is_transposed(a)) failed"),
    ("n_ff_0", abort_n_ff_0, "load", "SIGABRT", f"{_G}:3355: GGML_ASSERT(!ggml_is_transposed(a)) failed"),
    ("n_embd_0", abort_n_embd_0, "load", "SIGABRT", f"{_G}:3355: GGML_ASSERT(!ggml_is_transposed(a)) failed"),
    ("duplicate_token", abort_duplicate_token, "load", "SIGABRT",
     f"{_V}:2544: GGML_ASSERT(id_to_token.size() == token_to_id.size()) failed"),
    ("head_count_kv_gt_head", abort_head_count_kv_gt_head, "context", "SIGABRT",
     f"{_G}:5515: GGML_ASSERT(ggml_can_mul_mat(k, q)) failed"),
    ("head_count_kv_not_dividing", abort_head_count_kv_not_dividing, "context", "SIGABRT",
     f"{_G}:5515: GGML_ASSERT(ggml_can_mul_mat(k, q)) failed"),
    ("head_count_kv_layer_zero", abort_head_count_kv_layer_zero, "context", "SIGABRT",
     f"{_G}:4014: GGML_ASSERT(a->ne[0] == b->ne[0]) failed"),
    ("empty_token_list", abort_empty_token_list, "tokenize", "SIGABRT",
     f"{_V}:3443: GGML_ASSERT(special_bos_id != LLAMA_TOKEN_NULL) failed"),
    ("one_token_vocab", abort_one_token_vocab, "tokenize", "SIGABRT",
     f"{_V}:3443: GGML_ASSERT(special_bos_id != LLAMA_TOKEN_NULL) failed"),
    ("bert_small_vocab", abort_bert_small_vocab, "tokenize", "SIGABRT",
     f"{_V}:3547: GGML_ASSERT(special_sep_id != LLAMA_TOKEN_NULL) failed"),
    ("head_count_odd_head_dim", abort_head_count_odd_head_dim, "decode", "SIGABRT",
     "ggml/src/ggml-cpu/ops.cpp:6356: GGML_ASSERT(n_dims % 2 == 0) failed"),
    ("embd_odd_head_dim", abort_embd_odd_head_dim, "decode", "SIGABRT",
     "ggml/src/ggml-cpu/ops.cpp:6356: GGML_ASSERT(n_dims % 2 == 0) failed"),
    ("lora_general_type_not_str", abort_lora_general_type_not_str, "adapter_load", "SIGABRT",
     "ggml/src/gguf.cpp:196: GGML_ASSERT(type_to_gguf_type<T>::value == type) failed"),
    ("lora_arch_not_str", abort_lora_arch_not_str, "adapter_load", "SIGABRT",
     "ggml/src/gguf.cpp:196: GGML_ASSERT(type_to_gguf_type<T>::value == type) failed"),
    ("lora_adapter_type_not_str", abort_lora_adapter_type_not_str, "adapter_load", "SIGABRT",
     "ggml/src/gguf.cpp:196: GGML_ASSERT(type_to_gguf_type<T>::value == type) failed"),
    ("lora_alpha_not_f32", abort_lora_alpha_not_f32, "adapter_load", "SIGABRT",
     "ggml/src/gguf.cpp:196: GGML_ASSERT(type_to_gguf_type<T>::value == type) failed"),
    ("lora_a_3d", abort_lora_a_3d, "adapter_decode",
     "SIGABRT", f"{_G}:3354: GGML_ASSERT(ggml_can_mul_mat(a, b)) failed"),
    ("lora_b_3d", abort_lora_b_3d, "adapter_decode",
     "SIGABRT", f"{_G}:3354: GGML_ASSERT(ggml_can_mul_mat(a, b)) failed"),
]:
    ABORT_CASES[_name] = (_w, _stage, _obs)
    ABORT_LOG[_name] = _line


# ---- probing in a child process --------------------------------------------------------------

_PROBE = r"""
import sys
from erllama import _native as n
from erllama.testing.tinymodel import write_tiny_model
path, stage = sys.argv[1], sys.argv[2]
def say(*a):
    print(*a, flush=True)
if stage.startswith("adapter"):
    model = n.Model.load(write_tiny_model(sys.argv[3]))
    try:
        ad = n.Adapter.load(model, path)
    except Exception as e:
        say("RAISED", "adapter_load", type(e).__name__, e); sys.exit(0)
    say("OK adapter_load")
    ctx = n.Context.create(model, n_ctx=256, n_threads=1)
    ctx.set_adapters([(ad, 1.0)])
    say("OK set_adapters")
else:
    try:
        model = n.Model.load(path)
    except Exception as e:
        say("RAISED", "load", type(e).__name__, e); sys.exit(0)
    say("OK load")
    try:
        ctx = n.Context.create(model, n_ctx=256, n_threads=1)
    except Exception as e:
        say("RAISED", "context", type(e).__name__, e); sys.exit(0)
    say("OK context")
    try:
        toks = model.tokenize("hello world", add_special=True)
    except Exception as e:
        say("RAISED", "tokenize", type(e).__name__, e); sys.exit(0)
    say("OK tokenize", toks)
toks = [1, 5, 9, 300 % model.n_vocab] if model.n_vocab > 300 else [0] * 4
try:
    ctx.step([(0, toks)])
    ctx.step([(0, [toks[-1]])])
except Exception as e:
    say("RAISED", "decode", type(e).__name__, e); sys.exit(0)
say("OK decode")
"""


def probe(path: str | os.PathLike, *, adapter: bool = False, timeout: float = 60) -> dict:
    """Load ``path`` (as a model, or as an adapter of the tiny model) in a child process and go
    through context creation, tokenize and two decodes. Returns ``{"returncode", "signal",
    "stages_ok", "raised", "stderr_tail", "abort_line"}``; ``signal`` is the signal name when the child died."""
    import signal as _signal

    with tempfile.TemporaryDirectory() as d:
        args = [sys.executable, "-c", _PROBE, str(path), "adapter" if adapter else "model"]
        if adapter:
            args.append(str(Path(d) / "tiny.gguf"))
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        env["GGML_NO_BACKTRACE"] = "1"   # no gdb backtrace on abort: fast, readable stderr
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    out = r.stdout.splitlines()
    sig = None
    if r.returncode < 0:
        try:
            sig = _signal.Signals(-r.returncode).name
        except ValueError:
            sig = str(-r.returncode)
    return {
        "returncode": r.returncode,
        "signal": sig,
        "stages_ok": [ln.split()[1] for ln in out if ln.startswith("OK ")],
        "raised": next((ln for ln in out if ln.startswith("RAISED")), None),
        "stderr_tail": [ln for ln in r.stderr.splitlines() if ln.strip()][-4:],
        "abort_line": next((ln for ln in reversed(r.stderr.splitlines())
                            if any(w in ln for w in ("GGML_ASSERT", "GGML_ABORT", "terminate", "error"))), None),
    }
