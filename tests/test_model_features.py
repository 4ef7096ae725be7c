"""Sticky sessions, LoRA adapters, embeddings, chat templates, lock-free reads and per-model
restart intensity, through the public API on the tiny model (and the stub where noted)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import erllama
from erllama import errors
from erllama.backend.stub import StubBackend

from fault_helpers import crash_model
from supervision_helpers import wait_until

POLICY = {"min_tokens": 16, "cold_min_tokens": 16}


def worker_dead(pid: int) -> bool:
    """The worker process ``pid`` has exited (a zombie not yet reaped counts as dead)."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def app(tmp_path):
    with erllama.running(cache_dir=str(tmp_path / "c"), ram_file_dir=str(tmp_path / "shm"), policy=POLICY,
                         model_intensity=2, model_period=60) as a:
        erllama.cache.reset_counters()
        yield a


def load(path, **kw):
    opts = dict(n_ctx=2048, n_seq_max=2, n_batch=256, n_threads=1, isolation="none")
    opts.update(kw)
    return erllama.load_model(path, **opts)


def flush():
    assert erllama.cache.current().flush(10), "saves did not land"


# ---- sticky sessions --------------------------------------------------------------------------


def test_a_session_continues_on_its_pinned_sequence(app, tiny_path):
    mid = load(tiny_path)
    prompt = erllama.tokenize(mid, "once upon a time " * 5)
    first = erllama.complete(mid, prompt, max_tokens=6, session_id="s1")
    assert first.cache_hit == "cold"
    context = prompt + list(first.tokens)[:-1]  # the last sampled token was never decoded
    assert first.context_tokens == len(context)
    turn2 = context + erllama.tokenize(mid, " and then", add_special=False)
    sticky = erllama.complete(mid, turn2, max_tokens=6, session_id="s1")
    assert sticky.cache_hit == "sticky" and sticky.cache_delta.read == len(context)
    assert erllama.last_cache_hit(mid) == ("sticky", len(context))
    # the same prompt without the session restores the first turn's finish save (the KV the
    # session held when its turn began) and prefills the same new tokens alone in one step, as
    # the sticky turn did: the same tokens. (Prefilling more of it, or all of it, is another
    # batch shape, whose greedy text may differ on some CPUs: issue 10)
    flush()
    fresh = erllama.complete(mid, turn2, max_tokens=6)
    assert (fresh.cache_hit, fresh.cache_delta.read) == ("partial", len(context))
    assert fresh.tokens == sticky.tokens


def test_a_diverging_prompt_drops_the_pin_and_uses_the_cache(app, tiny_path):
    mid = load(tiny_path)
    prompt = erllama.tokenize(mid, "the quick brown fox " * 5)
    erllama.complete(mid, prompt, max_tokens=4, session_id="s")
    other = erllama.tokenize(mid, "a completely different text " * 4)
    assert erllama.complete(mid, other, max_tokens=4, session_id="s").cache_hit == "cold"
    # resending exactly the pinned context has nothing new to prefill: the cache serves it
    flush()
    again = erllama.complete(mid, prompt, max_tokens=4, session_id="s")
    assert again.cache_hit in ("exact", "partial")


def test_a_busy_session_refuses_a_second_request(app, tiny_path):
    mid = load(tiny_path)
    long = erllama.infer(mid, "hello", max_tokens=100_000, session_id="busy")
    next(iter(long))
    with pytest.raises(errors.SessionBusy, match="busy"):
        erllama.complete(mid, "hello again", max_tokens=2, session_id="busy")
    assert len(erllama.complete(mid, "other", max_tokens=2, session_id="free").tokens) == 2
    erllama.end_session(mid, "busy")  # busy: unpinned when the request ends
    long.cancel()
    assert long.result().finish_reason == "cancelled"
    c = erllama.complete(mid, "hello world", max_tokens=2, session_id="busy")
    assert c.cache_hit != "sticky"


