"""``erllama demo``: the application on the default model, cold then warm, then a
conversation resumed from the cache, with timings and cache counters."""

from __future__ import annotations

import shutil
import tempfile
import time

import erllama
from erllama.default_model import default_model_path

PARAGRAPH = (
    "The supervision tree restarts a failed worker without disturbing its siblings. "
    "Each model lives in its own actor, and the cache keeps the prompt state of every "
    "conversation so that a repeated system prompt costs milliseconds instead of seconds. "
)


def run(prompt_tokens: int = 2048, max_tokens: int = 48, n_threads: int | None = None,
        cache_dir: str | None = None) -> dict:
    """Run the demo (printing as it goes) and return its measurements."""
    tmp = None if cache_dir else tempfile.mkdtemp(prefix="erllama-demo-")
    root = cache_dir or tmp
    try:
        with erllama.running(cache_dir=root, ram_file_dir=f"{root}/shm"):
            path = default_model_path()
            t0 = time.perf_counter()
            mid = erllama.load_model(path, model_id="gemma", n_ctx=prompt_tokens + 2 * max_tokens + 1024,
                                     n_batch=512, n_threads=n_threads, chat_template="gemma", isolation="none")
            print(f"model      {path.name} loaded as {mid!r} in {(time.perf_counter() - t0) * 1e3:.0f} ms")
            text = "Summarise the following notes.\n" + PARAGRAPH * (prompt_tokens // 40 + 1)
            prompt = erllama.tokenize(mid, text)[:prompt_tokens]

            cold = erllama.complete(mid, prompt, max_tokens=max_tokens)
            erllama.cache.current().flush()  # let the previous request's saves land
            warm = erllama.complete(mid, prompt, max_tokens=max_tokens)
            same = warm.tokens == cold.tokens
            print(f"cold       {len(prompt)} prompt tokens: first token after {cold.stats.ttft_ms:.0f} ms, "
                  f"{cold.stats.tokens_per_s:.1f} tokens/s ({cold.cache_hit})")
            print(f"warm       first token after {warm.stats.ttft_ms:.1f} ms ({warm.cache_hit}, "
                  f"{warm.cache_delta.read} tokens restored): "
                  f"{cold.stats.ttft_ms / max(warm.stats.ttft_ms, 1e-3):.0f}x faster")
            print(f"identical  {same}")
            print(f"text       {cold.text[:160]!r}")

            messages = [{"role": "user", "content": "Here are my notes: " + PARAGRAPH * 8 + " What is the tree for?"}]
            first = erllama.complete(mid, _chat(mid, messages), max_tokens=32)
            messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And the cache?"}]
            erllama.cache.current().flush()  # let the previous request's saves land
            second = erllama.complete(mid, _chat(mid, messages), max_tokens=32)
            print(f"turn 1     {first.cache_hit}: first token after {first.stats.ttft_ms:.0f} ms")
            print(f"turn 2     {second.cache_hit}: {second.cache_delta.read} of {second.stats.prompt_tokens} "
                  f"prompt tokens restored, first token after {second.stats.ttft_ms:.0f} ms")
            c = erllama.cache.counters()
            print("counters   " + ", ".join(f"{k}={c[k]}" for k in (
                "hits_exact", "hits_longest_prefix", "misses", "saves_cold", "saves_finish", "bytes_ram")))
            return {"prompt_tokens": len(prompt), "cold_ttft_ms": cold.stats.ttft_ms,
                    "warm_ttft_ms": warm.stats.ttft_ms, "identical": same, "turn2_hit": second.cache_hit,
                    "turn2_read": second.cache_delta.read}
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _chat(model_id: str, messages: list[dict[str, str]]) -> list[int]:
    from erllama.backend.llama import native

    return erllama.tokenize(model_id, native.apply_chat_template("gemma", messages), parse_special=True)

