"""``erllama demo``: load the default model, run a cold and a warm completion, print timings.

The warm run restores the per-sequence KV state and the last-token logits saved after the
cold prefill, the way the KV cache serves an exact hit, and must produce the same greedy
text.
"""

from __future__ import annotations

import time

import numpy as np

from erllama.backend.llama import greedy_generate, native
from erllama.models import default_model_path

PARAGRAPH = (
    "The supervision tree restarts a failed worker without disturbing its siblings. "
    "Each model lives in its own actor, and the cache keeps the prompt state of every "
    "conversation so that a repeated system prompt costs milliseconds instead of seconds. "
)


def _prefill(ctx, seq: int, tokens: list[int], chunk: int) -> None:
    for i in range(0, len(tokens), chunk):
        part = tokens[i:i + chunk]
        ctx.step([(seq, part, i + chunk >= len(tokens))])


def run(prompt_tokens: int = 2048, max_tokens: int = 48, n_threads: int | None = None) -> dict:
    """Run the demo and return its measurements (also printed)."""
    path = default_model_path()
    t0 = time.perf_counter()
    model = native.Model.load(path)
    load_ms = (time.perf_counter() - t0) * 1e3
    print(f"model      {path} ({model.description}, {model.size / 1e6:.0f} MB) loaded in {load_ms:.0f} ms")
    text = ""
    while True:
        text += PARAGRAPH
        tokens = model.tokenize("Summarise the following notes.\n" + text)
        if len(tokens) >= prompt_tokens:
            tokens = tokens[:prompt_tokens]
            break
    per_seq = -(-(prompt_tokens + max_tokens + 16) // 256) * 256  # llama.cpp pads to 256
    ctx = native.Context.create(model, n_ctx=2 * per_seq, n_batch=512,
                                n_seq_max=2, n_threads=n_threads)
    try:
        sampler = native.Sampler(model)
        t0 = time.perf_counter()
        _prefill(ctx, 0, tokens, ctx.n_batch)
        cold_prefill = time.perf_counter() - t0
        state = ctx.state_get(0)
        logits = ctx.logits(0)
        t1 = time.perf_counter()
        cold_out = greedy_generate(ctx, sampler, 0, max_tokens)
        gen_s = time.perf_counter() - t1
        print(f"cold       prefill {len(tokens)} tokens in {cold_prefill * 1e3:.0f} ms "
              f"({len(tokens) / cold_prefill:.0f} t/s), generated {len(cold_out)} tokens at "
              f"{len(cold_out) / gen_s:.1f} t/s")
        print(f"saved      KV state {len(state) / 1e6:.1f} MB + logits {logits.nbytes / 1e6:.1f} MB")

        warm_sampler = native.Sampler(model)
        t0 = time.perf_counter()
        restored = ctx.state_set(1, state)
        first = warm_sampler.sample_logits(logits)
        warm_ttft = time.perf_counter() - t0
        ctx.step([(1, [first])])
        warm_out = [first] + greedy_generate(ctx, warm_sampler, 1, max_tokens - 1)
        same = warm_out == cold_out
        print(f"warm       restored {restored} positions, first token in {warm_ttft * 1e3:.1f} ms "
              f"({cold_prefill / warm_ttft:.0f}x faster than the cold prefill)")
        print(f"identical  {same}")
        print(f"text       {model.detokenize(cold_out)!r}")
        sampler.free()
        warm_sampler.free()
        return {"prompt_tokens": len(tokens), "cold_prefill_ms": cold_prefill * 1e3,
                "warm_ttft_ms": warm_ttft * 1e3, "gen_tps": len(cold_out) / gen_s, "identical": same,
                "state_bytes": len(state), "logits_max": float(np.max(logits))}
    finally:
        ctx.free()
        model.free()
