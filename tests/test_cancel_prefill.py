"""A cancel during a long prefill interrupts the decode running it (llama.cpp's abort
callback), on Gemma, in-process and in a worker process: the request ends within 0.5 s
though one step holds the whole ~4k-token prompt, the sequence is reusable, and a request
batched in the aborted step goes on to the same text as alone."""

from __future__ import annotations

import time

import pytest

import erllama

from supervision_helpers import wait_until

NOTES = ("Meeting notes: the cache keeps KV states of prompts so that a repeated prefix "
         "is restored instead of computed again. ")
OPTS = dict(n_ctx=8192, n_seq_max=2, n_batch=4096, n_ubatch=512)


@pytest.fixture
def app(tmp_path):
    with erllama.running(cache_dir=str(tmp_path / "c"), ram_file_dir=str(tmp_path / "shm")) as a:
        yield a


def long_prompt(mid: str, n: int = 4000) -> list[int]:
    return erllama.tokenize(mid, NOTES * (n // 20))[:n]


@pytest.mark.parametrize("isolation", ["none", "process"])
def test_a_cancel_stops_a_4k_prefill_within_half_a_second(app, gemma_path, isolation):
    mid = erllama.load_model(gemma_path, isolation=isolation, **OPTS)
    short = erllama.tokenize(mid, "Write a short poem about the sea.")
    alone = erllama.complete(mid, short, max_tokens=24)
    prompt = long_prompt(mid)
    other = erllama.infer(mid, short, max_tokens=24)  # batched with the long prefill's steps
    stream = erllama.infer(mid, prompt, max_tokens=4)
    req = app.inflight.get(stream.request_id)
    wait_until(lambda: req.state.seq is not None and len(req.state.cursor) < len(prompt), timeout=30,
               what="the long prompt's first step")
    time.sleep(0.3)  # inside the step that prefills the rest of the prompt (seconds here)
    assert req.state.cursor and not req.state.generated
    t0 = time.monotonic()
    stream.cancel()
    done = stream.result()
    took = time.monotonic() - t0
    assert done.finish_reason == "cancelled"
    assert took < 0.5, f"the cancel took {took:.2f} s"
    # the request batched in the aborted step is rolled back and redone: the same text
    assert other.result().text == alone.text
    # the sequence the cancelled prefill held is reusable: the prompt completes, and again
    again = erllama.complete(mid, prompt[:600], max_tokens=8)
    assert again.finish_reason in ("length", "stop") and again.context_tokens >= 600
    assert erllama.complete(mid, short, max_tokens=24).text == alone.text
