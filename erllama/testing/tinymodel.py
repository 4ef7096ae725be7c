"""Tiny synthetic llama GGUF models (and a LoRA for them).

2 layers, n_embd 64, 4 heads / 2 KV heads, an SPM vocabulary of about 300 tokens, f32
random weights from a fixed seed: loads in milliseconds and decodes thousands of tokens a
second, so tests exercise the real llama.cpp code paths without a real model. Used by the
test suite, the benchmarks and the demo. :func:`write_tiny_model` and
:func:`write_tiny_lora` need the ``gguf`` package (a test extra).

:func:`write_known_good_model` writes a slightly larger model (n_embd 256) whose weights use
the quantization types real GGUFs use (:data:`KNOWN_GOOD_TYPES`) with only numpy, so a plain
install can tell "this build is broken on this CPU" from "this model file is bad".
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from erllama.testing import ggufwrite as gw

__all__ = ["TinySpec", "write_tiny_model", "write_tiny_lora", "CHATML_TEMPLATE", "tiny_vocab",
           "write_known_good_model", "known_good_spec", "KNOWN_GOOD_TYPES", "KnownGoodSpec"]

N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 2
N_FF = 128
N_LAYER = 2
HEAD_DIM = N_EMBD // N_HEAD

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_PIECES = ["▁the", "▁a", "▁is", "▁of", "▁and", "▁to", "▁in", "er", "in", "on", "an", "re",
           "▁hello", "▁world", "▁cat", "▁dog", "ing", "ed", "▁it", "▁that"]

# gguf token types: 1 normal, 2 unknown, 3 control, 6 byte
_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6


class TinySpec:
    """Shape constants of the tiny model (for tests that need them)."""

    n_embd = N_EMBD
    n_layer = N_LAYER
    n_head = N_HEAD
    n_head_kv = N_HEAD_KV
    n_ff = N_FF


def tiny_vocab(chatml: bool = False) -> tuple[list[str], list[float], list[int]]:
    """The tiny SPM vocabulary: tokens, scores and token types."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [_UNKNOWN, _CONTROL, _CONTROL]
    tokens += [f"<0x{i:02X}>" for i in range(256)]
    types += [_BYTE] * 256
    normal = ["▁"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + _PIECES
    tokens += normal
    types += [_NORMAL] * len(normal)
    if chatml:
        tokens += ["<|im_start|>", "<|im_end|>"]
        types += [_CONTROL, _CONTROL]
    scores = [0.0] * len(tokens)
    for i, t in enumerate(tokens):
        if types[i] == _NORMAL:
            scores[i] = -10.0 + len(t)  # longer pieces win in SPM merges
    return tokens, scores, types


def _write_atomic(path: Path, fill) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fill(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_tiny_model(path: str | os.PathLike, *, seed: int = 0, chatml: bool = False,
                     n_ctx_train: int = 256, scale: float = 0.5) -> Path:
    """Write the tiny llama GGUF to ``path`` (atomically) and return the path.

    ``chatml=True`` adds ``<|im_start|>``/``<|im_end|>`` tokens and a ChatML Jinja template
    in ``tokenizer.chat_template``. The same ``seed`` always gives the same file.
    """
    import gguf

    tokens, scores, types = tiny_vocab(chatml)
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * scale / np.sqrt(shape[-1])).astype(np.float32)

    def fill(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name("erllama-tiny")
        writer.add_context_length(n_ctx_train)
        writer.add_embedding_length(N_EMBD)
        writer.add_block_count(N_LAYER)
        writer.add_feed_forward_length(N_FF)
        writer.add_head_count(N_HEAD)
        writer.add_head_count_kv(N_HEAD_KV)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_rope_dimension_count(HEAD_DIM)
        writer.add_file_type(0)  # all f32
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        if chatml:
            writer.add_chat_template(CHATML_TEMPLATE)
        writer.add_tensor("token_embd.weight", w(n_vocab, N_EMBD))
        writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor("output.weight", w(n_vocab, N_EMBD))
        kv = N_HEAD_KV * HEAD_DIM
        for i in range(N_LAYER):
            writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
            writer.add_tensor(f"blk.{i}.attn_q.weight", w(N_EMBD, N_EMBD))
            writer.add_tensor(f"blk.{i}.attn_k.weight", w(kv, N_EMBD))
            writer.add_tensor(f"blk.{i}.attn_v.weight", w(kv, N_EMBD))
            writer.add_tensor(f"blk.{i}.attn_output.weight", w(N_EMBD, N_EMBD))
            writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
            writer.add_tensor(f"blk.{i}.ffn_gate.weight", w(N_FF, N_EMBD))
            writer.add_tensor(f"blk.{i}.ffn_up.weight", w(N_FF, N_EMBD))
            writer.add_tensor(f"blk.{i}.ffn_down.weight", w(N_EMBD, N_FF))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return _write_atomic(Path(path), fill)


def write_tiny_lora(path: str | os.PathLike, *, rank: int = 4, alpha: float = 8.0, seed: int = 1,
                    scale: float = 2.0) -> Path:
    """Write a LoRA adapter for the tiny model (attn_q and attn_v of every layer)."""
    import gguf

    rng = np.random.default_rng(seed)
    kv = N_HEAD_KV * HEAD_DIM

    def fill(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(alpha))
        for i in range(N_LAYER):
            for name, n_out in (("attn_q", N_EMBD), ("attn_v", kv)):
                a = (rng.standard_normal((rank, N_EMBD)) * scale / np.sqrt(N_EMBD)).astype(np.float32)
                b = (rng.standard_normal((n_out, rank)) * scale / np.sqrt(rank)).astype(np.float32)
                writer.add_tensor(f"blk.{i}.{name}.weight.lora_a", a)
                writer.add_tensor(f"blk.{i}.{name}.weight.lora_b", b)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return _write_atomic(Path(path), fill)


class KnownGoodSpec:
    """Shape constants of the known-good model (k-quant rows need multiples of 256)."""

    n_embd = 256
    n_layer = 2
    n_head = 4
    n_head_kv = 2
    head_dim = 64
    n_ff = 512
    n_ctx_train = 256


def _known_good_types() -> dict[str, str]:
    # Q4_0 and Q4_K take ggml-cpu's repack paths (interleaved blocks, ISA-specific kernels),
    # the usual suspects when a build misbehaves on one CPU; the others are plain vec_dot
    types = {"token_embd.weight": "Q8_0", "output_norm.weight": "F32", "output.weight": "Q6_K"}
    for i in range(KnownGoodSpec.n_layer):
        types.update({
            f"blk.{i}.attn_norm.weight": "F32",
            f"blk.{i}.attn_q.weight": "Q4_K",
            f"blk.{i}.attn_k.weight": "Q4_0",
            f"blk.{i}.attn_v.weight": "Q6_K",
            f"blk.{i}.attn_output.weight": "Q8_0",
            f"blk.{i}.ffn_norm.weight": "F32",
            f"blk.{i}.ffn_gate.weight": "Q4_K",
            f"blk.{i}.ffn_up.weight": "F16",
            f"blk.{i}.ffn_down.weight": "Q6_K",
        })
    return types


#: tensor name -> ggml type name of every tensor in :func:`write_known_good_model`'s file
KNOWN_GOOD_TYPES: dict[str, str] = _known_good_types()


def known_good_spec(*, seed: int = 0, scale: float = 1.0) -> gw.Spec:
    """The known-good model as an editable :class:`~erllama.testing.ggufwrite.Spec`."""
    g = KnownGoodSpec
    tokens, scores, types = tiny_vocab()
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)
    kvs = [
        gw.KV("general.architecture", gw.STR, "llama"),
        gw.KV("general.name", gw.STR, "erllama-known-good"),
        gw.KV("llama.context_length", gw.U32, g.n_ctx_train),
        gw.KV("llama.embedding_length", gw.U32, g.n_embd),
        gw.KV("llama.block_count", gw.U32, g.n_layer),
        gw.KV("llama.feed_forward_length", gw.U32, g.n_ff),
        gw.KV("llama.attention.head_count", gw.U32, g.n_head),
        gw.KV("llama.attention.head_count_kv", gw.U32, g.n_head_kv),
        gw.KV("llama.attention.layer_norm_rms_epsilon", gw.F32, 1e-5),
        gw.KV("llama.rope.dimension_count", gw.U32, g.head_dim),
        gw.KV("general.file_type", gw.U32, 15),  # LLAMA_FTYPE_MOSTLY_Q4_K_M: informational only
        gw.KV("tokenizer.ggml.model", gw.STR, "llama"),
        gw.KV("tokenizer.ggml.tokens", gw.ARR, tokens, gw.STR),
        gw.KV("tokenizer.ggml.scores", gw.ARR, scores, gw.F32),
        gw.KV("tokenizer.ggml.token_type", gw.ARR, types, gw.I32),
        gw.KV("tokenizer.ggml.bos_token_id", gw.U32, 1),
        gw.KV("tokenizer.ggml.eos_token_id", gw.U32, 2),
        gw.KV("tokenizer.ggml.unknown_token_id", gw.U32, 0),
        gw.KV("tokenizer.ggml.add_bos_token", gw.BOOL, True),
        gw.KV("tokenizer.ggml.add_eos_token", gw.BOOL, False),
    ]
    q, kv = g.n_head * g.head_dim, g.n_head_kv * g.head_dim
    shapes = {"token_embd.weight": (n_vocab, g.n_embd), "output_norm.weight": (g.n_embd,),
              "output.weight": (n_vocab, g.n_embd)}
    for i in range(g.n_layer):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (g.n_embd,),
            f"blk.{i}.attn_q.weight": (q, g.n_embd),
            f"blk.{i}.attn_k.weight": (kv, g.n_embd),
            f"blk.{i}.attn_v.weight": (kv, g.n_embd),
            f"blk.{i}.attn_output.weight": (g.n_embd, q),
            f"blk.{i}.ffn_norm.weight": (g.n_embd,),
            f"blk.{i}.ffn_gate.weight": (g.n_ff, g.n_embd),
            f"blk.{i}.ffn_up.weight": (g.n_ff, g.n_embd),
            f"blk.{i}.ffn_down.weight": (g.n_embd, g.n_ff),
        })
    tensors = []
    for name, ggml_name in KNOWN_GOOD_TYPES.items():
        shape = shapes[name]
        if len(shape) == 1:
            a = np.ones(shape, np.float32)
        else:
            # std scale/sqrt(fan_in) keeps every activation O(1): finite in f16 and in the
            # int8 activations the quantized dot products use
            a = (rng.standard_normal(shape) * (scale / np.sqrt(shape[-1]))).astype(np.float32)
        tensors.append(gw._tensor(name, a, gw.GGML_TYPES[ggml_name]))
    return gw.Spec(kvs=kvs, tensors=tensors)


def write_known_good_model(path: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write the known-good llama GGUF to ``path`` (atomically) and return the path.

    Same vocabulary and layout as the tiny model but n_embd 256 (4 heads of 64, 2 KV heads),
    n_ff 512, 2 layers, context 256, with weights in Q4_K, Q6_K, Q8_0, Q4_0 and F16 and norms
    in F32 (:data:`KNOWN_GOOD_TYPES` says which tensor has which type). About 1.3 MB, written
    with numpy only (no ``gguf`` package). The same ``seed`` always gives the same bytes.
    """
    data = gw.spec_bytes(known_good_spec(seed=seed))
    return _write_atomic(Path(path), lambda tmp: tmp.write_bytes(data))