def test_idle_sessions_give_their_sequences_to_waiting_requests(app, tiny_path):
    mid = load(tiny_path, n_seq_max=1, n_ctx=1024)
    a = erllama.complete(mid, "session a says hello", max_tokens=3, session_id="a")
    # the only sequence is pinned to "a"; a request without a session still runs
    assert len(erllama.complete(mid, "no session", max_tokens=3).tokens) == 3
    # "a" lost its sequence, so its continuation is not sticky
    ctx = erllama.tokenize(mid, "session a says hello") + list(a.tokens)[:-1]
    nxt = erllama.complete(mid, ctx + [5, 6], max_tokens=2, session_id="a")
    assert nxt.cache_hit != "sticky"
    erllama.end_session(mid, "a")
    erllama.end_session(mid, "a")  # idempotent
    erllama.end_session(mid, "never-seen")


def test_session_id_is_validated(app, tiny_path):
    mid = load(tiny_path)
    with pytest.raises(errors.InvalidParameter, match="session_id"):
        erllama.complete(mid, "hi", session_id=42)
    with pytest.raises(errors.InvalidParameter, match="session_id"):
        erllama.complete(mid, "hi", session_id="")


# ---- adapters ---------------------------------------------------------------------------------


def test_adapter_changes_outputs_and_its_rows_never_cross(app, tiny_path, tiny_lora_path):
    mid = load(tiny_path)
    prompt = erllama.tokenize(mid, "adapters change the numbers " * 4)
    base = erllama.complete(mid, prompt, max_tokens=8)
    flush()
    assert erllama.cache.longest_prefix(mid, prompt) == len(prompt)
    handle = erllama.load_adapter(mid, tiny_lora_path)
    assert erllama.list_adapters(mid) == [{"handle": handle, "path": str(tiny_lora_path), "scale": 1.0}]
    with_lora = erllama.complete(mid, prompt, max_tokens=8)
    # a request with the adapter never restores a row saved without it
    assert with_lora.cache_hit == "cold" and with_lora.tokens != base.tokens
    flush()
    again = erllama.complete(mid, prompt, max_tokens=8)
    assert again.cache_hit == "exact" and again.tokens == with_lora.tokens
    erllama.set_adapter_scale(mid, handle, 0.5)
    half = erllama.complete(mid, prompt, max_tokens=8)
    assert half.cache_hit == "cold"  # another scale, another fingerprint
    erllama.unload_adapter(mid, handle)
    assert erllama.list_adapters(mid) == []
    back = erllama.complete(mid, prompt, max_tokens=8)
    assert back.cache_hit == "exact" and back.tokens == base.tokens
    erllama.unload_adapter(mid, handle)  # unknown handles are ignored


def test_an_adapter_change_waits_for_running_requests(app, tiny_path, tiny_lora_path):
    mid = load(tiny_path)
    prompt = erllama.tokenize(mid, "the running request keeps its adapters")
    base = erllama.complete(mid, prompt, max_tokens=40)
    stream = erllama.infer(mid, prompt, max_tokens=40)
    next(iter(stream))
    handle = erllama.load_adapter(mid, tiny_lora_path)
    assert stream.result().tokens == base.tokens  # decoded under the old (empty) set to the end
    assert erllama.complete(mid, prompt, max_tokens=40).tokens != base.tokens
    erllama.unload_adapter(mid, handle)


