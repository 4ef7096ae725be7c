"""The cache through the public API: cold then warm, exact and partial hits, multi-turn
conversations, counters; on the tiny model and on Gemma."""

from __future__ import annotations


import pytest

import erllama

POLICY = {"min_tokens": 16, "cold_min_tokens": 16}


@pytest.fixture
def app(tmp_path):
    with erllama.running(cache_dir=str(tmp_path / "c"), ram_file_dir=str(tmp_path / "shm"), policy=POLICY) as a:
        erllama.cache.reset_counters()
        yield a


def wait_saves(n_rows, timeout=10):
    store = erllama.cache.current()
    assert store.flush(timeout), "saves did not land"
    assert len(store.index.rows) >= n_rows


def test_cold_then_warm_on_the_tiny_model(app, tiny_path):
    mid = erllama.load_model(tiny_path, n_ctx=1024, n_seq_max=2, n_batch=256, n_threads=1, isolation="none")
    prompt = erllama.tokenize(mid, "the cat and the dog " * 10)
    cold = erllama.complete(mid, prompt, max_tokens=12)
    assert cold.cache_hit == "cold" and cold.finish_key is not None
    wait_saves(3)  # the trimmed prefix, the whole prompt, the finished context
    warm = erllama.complete(mid, prompt, max_tokens=12)
    assert warm.cache_hit == "exact" and warm.cache_delta.read == len(prompt)
    assert warm.tokens == cold.tokens and warm.text == cold.text
    # SPEC 1.4: created counts the tokens this request added (its finish save)
    assert cold.cache_delta.created == cold.context_tokens
    assert warm.cache_delta.created == warm.context_tokens - len(prompt)
    longer = prompt + erllama.tokenize(mid, " hello world", add_special=False)
    part = erllama.complete(mid, longer, max_tokens=12)
    assert part.cache_hit == "partial" and part.cache_delta.read == len(prompt)
    c = erllama.cache.counters()
    assert (c["misses"], c["hits_exact"], c["hits_longest_prefix"]) == (1, 1, 1)
    assert c["saves_cold"] == 2 and c["saves_finish"] >= 1


def test_a_conversation_resent_in_full_hits_every_turn(app, tiny_chatml_path):
    mid = erllama.load_model(tiny_chatml_path, n_ctx=2048, n_seq_max=1, n_batch=512, n_threads=1,
                             isolation="none")
    from erllama.backend.llama import native

    messages = [{"role": "system", "content": "you answer in lowercase letters " * 3}]
    hits = []
    for turn in range(4):
        messages.append({"role": "user", "content": f"question number {turn} about cats"})
        text = native.apply_chat_template("chatml", messages)
        prompt = erllama.tokenize(mid, text, parse_special=True)
        done = erllama.complete(mid, prompt, max_tokens=8)
        hits.append((done.cache_hit, done.cache_delta.read, len(prompt)))
        messages.append({"role": "assistant", "content": done.text})
        wait_saves(1)
    assert hits[0][0] == "cold"
    for kind, read, n in hits[1:]:
        assert kind in ("partial", "exact") and 0 < read <= n
    c = erllama.cache.counters()
    assert c["misses"] == 1 and c["hits_longest_prefix"] + c["hits_exact"] == 3


@pytest.mark.gemma
def test_cold_then_warm_on_gemma(app, gemma_path):
    mid = erllama.load_model(gemma_path, n_ctx=4096, n_seq_max=1, n_batch=512, isolation="none",
                             chat_template="gemma")
    from erllama.demo import PARAGRAPH

    prompt = erllama.tokenize(mid, "Summarise the following notes.\n" + PARAGRAPH * 40)[:2000]
    cold = erllama.complete(mid, prompt, max_tokens=24)
    wait_saves(2)
    warm = erllama.complete(mid, prompt, max_tokens=24)
    assert warm.cache_hit == "exact" and warm.tokens == cold.tokens
    print(f"gemma 2000 tokens: cold ttft {cold.stats.ttft_ms:.0f} ms, warm ttft {warm.stats.ttft_ms:.1f} ms")
    assert warm.stats.ttft_ms < cold.stats.ttft_ms
    longer = prompt + erllama.tokenize(mid, "\nAnd one more line of notes.", add_special=False)
    part = erllama.complete(mid, longer, max_tokens=8)
    assert part.cache_hit == "partial" and part.cache_delta.read == len(prompt)
    c = erllama.cache.counters()
    assert (c["misses"], c["hits_exact"], c["hits_longest_prefix"], c["hits_resume"]) == (1, 1, 1, 0)


