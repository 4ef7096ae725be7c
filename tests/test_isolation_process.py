"""``isolation="process"``: a model's backend in its own worker process (issue 6).

Real worker processes and real signals. Most tests drive the tiny model or the stub backend
(``backend="stub"`` runs in a worker too) so that a worker starts in ~0.5 s. Files that make
llama.cpp abort come from ``erllama.testing.malformed.ABORT_CASES`` and are only ever opened
by workers, never by this process.
"""

from __future__ import annotations

import gc
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

import erllama
from erllama import errors
from erllama.backend import wire
from erllama.backend.process import ProcessBackend
from erllama.backend.stub import StubBackend
from erllama.config import ModelConfig
from erllama.testing.malformed import ABORT_CASES

from supervision_helpers import wait_until

TESTS = str(Path(__file__).resolve().parent)
OPTS = dict(n_ctx=1024, n_seq_max=2, n_batch=128, n_threads=1)
PROMPT = "hello world " * 25  # ~300 tokens of the tiny model: above the save policy's min_tokens


def children() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def worker_pids() -> list[int]:
    out = []
    for p in children():
        try:
            if "erllama.backend.worker" in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # a zombie of init's is gone for us
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(autouse=True)
def no_leaked_processes():
    """Every test ends with no child process of ours alive, and no zombie."""
    yield
    wait_until(lambda: not children(), 10, what=lambda: f"no leaked processes: {children()}", step=0.05)


@pytest.fixture
def app(tmp_path):
    with erllama.running(cache_dir=str(tmp_path / "c"), ram_file_dir=str(tmp_path / "shm")) as a:
        yield a


def stub_config(**kw) -> ModelConfig:
    return ModelConfig.build(**{"backend": "stub", "isolation": "process", "n_ctx": 256, "n_seq_max": 2, **kw})


# ---- the backend on its own ---------------------------------------------------------------------


def test_a_stub_worker_answers_like_the_stub_and_raises_the_same_errors():
    cfg = stub_config()
    local, remote = StubBackend("stub", cfg), ProcessBackend("stub", cfg)
    try:
        assert isinstance(remote.pid, int) and remote.pid in worker_pids() and remote.alive
        for name in ("n_vocab", "ftype_name", "n_ctx_seq", "n_seq_max", "n_batch", "n_embd"):
            assert getattr(remote, name) == getattr(local, name), name
        toks = remote.tokenize("hello")
        assert toks == local.tokenize("hello")
        for b in (local, remote):
            assert b.step([(0, toks, True), (1, toks[:2], False)]) == [0]
        s_l, s_r = local.new_sampler({}), remote.new_sampler({})
        assert remote.sample(s_r, 0) == local.sample(s_l, 0)
        np.testing.assert_array_equal(remote.logits(0), local.logits(0))
        assert remote.state_get(0) == local.state_get(0)
        assert remote.state_set(1, local.state_get(0)) == len(toks) and remote.n_past(1) == len(toks)
        np.testing.assert_array_equal(remote.embed(toks), local.embed(toks))
        assert remote.token_piece(toks[1]) == local.token_piece(toks[1]) and remote.is_eog(2)
        for call in (lambda b, s: b.step([(0, [999])]), lambda b, s: b.seq_clear(7),
                     lambda b, s: b.new_sampler({"bogus": 1}), lambda b, s: b.state_set(0, b"junk"),
                     lambda b, s: b.sample_logits(s, np.zeros(3, np.float32))):
            with pytest.raises(errors.ErllamaError) as want:
                call(local, s_l)
            with pytest.raises(type(want.value), match="^" + __import__("re").escape(str(want.value)) + "$"):
                call(remote, s_r)
        remote.free_sampler(s_r)
        remote.free_sampler(s_r)  # idempotent
        with pytest.raises(errors.Released):
            remote.sample(s_r, 0)
        a = remote.load_adapter("/some/lora.gguf")
        remote.set_adapters([(a, 0.5)])
        remote.free_adapter(a)
        with pytest.raises(errors.Released):
            remote.set_adapters([(a, 1.0)])
    finally:
        remote.close()
    remote.close()  # idempotent
    assert remote.exitcode == 0 and remote.exit_signal is None and not remote.alive
    with pytest.raises(errors.Released):
        remote.n_past(0)


