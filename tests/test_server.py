"""The HTTP server for real: uvicorn on 127.0.0.1 and a free port, driven by the real
``openai`` client (sync and async) and ``httpx``; the models are the tiny one and Gemma."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import openai
import pytest

import erllama
from erllama import app as app_mod
from erllama.server import ModelSpec, ServerConfig

from server_helpers import serving
from supervision_helpers import wait_until

SYSTEM = ("You are a careful assistant for a library. Answer in one short sentence. "
          "The library opens at nine and closes at six; it lends books for three weeks. ") * 8
NOTES = "Meeting notes: the cache keeps KV states of prompts so that a repeated prefix is restored. "


def gemma_spec(gemma_path, **kw):
    opts = {"n_ctx": 16384, "n_seq_max": 4, "n_batch": 4096, "chat_template": "gemma", "isolation": "none"}
    return ModelSpec(str(gemma_path), "gemma", {**opts, **kw})


def wait_ready(url: str, timeout: float = 120) -> None:
    wait_until(lambda: httpx.get(url + "/health", timeout=5).status_code == 200, timeout, "the server to be ready")


@pytest.fixture(scope="module")
def url(tmp_path_factory, tiny_chatml_path, gemma_path):
    d = tmp_path_factory.mktemp("server")
    cfg = ServerConfig(models=(ModelSpec(str(tiny_chatml_path), "tiny", {"n_ctx": 1024, "n_seq_max": 2,
                                                                         "isolation": "none"}),
                               gemma_spec(gemma_path)),
                       app_config={"cache_dir": str(d / "c"), "ram_file_dir": str(d / "shm"),
                                   "policy": {"min_tokens": 16, "cold_min_tokens": 16}})
    with serving(cfg) as base:
        wait_ready(base)
        erllama.embed("gemma", "warm")  # its embeddings context lives as long as the model, not one test
        yield base


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def chat(client, content, model="gemma", repetition_penalty=None, **kw):
    extra = {"repetition_penalty": repetition_penalty} if repetition_penalty else None
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                          extra_body=extra, **{"temperature": 0, "max_tokens": 16, **kw})


def test_chat_and_completions_streamed_and_not(client):
    whole = chat(client, "Name three colours.")
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens == 16 and whole.choices[0].finish_reason == "length"
    chunks = list(chat(client, "Name three colours.", stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    comp = client.completions.create(model="tiny", prompt="the cat and the dog", max_tokens=6, temperature=0)
    streamed = client.completions.create(model="tiny", prompt="the cat and the dog", max_tokens=6, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == comp.choices[0].text
    assert comp.usage.prompt_tokens == len(erllama.tokenize("tiny", "the cat and the dog"))


def test_stop_sequences_and_seeds(client):
    free = chat(client, "Count from 1 to 10, one number per line.", max_tokens=24).choices[0].message.content
    stop = free.strip()[3:6]  # a piece of what it says unstopped, not at its start
    assert len(stop) == 3, free
    cut = chat(client, "Count from 1 to 10, one number per line.", max_tokens=24, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == free[:free.index(stop)]
    a = chat(client, "Write a word.", temperature=1.0, seed=7).choices[0].message.content
    b = chat(client, "Write a word.", temperature=1.0, seed=7).choices[0].message.content
    assert a == b


def test_json_object_and_json_schema_outputs(client):
    # a 270M model rambles inside an object; a repetition penalty lets this prompt close it
    obj = chat(client, 'Give a JSON object with one key "colour".', max_tokens=200, repetition_penalty=1.3,
               response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content), dict | list)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    got = chat(client, "Invent a person as JSON.", max_tokens=120,
               response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    person = json.loads(got.choices[0].message.content)
    assert set(person) == {"name", "age"} and isinstance(person["name"], str) and len(person["name"]) <= 12
    assert isinstance(person["age"], int) and got.choices[0].finish_reason == "stop"


def test_embeddings_and_models(client):
    got = client.embeddings.create(model="gemma", input=["a cat", "a dog"])  # base64 by default
    assert [d.index for d in got.data] == [0, 1]
    vecs = [np.asarray(d.embedding) for d in got.data]
    assert all(v.shape == (640,) and abs(np.linalg.norm(v) - 1) < 1e-3 for v in vecs)
    floats = client.embeddings.create(model="gemma", input="a cat", encoding_format="float")
    assert np.allclose(floats.data[0].embedding, vecs[0], atol=1e-6)
    assert got.usage.prompt_tokens == sum(len(erllama.tokenize("gemma", t)) for t in ("a cat", "a dog"))
    assert sorted(m.id for m in client.models.list()) == ["gemma", "tiny"]


def test_the_second_request_of_a_conversation_reports_cached_tokens(client):
    first = client.chat.completions.create(model="gemma", temperature=0, max_tokens=12, messages=[
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": "When does it open?"}])
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert erllama.cache.current().flush(30)
    second = client.chat.completions.create(model="gemma", temperature=0, max_tokens=12, messages=[
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": "When does it open?"},
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And when does it close?"}])
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and second.model_extra["erllama"]["cached_tokens"] == cached
    assert second.model_extra["erllama"]["cache_hit"] in ("exact", "partial")


def test_four_async_streaming_clients_get_their_own_text_batched(url):
    prompts = [f"Write one sentence about the number {i}." for i in range(4)]

    async def one(client, prompt):
        stream = await client.chat.completions.create(
            model="gemma", messages=[{"role": "user", "content": prompt}], max_tokens=24, temperature=0,
            stream=True, stream_options={"include_usage": True})
        parts, usage = [], None
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
            else:
                usage = chunk.usage
        return "".join(parts), usage

    async def run(serial):
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as client:
            t0 = time.monotonic()
            if serial:
                got = [await one(client, p) for p in prompts]
            else:
                got = await asyncio.gather(*(one(client, p) for p in prompts))
            return got, time.monotonic() - t0

    serial, serial_s = asyncio.run(run(True))
    together, together_s = asyncio.run(run(False))
    assert all(u.completion_tokens == 24 for _, u in together)
    assert len({t for t, _ in together}) == 4  # each client its own text
    assert together_s < serial_s, (together_s, serial_s)


def test_a_disconnect_during_a_4k_prefill_cancels_it_within_half_a_second(url):
    app = app_mod.current()
    prompt = erllama.tokenize("gemma", NOTES * 200)[:4000]
    with httpx.Client(timeout=30) as http, http.stream(
            "POST", url + "/v1/completions",
            json={"model": "gemma", "prompt": prompt, "max_tokens": 8, "stream": True}) as resp:
        wait_until(lambda: any(r.state.seq is not None and r.state.cursor for _, r in app.inflight.items()), 30,
                   "the prefill to start")
        time.sleep(0.3)  # inside the one step that prefills the prompt (seconds)
        req = app.inflight.items()[0][1]
        assert resp.status_code == 200 and req.state.cursor
        t0 = time.monotonic()
        resp.close()
    wait_until(lambda: req.state.finished, 5, "the prefill to be cancelled")
    took = time.monotonic() - t0
    assert req.cancelled.is_set() and not req.state.generated
    assert took < 0.5, f"the disconnect took {took:.2f} s to cancel the prefill"


def test_logprobs_streamed_and_not(client):
    got = chat(client, "Name three colours.", logprobs=True, top_logprobs=3)
    entries = got.choices[0].logprobs.content
    assert len(entries) == got.usage.completion_tokens
    assert "".join(e.token for e in entries) == got.choices[0].message.content
    for e in entries:  # greedy: the chosen token is the most likely one of the raw distribution
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(v <= 0 for v in tops)
        assert e.top_logprobs[0].token == e.token and abs(e.top_logprobs[0].logprob - e.logprob) < 1e-9
        assert sum(np.exp(tops)) <= 1 + 1e-9
    chunks = list(chat(client, "Name three colours.", logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 6)) for e in streamed] == [(e.token, round(e.logprob, 6)) for e in entries]
    comp = client.completions.create(model="gemma", prompt="The capital of France is", max_tokens=6,
                                     temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert "".join(lp.tokens) == comp.choices[0].text and len(lp.token_logprobs) == 6
    assert all(len(t) == 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0
    assert chat(client, "Name three colours.").choices[0].logprobs is None  # not asked, not sent


def test_frequency_and_presence_penalties_change_a_repetitive_answer(client):
    plain = chat(client, "Repeat the word apple twenty times.", max_tokens=24).choices[0].message.content
    for name in ("frequency_penalty", "presence_penalty"):
        pen = chat(client, "Repeat the word apple twenty times.", max_tokens=24, **{name: 2.0})
        assert pen.choices[0].message.content != plain, name  # ignored penalties would change nothing


def test_a_cache_namespace_keeps_rows_and_sessions_apart(client):
    msgs = [{"role": "user", "content": "Tell me about the library and its opening hours. " * 8}]

    def ask(ns, messages=msgs, **ext):
        return client.chat.completions.create(model="gemma", messages=messages, max_tokens=4, temperature=0,
                                              extra_body={"erllama": {"namespace": ns, **ext}})

    assert ask("tenant-a").model_extra["erllama"]["cache_hit"] == "cold"
    assert erllama.cache.current().flush(30)
    other = ask("tenant-b")
    assert other.model_extra["erllama"]["cache_hit"] == "cold" and other.usage.prompt_tokens_details.cached_tokens == 0
    again = ask("tenant-a")
    assert again.model_extra["erllama"]["cache_hit"] == "exact" and again.usage.prompt_tokens_details.cached_tokens
    # a sticky session's live KV is only reused by a request of its own namespace
    first = ask("tenant-c", session_id="s1")
    longer = msgs + [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And on Sundays?"}]
    assert ask("tenant-d", longer, session_id="s1").model_extra["erllama"]["cache_hit"] != "sticky"
    first = ask("tenant-c", session_id="s2")
    longer = msgs + [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And on Sundays?"}]
    assert ask("tenant-c", longer, session_id="s2").model_extra["erllama"]["cache_hit"] == "sticky"
    with pytest.raises(openai.BadRequestError):
        ask("")


def test_a_disconnect_cancels_a_request_that_is_not_streamed(url):
    app = app_mod.current()
    prompt = erllama.tokenize("gemma", NOTES * 200)[:4000]
    with pytest.raises(httpx.ReadTimeout):  # the client gives up during the prefill, and goes away
        httpx.post(url + "/v1/completions", json={"model": "gemma", "prompt": prompt, "max_tokens": 8}, timeout=1.0)
    # well before the ~4 s prefill would have ended by itself
    wait_until(lambda: not app.inflight.items(), 1.5, "the abandoned request to be cancelled")
