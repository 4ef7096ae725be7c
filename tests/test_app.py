"""The application tree and the public facade, on the tiny model and the stub backend."""

from __future__ import annotations

import asyncio
import queue

import pytest

import erllama
from erllama import errors

from fault_helpers import crash_model


@pytest.fixture
def app(tmp_path):
    with erllama.running(cache_dir=str(tmp_path / "c"), ram_file_dir=str(tmp_path / "shm")) as a:
        yield a


def load(path, **kw):
    opts = dict(n_ctx=512, n_seq_max=2, n_batch=128, n_threads=1, isolation="none")
    opts.update(kw)
    return erllama.load_model(path, **opts)


def test_complete_infer_and_streams(app, tiny_path):
    mid = load(tiny_path, model_id="tiny")
    c = erllama.complete(mid, "hello world", max_tokens=8)
    assert c.finish_reason == "length" and len(c.tokens) == 8 and c.stats.completion_tokens == 8
    assert erllama.complete(mid, erllama.tokenize(mid, "hello world"), max_tokens=8).tokens == c.tokens
    s = erllama.infer(mid, "hello world", max_tokens=8)
    events = list(s)
    assert isinstance(events[-1], erllama.Done) and events[-1].completion.tokens == c.tokens
    assert "".join(e.text for e in events if isinstance(e, erllama.Token)) == c.text

    async def consume():
        return [e async for e in erllama.infer(mid, "hello world", max_tokens=8)]

    assert asyncio.run(consume())[-1].completion.tokens == c.tokens
    q: queue.Queue = queue.Queue()
    erllama.infer(mid, "hello world", max_tokens=3, sink=q)
    got = [q.get(timeout=10) for _ in range(4)]
    assert isinstance(got[-1], erllama.Done)
    assert erllama.detokenize(mid, erllama.tokenize(mid, "abc", add_special=False)).strip() == "abc"
    assert erllama.status(mid) == "idle" and erllama.queue_depth(mid) == 0
    assert [m.id for m in erllama.list_models()] == ["tiny"]


def test_cancel_by_request_id(app, tiny_path):
    mid = load(tiny_path, n_seq_max=1)
    s = erllama.infer(mid, "hello", max_tokens=100_000)
    queued = erllama.infer(mid, "hello", max_tokens=5)
    erllama.cancel(queued.request_id)
    assert queued.result().finish_reason == "cancelled"
    s.cancel()
    assert s.result().finish_reason == "cancelled"
    erllama.cancel(123456789)  # unknown or finished ids are fine


def test_errors_of_the_facade(app, tiny_path, tmp_path):
    mid = load(tiny_path, model_id="m")
    with pytest.raises(errors.AlreadyLoaded):
        load(tiny_path, model_id="m")
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(errors.MalformedGGUF):
        load(bad, model_id="bad")
    with pytest.raises(errors.ConfigError, match="n_seq_max"):
        load(tiny_path, n_seq_max=0)
    with pytest.raises(errors.ModelNotFound):
        erllama.complete("nope", "hi")
    with pytest.raises(errors.EmptyPrompt):
        erllama.complete(mid, [])
    with pytest.raises(errors.InvalidParameter):
        erllama.complete(mid, "hi", max_tokens=-2)
    assert len(erllama.complete(mid, "hi", max_tokens=2).tokens) == 2
    assert [m.id for m in erllama.list_models()] == ["m"]
    erllama.unload(mid)
    with pytest.raises(errors.ModelNotFound):
        erllama.model_info(mid)


def test_a_crashed_model_fails_its_requests_and_is_restarted(app, tiny_path, monkeypatch):
    mid = load(tiny_path)
    long = erllama.infer(mid, "hello", max_tokens=100_000)
    next(iter(long))  # it is generating
    crash_model(monkeypatch, mid)
    with pytest.raises(errors.ModelCrashed):
        long.result()
    c = erllama.complete(mid, "hello world", max_tokens=4)
    assert len(c.tokens) == 4 and erllama.model_info(mid).restarts == 1


def test_start_is_idempotent_and_conflicts_raise(tmp_path):
    a = erllama.start(cache_dir=str(tmp_path / "c"), ram_file_dir=str(tmp_path / "s"))
    try:
        assert erllama.start() is a
        with pytest.raises(errors.AlreadyStarted):
            erllama.start(cache_dir=str(tmp_path / "other"))
    finally:
        erllama.stop()
        erllama.stop()
    with pytest.raises(errors.ErllamaError, match="not running"):
        erllama.complete("x", "y")


def test_stub_backend_through_the_facade(app, tiny_path):
    mid = load(tiny_path, backend="stub", model_id="stub")
    c = erllama.complete(mid, "abc", max_tokens=5)
    assert len(c.tokens) == 5