def state_fds(pid: int) -> int:
    """Saved-state memfds a worker holds open (distinct files: a map holds a second descriptor)."""
    fds = Path(f"/proc/{pid}/fd")
    return len({fd.stat().st_ino for fd in fds.iterdir() if "erllama-state" in os.readlink(fd)})


def test_large_states_are_shared_read_only_and_restored_by_id():
    cfg = stub_config(n_ctx=1 << 21, n_seq_max=2, n_batch=1 << 20)
    remote = ProcessBackend("stub", cfg)
    try:
        toks = [int(t) for t in np.random.default_rng(0).integers(3, 259, 600_000)]  # a 2.4 MB state
        remote.step([(0, toks, True)])
        blob = remote.state_get(0)
        assert isinstance(blob, mmap.mmap) and len(blob) == 8 + 4 * len(toks)
        assert blob[:4] == b"STUB"
        with pytest.raises(TypeError):
            blob[0] = 0  # the host's map is read-only
        assert memoryview(blob).readonly
        assert remote.state_set(1, memoryview(blob)) == len(toks)  # by id: nothing copied
        assert remote.state_set(1, memoryview(blob)[:]) == len(toks)
        assert remote.state_set(1, bytes(blob)) == len(toks)  # any other buffer: copied through the shared
        # buffer, which grows past its first 1 MiB
        assert remote.n_past(1) == len(toks)
        assert remote.state_get(1) is not blob
        kept = [remote.state_get(0) for _ in range(3)]
        assert state_fds(remote.pid) >= 4
        del blob, kept
        gc.collect()
        assert wait_until(lambda: state_fds(remote.pid) <= 2, 5)  # forgotten: unmapped, two memfds kept for reuse
        s = remote.new_sampler({})
        logits = np.zeros(259, np.float32)
        logits[42] = 1
        assert remote.sample_logits(s, logits) == 42
    finally:
        remote.close()
    buf = wire.SharedBuffer.create("test", 4096)
    other = wire.SharedBuffer(os.dup(buf.fd))
    try:
        data = os.urandom(100_000)
        assert buf.write(data) == len(data)
        assert bytes(other.view(len(data))) == data  # the reader remaps to the grown file
    finally:
        buf.close()
        other.close()


