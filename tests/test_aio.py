"""``erllama.aio``: the asyncio facade on real models (the tiny one for results and
batching, Gemma where a long generation is needed)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

import erllama
from erllama import aio, errors

from supervision_helpers import wait_until

COUNT = "Count from 1 to 500, one number per line, and nothing else."


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    d = tmp_path_factory.mktemp("aio")
    with erllama.running(cache_dir=str(d / "c"), ram_file_dir=str(d / "shm")) as a:
        yield a


@pytest.fixture(scope="module")
def tiny(app, tiny_path):
    mid = erllama.load_model(tiny_path, model_id="tiny", n_ctx=4096, n_seq_max=8, n_batch=512, n_threads=1,
                             isolation="none")
    erllama.embed(mid, "warm")  # its embeddings context lives as long as the model, not one test
    yield mid
    erllama.unload(mid)


@pytest.fixture(scope="module")
def gemma_id(app, gemma_path):
    mid = erllama.load_model(gemma_path, model_id="gemma", n_ctx=4096, n_seq_max=8, isolation="none")
    yield mid
    erllama.unload(mid)


def only_request(app):
    """The one request in flight (the tests below run one at a time)."""
    wait_until(lambda: len(app.inflight.items()) == 1, 10, "one request in flight")
    return app.inflight.items()[0][1]


def test_the_facade_awaits_the_same_results(tiny):
    async def main():
        prompt = await aio.tokenize(tiny, "the cat and the dog")
        assert prompt == erllama.tokenize(tiny, "the cat and the dog")
        assert await aio.detokenize(tiny, prompt) == erllama.detokenize(tiny, prompt)
        done = await aio.complete(tiny, prompt, max_tokens=12)
        events = [ev async for ev in aio.infer(tiny, prompt, max_tokens=12)]
        vec = await aio.embed(tiny, "the cat")
        pre = await aio.prefill_only(tiny, prompt + prompt)
        return done, events, vec, pre

    done, events, vec, pre = asyncio.run(main())
    ref = erllama.complete(tiny, erllama.tokenize(tiny, "the cat and the dog"), max_tokens=12)
    assert done.text == ref.text and done.tokens == ref.tokens
    assert isinstance(events[-1], erllama.Done) and events[-1].completion.text == ref.text
    assert "".join(e.text for e in events[:-1]) == ref.text
    assert np.allclose(vec, erllama.embed(tiny, "the cat"))
    assert pre.finish_key is not None and pre.context_tokens == 2 * len(erllama.tokenize(tiny, "the cat and the dog"))


def test_errors_raise_in_the_awaiting_task(tiny):
    async def main():
        with pytest.raises(errors.InvalidParameter, match="max_tokens"):
            await aio.complete(tiny, "x", max_tokens=-1)
        with pytest.raises(errors.ModelNotFound):
            await aio.complete("nope", "x")
        with pytest.raises(errors.InvalidParameter, match="buffer"):
            aio.infer(tiny, "x", buffer=0)

    asyncio.run(main())


def test_eight_tasks_on_one_loop_are_batched_without_a_thread_each(gemma_id):
    """Every stream's first token comes before any stream ends (they share the ticks), each
    stream carries exactly its own request's tokens, and no thread was started for them.
    (Texts are not compared with serial runs: a different batch changes Gemma's float sums.)"""
    prompts = [f"Write a sentence about the number {i}." for i in range(8)]

    async def read(stream):
        events = [ev async for ev in stream]
        return stream.request_id, events

    async def main():
        before = threading.active_count()
        streams = [aio.infer(gemma_id, p, max_tokens=16) for p in prompts]
        assert threading.active_count() == before
        return await asyncio.gather(*(read(s) for s in streams))

    got = asyncio.run(main())
    assert len({rid for rid, _ in got}) == 8
    done = []
    for _, events in got:
        *tokens, last = events
        c = last.completion
        assert tuple(t.id for t in tokens) == c.tokens and "".join(t.text for t in tokens) == c.text
        done.append(c)
    first = max(c.stats.ttft_ms for c in done)
    ends = min(c.stats.ttft_ms + c.stats.generation_ms for c in done)
    assert first < ends, [(c.stats.ttft_ms, c.stats.generation_ms) for c in done]


def test_cancelling_the_task_cancels_the_request(app, gemma_id):
    async def main():
        task = asyncio.create_task(aio.complete(gemma_id, COUNT, max_tokens=1000))
        await asyncio.to_thread(wait_until, lambda: app.inflight.items() and only_request(app).state.generated, 30,
                                "a first token")
        req = only_request(app)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # while the loop still runs (a closed loop would end the request by itself)
        await asyncio.to_thread(wait_until, lambda: req.state.finished, 5, "the cancelled request to end")
        return req

    req = asyncio.run(main())
    assert req.cancelled.is_set() and len(req.state.generated) < 1000


def test_closing_the_stream_cancels_the_request(app, gemma_id):
    async def main():
        async with aio.infer(gemma_id, COUNT, max_tokens=1000) as stream:
            n = 0
            async for ev in stream:
                n += isinstance(ev, erllama.Token)
                if n == 5:
                    break
            req = app.inflight.get(stream.request_id)
        await asyncio.to_thread(wait_until, lambda: req.state.finished, 5, "the closed stream's request to end")
        return req

    req = asyncio.run(main())
    assert req.cancelled.is_set() and len(req.state.generated) < 1000


def test_a_slow_consumer_is_cut_off_not_the_model(app, gemma_id):
    """A stream nobody reads fills its buffer: the request is cancelled (its sequence freed)
    and, after the buffered tokens, the stream raises SlowConsumer; the model goes on."""
    async def main():
        stream = aio.infer(gemma_id, COUNT, max_tokens=200, buffer=8)
        req = app.inflight.get(stream.request_id)
        await asyncio.to_thread(wait_until, lambda: req.state.finished, 60, "the request to be cut off")
        got = []
        with pytest.raises(errors.SlowConsumer, match="left 8 tokens unread"):
            async for ev in stream:
                got.append(ev)
        return req, got

    req, got = asyncio.run(main())
    assert len(got) == 8 and all(isinstance(e, erllama.Token) for e in got)
    assert req.cancelled.is_set() and len(req.state.generated) < 200
    assert erllama.complete(gemma_id, "Say hello.", max_tokens=4).finish_reason in ("length", "stop")


def test_a_sync_stream_is_read_by_async_for_without_a_thread(tiny):
    prompts = [f"prompt number {i}: the cat" for i in range(4)]
    refs = [erllama.complete(tiny, p, max_tokens=8).text for p in prompts]

    async def collect(stream):
        return "".join([ev.text async for ev in stream if isinstance(ev, erllama.Token)])

    async def main():
        before = threading.active_count()
        streams = [erllama.infer(tiny, p, max_tokens=8) for p in prompts]
        texts = await asyncio.gather(*(collect(s) for s in streams))
        assert threading.active_count() == before  # no executor thread was started
        with pytest.raises(errors.InvalidParameter):
            erllama.complete(tiny, "x", max_tokens=-1)
        return texts

    assert asyncio.run(main()) == refs
