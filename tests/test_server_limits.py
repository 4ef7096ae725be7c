"""The server's limits for real (uvicorn on 127.0.0.1, the real ``openai`` client and
``httpx``): one sequence and a queue of one, an API key, a small body limit; a full queue,
a disconnect mid-stream, errors in the OpenAI shape, and the metrics of a known sequence."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import erllama
from erllama import app as app_mod
from erllama.server import ServerConfig

from fault_helpers import crash_model
from server_helpers import serving
from supervision_helpers import wait_until
from test_server import chat, gemma_spec


@pytest.fixture(scope="module")
def small(tmp_path_factory, gemma_path):
    """One sequence, a queue of one: for the queue, disconnect and metrics tests."""
    d = tmp_path_factory.mktemp("small")
    cfg = ServerConfig(models=(gemma_spec(gemma_path, n_ctx=2048, n_seq_max=1, n_batch=512),),
                       max_queue=1, api_key="sekrit", max_body_bytes=64 * 1024, sse_ping_s=0.2,
                       app_config={"cache_dir": str(d / "c"), "ram_file_dir": str(d / "shm"),
                                   "policy": {"min_tokens": 16, "cold_min_tokens": 16}})
    with serving(cfg) as base:
        wait_until(lambda: httpx.get(base + "/health", timeout=5).status_code == 200, 120, "ready")
        yield base


def long_stream(http: httpx.Client, base: str) -> httpx.Response:
    req = http.build_request("POST", base + "/v1/chat/completions", headers={"Authorization": "Bearer sekrit"},
                             json={"model": "gemma", "stream": True, "max_tokens": 1000, "temperature": 0,
                                   "messages": [{"role": "user", "content": "Count from 1 to 500."}]})
    return http.send(req, stream=True)


def test_a_full_queue_is_a_fast_503_and_a_disconnect_frees_the_sequence(small):
    client = openai.OpenAI(base_url=small + "/v1", api_key="sekrit", max_retries=0, timeout=60)
    with httpx.Client(timeout=60) as http:
        holder = long_stream(http, small)  # holds the one sequence
        lines = holder.iter_lines()  # kept: a dropped line iterator closes the connection
        assert next(lines).startswith("data: ")
        queued = http.send(http.build_request(
            "POST", small + "/v1/chat/completions", headers={"Authorization": "Bearer sekrit"},
            json={"model": "gemma", "stream": True, "max_tokens": 4,
                  "messages": [{"role": "user", "content": "Hi"}]}), stream=True)
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as info:
            chat(client, "Hi")
        assert info.value.status_code == 503 and time.monotonic() - t0 < 1.0
        assert info.value.response.headers["retry-after"] == "1"
        assert info.value.body["code"] == "queue_full"
        holder.close()  # the client goes away mid-stream: its sequence goes to the queued one
        t1 = time.monotonic()
        got = [line for line in queued.iter_lines() if line.startswith("data: {")]
        assert time.monotonic() - t1 < 10 and json.loads(got[-1][6:])["choices"][0]["finish_reason"]
        queued.close()
    after = chat(client, "Say hi.", max_tokens=4)
    assert after.model_extra["erllama"]["queued_ms"] < 1000  # the freed sequence serves at once


def test_errors_in_the_openai_shape_and_the_server_keeps_serving(small):
    good = openai.OpenAI(base_url=small + "/v1", api_key="sekrit", max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError):
        chat(good, "x", model="nope")
    for bad in ({"temperature": 5}, {"n": 2}, {"top_logprobs": 3}, {"max_tokens": 0}, {"frequency_penalty": 3}):
        with pytest.raises(openai.BadRequestError) as info:
            chat(good, "x", **bad)
        assert info.value.body["param"] == next(iter(bad))
    with pytest.raises(openai.BadRequestError):
        good.chat.completions.create(model="gemma", messages=[])
    with pytest.raises(openai.BadRequestError, match="context_length_exceeded|context per sequence"):
        good.completions.create(model="gemma", prompt=[5] * 3000, max_tokens=1)
    for key in ("wrong", ""):
        with pytest.raises(openai.AuthenticationError):
            chat(openai.OpenAI(base_url=small + "/v1", api_key=key or "x", max_retries=0), "x")
    assert httpx.get(small + "/health").status_code == 200  # no key needed
    assert httpx.get(small + "/v1/models").status_code == 401
    big = {"model": "gemma", "prompt": "x" * 100_000}
    auth = {"Authorization": "Bearer sekrit"}
    assert httpx.post(small + "/v1/completions", json=big, headers=auth).status_code == 413

    def chunks():
        yield json.dumps(big).encode()

    resp = httpx.post(small + "/v1/completions", content=chunks(), headers=auth)  # chunked: no length
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"
    assert httpx.post(small + "/v1/completions", content=b"{not json", headers=auth).status_code == 400
    assert chat(good, "Say hi.", max_tokens=4).choices[0].message.content is not None


def test_metrics_match_a_known_sequence_and_the_cache_counters(small):
    auth = {"Authorization": "Bearer sekrit"}

    def scrape():
        text = httpx.get(small + "/metrics", headers=auth).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    before = scrape()
    for family in ("erllama_requests_rejected_total", "erllama_cache_lookups_total", "erllama_cache_bytes",
                   "erllama_time_to_first_token_seconds_count", "erllama_models_loaded"):
        assert any(name == family for name, _ in before), family  # present (at zero) from the start
    client = openai.OpenAI(base_url=small + "/v1", api_key="sekrit", max_retries=0, timeout=60)
    msgs = [{"role": "user", "content": "Tell me about the library. " * 6}]
    cold = client.chat.completions.create(model="gemma", messages=msgs, max_tokens=4, temperature=0)
    assert erllama.cache.current().flush(30)
    hit = client.chat.completions.create(model="gemma", messages=msgs, max_tokens=4, temperature=0)
    assert (cold.model_extra["erllama"]["cache_hit"], hit.model_extra["erllama"]["cache_hit"]) == ("cold", "exact")
    with httpx.Client(timeout=60) as http:
        holder = long_stream(http, small)
        lines = holder.iter_lines()  # kept: a dropped line iterator closes the connection
        next(lines)
        queued = long_stream(http, small)
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(model="gemma", messages=msgs, max_tokens=4)
        holder.close()
        queued.close()
    wait_until(lambda: not app_mod.current().inflight.items(), 30, "the held requests to end")
    after = scrape()

    def delta(name, **labels):
        key = (name, tuple(sorted({"model": "gemma", **labels}.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("erllama_time_to_first_token_seconds_count", cache="cold") == 1
    assert delta("erllama_time_to_first_token_seconds_count", cache="exact") == 1
    assert delta("erllama_requests_rejected_total", reason="queue_full") == 1
    assert delta("erllama_requests_finished_total", reason="length") == 2
    assert delta("erllama_requests_finished_total", reason="disconnected") == 2
    assert delta("erllama_prompt_tokens_total", source="ram") == hit.usage.prompt_tokens_details.cached_tokens
    c = erllama.cache.counters()
    for result, counter in (("exact", "hits_exact"), ("miss", "misses"), ("longest_prefix", "hits_longest_prefix")):
        assert after[("erllama_cache_lookups_total", (("result", result),))] == c[counter]
    assert after[("erllama_cache_saves_total", (("reason", "finish"),))] == c["saves_finish"]
    for event, counter in (("hits", "hits_resident"), ("kept", "resident_kept")):
        assert after[("erllama_cache_resident_total", (("event", event),))] == c[counter]
    assert after[("erllama_models_loaded", ())] == 1


def test_a_crash_mid_stream_is_an_error_event_and_the_model_comes_back(small, monkeypatch):
    auth = {"Authorization": "Bearer sekrit"}
    with httpx.Client(timeout=60) as http:
        resp = long_stream(http, small)
        lines = resp.iter_lines()
        for line in lines:  # the role chunk, then the first token
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break
        crash_model(monkeypatch, "gemma")
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    err = json.loads(rest[-2][6:])["error"]
    assert err["code"] == "model_restarting" and err["type"] == "unavailable_error"
    wait_until(lambda: httpx.get(small + "/health").status_code == 200, 60, "the model to come back")
    client = openai.OpenAI(base_url=small + "/v1", api_key="sekrit", max_retries=0, timeout=60)
    assert chat(client, "Say hi.", max_tokens=4).usage.completion_tokens >= 1
    metrics = httpx.get(small + "/metrics", headers=auth).text
    assert 'erllama_requests_finished_total{model="gemma",reason="error"} 1.0' in metrics


def test_a_long_prefill_is_kept_alive_with_sse_comments(small):
    """Nothing to send for seconds (a ~1.8k-token prompt): the stream carries ': ping'
    comments (that SSE clients ignore) until its first token, then ends normally."""
    prompt = erllama.tokenize("gemma", "Meeting notes: the library opens at nine. " * 200)[:1800]
    with httpx.Client(timeout=60) as http, http.stream(
            "POST", small + "/v1/completions", headers={"Authorization": "Bearer sekrit"},
            json={"model": "gemma", "prompt": prompt, "max_tokens": 4, "stream": True, "temperature": 0}) as resp:
        lines = [line for line in resp.iter_lines() if line]
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: {"))
    assert first_data >= 2 and all(line == ": ping" for line in lines[:first_data]), lines[:first_data + 1]
    assert lines[-1] == "data: [DONE]"
    client = openai.OpenAI(base_url=small + "/v1", api_key="sekrit", max_retries=0, timeout=60)
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="gemma", prompt=prompt, max_tokens=4, temperature=0, stream=True))
    assert text  # the openai client reads through the comments
