"""Tiny synthetic llama GGUF models (and a LoRA for them), written with the ``gguf`` package.

2 layers, n_embd 64, 4 heads / 2 KV heads, an SPM vocabulary of about 300 tokens, f32
random weights from a fixed seed: loads in milliseconds and decodes thousands of tokens a
second, so tests exercise the real llama.cpp code paths without a real model. Used by the
test suite, the benchmarks and the demo.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["TinySpec", "write_tiny_model", "write_tiny_lora", "CHATML_TEMPLATE", "tiny_vocab"]

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