def test_request_abort_reaches_a_step_in_progress(monkeypatch):
    from isolation_helpers import BLOCK

    monkeypatch.setenv("PYTHONPATH", TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    remote = ProcessBackend("stub", stub_config(backend="isolation_helpers:BlockingStub"))
    try:
        timer = threading.Timer(0.3, remote.request_abort)  # another thread, while step blocks in the worker
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(errors.Aborted):
            remote.step([(0, [BLOCK, 5])])
        assert time.monotonic() - t0 < 10
        remote.clear_abort()
        assert remote.step([(0, [5])]) == [0]
        remote.request_abort()  # before the step: the step still sees it
        with pytest.raises(errors.Aborted):
            remote.step([(0, [6])])
        remote.clear_abort()
        assert remote.step([(0, [6])]) == [0]
    finally:
        remote.close()


def test_a_killed_worker_fails_every_call_with_worker_died():
    remote = ProcessBackend("stub", stub_config())
    s = remote.new_sampler({})
    os.kill(remote.pid, signal.SIGKILL)
    with pytest.raises(errors.WorkerDied) as first:
        remote.step([(0, [5])])
    assert isinstance(first.value, errors.ModelCrashed)
    assert first.value.signal == "SIGKILL" and first.value.exitcode is None
    assert "SIGKILL" in str(first.value) and str(remote.pid) in str(first.value) and "'stub'" in str(first.value)
    with pytest.raises(errors.WorkerDied) as second:
        remote.logits(0)
    assert second.value is not first.value
    assert remote.exit_signal == "SIGKILL" and not remote.alive
    remote.free_sampler(s)  # releases and aborts have nothing to do: they do not raise
    remote.request_abort()
    remote.close()
    remote.close()


# ---- files that abort llama.cpp -------------------------------------------------------------------

@pytest.mark.parametrize("case", [k for k, (_, stage, _) in ABORT_CASES.items()
                                  if stage in ("load", "context", "tokenize", "decode")])
def test_an_abort_while_loading_raises_malformed_gguf(app, tmp_path, case):
    """The worker creates the context, tokenizes and decodes once before it reports ready
    (as a probe does), so load, context, tokenize and decode aborts all fail the load."""
    writer, stage, observed = ABORT_CASES[case]
    assert stage in ("load", "context", "tokenize", "decode")
    path = writer(tmp_path / f"{case}.gguf")
    with pytest.raises(errors.MalformedGGUF) as exc:
        erllama.load_model(path, isolation="process", **OPTS)
    msg = str(exc.value)
    # the assert that fires can depend on the context parameters (the worker uses the
    # model's, the table was recorded with the probe's), so only its kind is checked
    assert observed in msg and str(path) in msg and "GGML_ASSERT" in msg
    assert erllama.list_models() == []


@pytest.mark.parametrize("case", ["lora_general_type_not_str", "lora_a_3d"])
def test_an_abort_in_an_adapter_raises_worker_died(tiny_path, tmp_path, case):
    writer, stage, observed = ABORT_CASES[case]
    lora = writer(tmp_path / f"{case}.gguf")
    remote = ProcessBackend(tiny_path, ModelConfig.build(isolation="process", **OPTS))
    try:
        with pytest.raises(errors.WorkerDied) as exc:
            handle = remote.load_adapter(lora)
            assert stage == "adapter_decode"
            remote.set_adapters([(handle, 1.0)])
            remote.step([(0, [1, 5, 9])])
        assert exc.value.signal == observed and "GGML_ASSERT" in str(exc.value)
    finally:
        remote.close()


def test_a_worker_that_keeps_dying_stops_being_restarted(tmp_path, tiny_path):
    with erllama.running(cache_dir=str(tmp_path / "c"), ram_file_dir=str(tmp_path / "shm"),
                         model_intensity=2, model_period=60):
        mid = erllama.load_model(tiny_path, isolation="process", **OPTS)
        for restarts in (1, 2, 2):  # the third death within the period exceeds intensity 2
            stream = erllama.infer(mid, "hello world", max_tokens=100_000)
            next(iter(stream))
            os.kill(erllama.model_info(mid).worker_pid, signal.SIGKILL)
            with pytest.raises(errors.WorkerDied) as crash:
                stream.result()
            assert crash.value.signal == "SIGKILL"
            assert wait_until(lambda: erllama.model_info(mid).restarts == restarts
                              and erllama.model_info(mid).status in ("loaded", "failed"), 20)
        assert wait_until(lambda: erllama.model_info(mid).status == "failed", 20)
        info = erllama.model_info(mid)
        assert info.last_exit_signal == "SIGKILL" and "SIGKILL" in info.last_failure
        with pytest.raises(errors.ModelCrashed, match="not restarted"):
            erllama.complete(mid, "hello", max_tokens=2)
        assert worker_pids() == []
        erllama.unload(mid)


# ---- through the application ----------------------------------------------------------------------

def test_greedy_tokens_and_exact_hits_match_in_process(app, tiny_path):
    inproc = erllama.load_model(tiny_path, model_id="inproc", isolation="none", namespace=b"inproc", **OPTS)
    worker = erllama.load_model(tiny_path, model_id="worker", isolation="process", **OPTS)
    assert len(erllama.tokenize(worker, PROMPT)) > 256
    assert erllama.tokenize(worker, PROMPT) == erllama.tokenize(inproc, PROMPT)
    cold = {m: erllama.complete(m, PROMPT, max_tokens=24) for m in (inproc, worker)}
    assert cold[worker].tokens == cold[inproc].tokens and cold[worker].text == cold[inproc].text
    assert cold[worker].cache_hit == "cold"
    streamed = list(erllama.infer(worker, "hello", max_tokens=12))
    assert [e.id for e in streamed[:-1]] == list(erllama.complete(inproc, "hello", max_tokens=12).tokens)
    assert app.cache.flush(30)
    warm = erllama.complete(worker, PROMPT, max_tokens=24)  # the state comes back through shared memory
    assert warm.cache_hit == "exact" and warm.text == cold[worker].text and warm.tokens == cold[worker].tokens
    assert erllama.model_info(worker).isolation == "process"


def test_a_worker_killed_mid_stream_is_restarted_and_the_cache_still_hits(app, tiny_path):
    mid = erllama.load_model(tiny_path, isolation="process", **dict(OPTS, n_ctx=4096))
    first = erllama.complete(mid, PROMPT, max_tokens=8)
    assert app.cache.flush(30)
    [pid] = worker_pids()
    stream = erllama.infer(mid, "hello", max_tokens=100_000)
    events = iter(stream)
    assert isinstance(next(events), erllama.Token)  # it is generating
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(errors.ModelCrashed):
        for _ in events:
            pass
    assert len(erllama.complete(mid, "hello world", max_tokens=4).tokens) == 4  # after the restart
    [new_pid] = worker_pids()
    assert new_pid != pid and gone(pid)
    again = erllama.complete(mid, PROMPT, max_tokens=8)
    assert again.cache_hit == "exact" and again.tokens == first.tokens
    info = erllama.model_info(mid)
    assert info.restarts == 1 and info.last_exit_signal == "SIGKILL"


def test_unload_and_stop_leave_no_worker(tmp_path, tiny_path):
    with erllama.running(cache_dir=str(tmp_path / "c"), ram_file_dir=str(tmp_path / "shm")):
        a = erllama.load_model(tiny_path, isolation="process", **OPTS)
        erllama.load_model(tiny_path, isolation="process", backend="stub", **OPTS)
        assert len(worker_pids()) == 2
        erllama.unload(a)
        assert len(worker_pids()) == 1 and len(children()) == 1
    assert children() == []


# ---- orphans ----------------------------------------------------------------------------------------

_HOST = textwrap.dedent("""
    import os, sys, time
    from erllama.backend.process import ProcessBackend
    from erllama.config import ModelConfig
    b = ProcessBackend("stub", ModelConfig.build(backend="stub", isolation="process"))
    holder = 0
    if sys.argv[1] == "fork":  # a bare fork keeps the channel open: only the parent check sees the host go
        holder = os.fork()
        if holder == 0:
            time.sleep(60)
            os._exit(0)
    print(b.pid, holder, flush=True)
    time.sleep(60)
""")


@pytest.mark.parametrize("how", ["plain", "fork"])
def test_a_worker_exits_when_its_host_is_killed(how):
    env = dict(os.environ, PYTHONPATH=str(Path(erllama.__file__).resolve().parents[1]))
    host = subprocess.Popen([sys.executable, "-c", _HOST, how], stdout=subprocess.PIPE, text=True, env=env)
    holder = 0
    try:
        worker, holder = map(int, host.stdout.readline().split())
        assert not gone(worker)
        host.kill()
        host.wait()
        wait_until(lambda: gone(worker), 5, what="the orphaned worker to end", step=0.05)
    finally:
        host.kill()
        host.wait()
        host.stdout.close()
        if holder:
            os.kill(holder, signal.SIGKILL)
