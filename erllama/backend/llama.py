"""The llama.cpp backend: the only module that imports the compiled ``erllama._native``.

For now it exposes the binding itself (``native``) and the native helpers the demo and
benchmarks need; the model actor's backend protocol builds on it.
"""

from __future__ import annotations

from erllama import _native as native

__all__ = ["crc32c", "greedy_generate", "native"]


def greedy_generate(ctx: native.Context, sampler: native.Sampler, seq_id: int, n: int) -> list[int]:
    """Sample and decode up to ``n`` tokens of ``seq_id`` (stops after an end-of-generation
    token); the sequence must have logits from its last step."""
    model = ctx.model
    out: list[int] = []
    for _ in range(n):
        tok = sampler.sample(ctx, seq_id)
        out.append(tok)
        if model.is_eog(tok):
            break
        ctx.step([(seq_id, [tok])])
    return out


def crc32c(data, crc: int = 0) -> int:
    """CRC32C (Castagnoli) of a bytes-like object, hardware-accelerated where available."""
    return native.crc32c(data, crc)