@pytest.mark.gemma
def test_a_gemma_conversation_hits_every_turn_after_the_first(app, gemma_path):
    mid = erllama.load_model(gemma_path, n_ctx=4096, n_seq_max=1, n_batch=512, isolation="none",
                             chat_template="gemma")
    messages = [{"role": "user", "content": "You are a terse assistant. " * 12 + "Name a colour."}]
    kinds = []
    for turn in range(3):
        prompt = erllama.apply_chat_template(mid, messages)
        done = erllama.complete(mid, prompt, max_tokens=12)
        kinds.append((done.cache_hit, done.cache_delta.read, len(prompt)))
        messages += [{"role": "assistant", "content": done.text},
                     {"role": "user", "content": f"And another one, number {turn + 2}?"}]
        wait_saves(1)
    assert kinds[0][0] == "cold"
    assert all(kind in ("exact", "partial") and read > 0 for kind, read, _ in kinds[1:]), kinds
    c = erllama.cache.counters()
    assert c["misses"] == 1 and c["hits_exact"] + c["hits_longest_prefix"] == 2


@pytest.mark.gemma
def test_four_gemma_streams_equal_four_sequential_runs(app, gemma_path):
    mid = erllama.load_model(gemma_path, n_ctx=4096, n_seq_max=4, n_batch=512, isolation="none")
    prompts = [erllama.tokenize(mid, f"Write one sentence about the number {i}.") for i in range(4)]
    sequential = [erllama.complete(mid, p, max_tokens=16).tokens for p in prompts]
    streams = [erllama.infer(mid, p, max_tokens=16) for p in prompts]
    assert [s.result().tokens for s in streams] == sequential


def test_evict_and_unload_save_live_sequences(app, tiny_path):
    # the stub never ends a request by itself: it is surely running when we evict and unload
    mid = erllama.load_model(tiny_path, backend="stub", n_ctx=1 << 22, n_seq_max=2, n_batch=256, isolation="none")
    prompt = erllama.tokenize(mid, "a dog and a cat " * 3)
    stream = erllama.infer(mid, prompt, max_tokens=100_000)
    next(iter(stream))
    assert erllama.evict(mid) == 1
    assert erllama.cache.counters()["saves_evict"] == 1
    erllama.unload(mid)  # the running request gets a shutdown save, then ModelCrashed
    with pytest.raises(erllama.errors.ModelCrashed):
        stream.result()
    c = erllama.cache.counters()
    assert c["saves_shutdown"] == 1


def test_prefill_only_then_complete_hits(app, tiny_path):
    mid = erllama.load_model(tiny_path, n_ctx=1024, n_seq_max=1, n_batch=256, n_threads=1, isolation="none")
    prompt = erllama.tokenize(mid, "a short prompt")  # under min_tokens: prefill_only saves anyway
    pre = erllama.prefill_only(mid, prompt)
    assert isinstance(pre, erllama.Prefill) and pre.cache_hit == "cold"
    assert pre.context_tokens == len(prompt) and pre.finish_key is not None
    again = erllama.prefill_only(mid, prompt)
    assert again.cache_hit == "exact" and again.finish_key == pre.finish_key
    longer = prompt + erllama.tokenize(mid, " and more", add_special=False)
    done = erllama.complete(mid, longer, max_tokens=4, parent_key=pre.finish_key)
    assert done.cache_hit == "partial" and done.cache_delta.read == len(prompt)
    assert erllama.cache.counters()["hits_resume"] == 1


def test_long_generations_get_continued_saves(tmp_path, tiny_path):
    policy = {"min_tokens": 16, "cold_min_tokens": 16, "continued_interval": 20}
    with erllama.running(cache_dir=str(tmp_path / "c"), ram_file_dir=str(tmp_path / "s"), policy=policy):
        erllama.cache.reset_counters()
        mid = erllama.load_model(tiny_path, backend="stub", n_ctx=4096, n_seq_max=1, n_batch=256,
                                 isolation="none")
        prompt = erllama.tokenize(mid, "x" * 40)
        done = erllama.complete(mid, prompt, max_tokens=70)
        wait_saves(1)
        # 41 prompt tokens, then a save every 20 decoded tokens: at 61, 81 and 101 positions
        assert erllama.cache.counters()["saves_continued"] == 3
        assert done.finish_reason == "length"
        # a continued row is a prefix of the finished context: resuming from it hits
        again = erllama.complete(mid, prompt + list(done.tokens[:30]), max_tokens=2)
        assert again.cache_hit == "partial" and again.cache_delta.read >= 61


def test_a_corrupt_row_is_a_counted_miss_and_never_served(app, tiny_path, tmp_path):
    mid = erllama.load_model(tiny_path, n_ctx=1024, n_seq_max=1, n_batch=256, n_threads=1, isolation="none",
                             tier="disk")
    prompt = erllama.tokenize(mid, "rows on disk can rot " * 8)
    cold = erllama.complete(mid, prompt, max_tokens=6)
    wait_saves(2)
    rows = [p for p in (tmp_path / "c" / "kv").rglob("*") if p.is_file()]
    assert rows
    for p in rows:  # flip a byte in the middle of every row's payload
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))
    again = erllama.complete(mid, prompt, max_tokens=6)
    assert again.cache_hit == "cold" and again.tokens == cold.tokens
    c = erllama.cache.counters()
    assert (c["hits_exact"], c["misses"], c["restores_failed"]) == (0, 2, 1) and c["corrupt_files"] >= 1