def test_bad_adapters_raise_and_the_model_serves_on(app, tiny_path, tmp_path):
    mid = load(tiny_path)
    with pytest.raises(FileNotFoundError):
        erllama.load_adapter(mid, tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(errors.LoadFailed):
        erllama.load_adapter(mid, junk)
    with pytest.raises(errors.AdapterNotFound, match="lora-x"):
        erllama.set_adapter_scale(mid, "lora-x", 1.0)
    with pytest.raises(errors.InvalidParameter, match="scale"):
        erllama.set_adapter_scale(mid, "lora-x", float("nan"))
    assert len(erllama.complete(mid, "still here", max_tokens=3).tokens) == 3


# ---- embeddings and chat templates --------------------------------------------------------------


def test_embeddings_run_on_their_own_context(app, tiny_path):
    mid = load(tiny_path)
    prompt = erllama.tokenize(mid, "embeddings leave the sessions alone " * 2)
    first = erllama.complete(mid, prompt, max_tokens=4, session_id="e")
    e1 = erllama.embed(mid, "a sentence to embed")
    assert e1.dtype == np.float32 and e1.ndim == 1 and abs(float(np.linalg.norm(e1)) - 1.0) < 1e-4
    assert np.array_equal(erllama.embed(mid, erllama.tokenize(mid, "a sentence to embed")), e1)
    assert not np.allclose(erllama.embed(mid, "something else"), e1)
    raw = erllama.embed(mid, "a sentence to embed", normalize=False)
    assert np.allclose(raw / np.linalg.norm(raw), e1, atol=1e-5)
    with pytest.raises(errors.EmptyPrompt):
        erllama.embed(mid, [])
    # the session's pinned sequence was not touched by the embeddings
    ctx = prompt + list(first.tokens)[:-1]
    nxt = erllama.complete(mid, ctx + [7], max_tokens=2, session_id="e")
    assert nxt.cache_hit == "sticky"


def test_chat_templates_tokenize_with_one_bos(app, tiny_chatml_path, tiny_path):
    mid = load(tiny_chatml_path)
    toks = erllama.apply_chat_template(mid, [{"role": "user", "content": "hi"}], system="be brief")
    bos = erllama.tokenize(mid, "")
    assert toks[: len(bos)] == bos and toks[len(bos): 2 * len(bos)] != bos
    text = erllama.detokenize(mid, toks)
    assert "be brief" in text and "hi" in text
    assert len(erllama.complete(mid, toks, max_tokens=2).tokens) == 2
    with pytest.raises(errors.InvalidContent):
        erllama.apply_chat_template(mid, [{"role": "user", "content": 3}])
    with pytest.raises(errors.InvalidContent):
        erllama.apply_chat_template(mid, "not a list")
    plain = load(tiny_path, model_id="plain")
    with pytest.raises(errors.NoChatTemplate):
        erllama.apply_chat_template(plain, [{"role": "user", "content": "hi"}])
    assert erllama.apply_chat_template(load(tiny_path, model_id="named", chat_template="chatml"),
                                       [{"role": "user", "content": "hi"}])


# ---- observability and restarts -------------------------------------------------------------------


def test_lock_free_reads_follow_the_model(app, tiny_path):
    mid = load(tiny_path, n_seq_max=1)
    assert erllama.pending_len(mid) == 0 and erllama.last_cache_hit(mid) is None
    long = erllama.infer(mid, "first", max_tokens=100_000)
    next(iter(long))
    queued = [erllama.infer(mid, f"queued {i}", max_tokens=2) for i in range(3)]
    wait_until(lambda: erllama.pending_len(mid) == 3, 10, "three queued requests")
    assert erllama.pending_len(mid) == 3 and erllama.queue_depth() == 3
    assert erllama.phase(mid) == "generating" and erllama.last_cache_hit(mid) == ("cold", 0)
    long.cancel()
    assert all(len(q.result().tokens) == 2 for q in queued)
    info = erllama.model_info(mid)
    assert info.status == "loaded" and info.quant and len(info.fingerprint) == 32 and info.loaded_at > 0


class DyingBackend(StubBackend):
    """A stub whose worker 'dies' on the step after a prompt holding token 99 + 3 ('c')."""

    def step(self, rows):
        for row in rows:
            if 99 + 3 in row[1]:
                raise errors.ModelCrashed("the worker died (test)")
        return super().step(rows)


def test_a_model_crashed_backend_restarts_the_model(app, tiny_path):
    mid = load(tiny_path, backend="test_model_features:DyingBackend", n_ctx=4096)
    ok = erllama.complete(mid, "ab", max_tokens=2)
    with pytest.raises(errors.ModelCrashed, match="test"):
        erllama.complete(mid, "abc", max_tokens=2)
    assert erllama.complete(mid, "ab", max_tokens=2).tokens == ok.tokens
    assert erllama.model_info(mid).restarts == 1


def test_a_model_that_keeps_crashing_is_marked_failed_and_others_go_on(app, tiny_path, monkeypatch):
    other = load(tiny_path, model_id="other")
    mid = load(tiny_path, model_id="flaky")
    for expected in (1, 2):
        crash_model(monkeypatch, mid)
        wait_until(lambda: erllama.model_info(mid).restarts >= expected, 10, f"restart {expected}")
    crash_model(monkeypatch, mid)  # the third crash within the period: intensity 2 exceeded
    wait_until(lambda: erllama.model_info(mid).status == "failed", 10, "the model to be marked failed")
    info = erllama.model_info(mid)
    assert info.status == "failed" and "injected crash" in info.last_failure
    with pytest.raises(errors.ModelCrashed, match="not restarted"):
        erllama.complete(mid, "hi", max_tokens=2)
    assert len(erllama.complete(other, "hi", max_tokens=2).tokens) == 2
    erllama.unload(mid)
    assert [m.id for m in erllama.list_models()] == ["other"]
    again = load(tiny_path, model_id="flaky")
    assert len(erllama.complete(again, "hi", max_tokens=2).tokens) == 2


def test_a_temporary_model_is_not_restarted(app, tiny_path, monkeypatch):
    mid = load(tiny_path, restart="temporary")
    crash_model(monkeypatch, mid)
    wait_until(lambda: erllama.model_info(mid).status == "failed", 10, "the model to be marked failed")
    assert erllama.model_info(mid).status == "failed"
    with pytest.raises(errors.ModelCrashed):
        erllama.complete(mid, "hi", max_tokens=2)


def test_public_messages_drive_the_actor_directly(app, tiny_path):
    from erllama import messages

    mid = load(tiny_path)
    ref = erllama.whereis(mid)
    got = []
    done = threading.Event()

    def sink(ev):
        got.append(ev)
        if isinstance(ev, erllama.Done | BaseException):
            done.set()

    req = messages.Request(ref.ask(messages.Tokenize("hello")), messages.RequestParams(max_tokens=3), sink)
    ref.tell(messages.Submit(req))
    assert done.wait(10) and isinstance(got[-1], erllama.Done) and len(got[-1].completion.tokens) == 3
    assert ref.ask(messages.Phase()) == "idle" and ref.ask(messages.QueueDepth()) == 0
    assert ref.ask(messages.Detokenize(ref.ask(messages.Tokenize("hello", False)))) == "hello"


def test_a_request_timeout_cancels_running_and_queued_requests(app, tiny_path):
    mid = load(tiny_path, n_seq_max=1)
    running = erllama.infer(mid, "runs too long", max_tokens=100_000, timeout=0.3)
    queued = erllama.infer(mid, "waits too long", max_tokens=2, timeout=0.2)
    with pytest.raises(errors.RequestTimeout, match="timeout=0.3"):
        running.result()
    with pytest.raises(errors.RequestTimeout, match="queued"):
        queued.result()
    assert len(erllama.complete(mid, "fine", max_tokens=2, timeout=30).tokens) == 2


def test_a_raising_sink_cancels_its_request_not_the_model(app, tiny_path):
    mid = load(tiny_path)
    seen = []

    def bad_sink(ev):
        seen.append(ev)
        raise RuntimeError("the consumer broke")

    erllama.infer(mid, "hello", max_tokens=50, sink=bad_sink)
    wait_until(lambda: any(isinstance(e, erllama.Done) for e in seen), 10, "the request's end")
    assert seen[-1].completion.finish_reason == "cancelled"
    assert len(erllama.complete(mid, "still serving", max_tokens=2).tokens) == 2
    assert erllama.model_info(mid).restarts == 0


def test_request_and_load_options_are_checked(tmp_path, tiny_path):
    with erllama.running(cache_dir=str(tmp_path / "c"), ram_file_dir=str(tmp_path / "s"), ram_quota=0):
        with pytest.raises(errors.ConfigError, match="tier 'ram'"):
            load(tiny_path)
        mid = load(tiny_path, tier="disk")
        with pytest.raises(errors.InvalidParameter, match="max_tokenz"):
            erllama.complete(mid, "hi", max_tokenz=3)


def test_fingerprint_modes(tmp_path, tiny_path):
    import hashlib

    from erllama.cache.fingerprint import file_fingerprint

    cache_dir = tmp_path / "c"
    cache_dir.mkdir()
    fp_file = file_fingerprint(str(tiny_path), "file", cache_dir)
    fp_chunk = file_fingerprint(str(tiny_path), "gguf_chunked", cache_dir)
    assert fp_file == hashlib.sha256(tiny_path.read_bytes()).digest()
    assert fp_chunk != fp_file and len(fp_chunk) == 32
    assert len((cache_dir / "fingerprints.json").read_text()) > 0  # remembered per file identity
    assert file_fingerprint(str(tiny_path), "gguf_chunked", cache_dir) == fp_chunk


def test_a_worker_that_died_while_idle_fails_one_request_then_restarts(app, tiny_path):
    import os
    import signal

    import psutil

    mid = load(tiny_path, isolation="process")
    ok = erllama.complete(mid, "hello", max_tokens=3)
    pid = erllama.model_info(mid).worker_pid
    assert pid and psutil.Process(pid).is_running()
    os.kill(pid, signal.SIGKILL)  # not reaped here: the backend must read the real status
    wait_until(lambda: worker_dead(pid), what="the worker to die")
    with pytest.raises(errors.ModelCrashed):  # the request that finds the worker dead (never hangs)
        erllama.infer(mid, "hello", max_tokens=3).result()
    assert erllama.complete(mid, "hello", max_tokens=3).tokens == ok.tokens
    info = erllama.model_info(mid)
    assert info.restarts == 1 and info.last_exit_signal == "SIGKILL" and info.worker_pid != pid


def test_ram_rows_and_shutdown_saves_outlive_the_application(tmp_path, tiny_path):
    opts = dict(cache_dir=str(tmp_path / "c"), ram_file_dir=str(tmp_path / "s"), policy=POLICY)
    with erllama.running(**opts):
        mid = load(tiny_path, model_id="m")  # tier "ram": the process's own memory
        prompt = erllama.tokenize(mid, "a session that survives a restart " * 3)
        first = erllama.complete(mid, prompt, max_tokens=5, session_id="s")
        context = prompt + list(first.tokens)[:-1]
    # at stop, the ram rows (and the pinned session's shutdown save) moved to ram_file
    with erllama.running(**opts):
        mid = load(tiny_path, model_id="m")
        assert erllama.complete(mid, prompt, max_tokens=5).cache_hit == "exact"
        nxt = erllama.complete(mid, context + [9, 10], max_tokens=2)
        assert nxt.cache_hit == "partial" and nxt.cache_delta.read == len(context)


def test_a_request_sent_as_the_model_dies_runs_on_its_successor(app, tiny_path, monkeypatch):
    mid = load(tiny_path)
    crash_model(monkeypatch, mid)
    # queued behind the crash in the dying actor's inbox: it never ran, so it is resubmitted
    c = erllama.complete(mid, "hello", max_tokens=3)
    assert len(c.tokens) == 3 and erllama.model_info(mid).restarts == 1


def test_a_query_that_finds_the_worker_dead_restarts_the_model(app, tiny_path):
    import os
    import signal

    mid = load(tiny_path, isolation="process")
    ok = erllama.complete(mid, "hello", max_tokens=3)
    pid = erllama.model_info(mid).worker_pid
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: worker_dead(pid), what="the worker to die")
    with pytest.raises(errors.ModelCrashed):
        erllama.embed(mid, "hello")
    assert erllama.complete(mid, "hello", max_tokens=3).tokens == ok.tokens
    assert erllama.model_info(mid).restarts == 1
