"""Shared fixtures: the tiny synthetic models (written here), the default real model, the leak
checks (native objects per test, threads per module)."""

from __future__ import annotations

import gc
import glob
import importlib.util
import os
import shutil
import threading

import pykka
import pytest
from hypothesis import HealthCheck, settings

from erllama import _native as native
from erllama.testing.tinymodel import write_tiny_lora, write_tiny_model

from supervision_helpers import wait_until

# The suite gates CI on a shared, noisy machine: the same examples every run and no
# per-example deadline. HYPOTHESIS_PROFILE=explore draws new examples each run.
settings.register_profile("erllama", derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "erllama"))


@pytest.fixture(scope="session", autouse=True)
def _no_ram_file_dirs_left():
    """Applications on a temporary cache_dir without a ram_file_dir make their own
    /dev/shm/erllama-<uid>-<hash> (derived from the cache_dir): remove the ones this
    session made, so tmpfs (memory) does not fill up run after run."""
    pattern = f"/dev/shm/erllama-{os.getuid()}-*"
    before = set(glob.glob(pattern))
    yield
    for d in set(glob.glob(pattern)) - before:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    """A tiny llama GGUF written by the test session itself."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_chatml_path(tmp_path_factory):
    """The tiny model with ChatML tokens and a ChatML chat template."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-chatml.gguf", chatml=True)


@pytest.fixture(scope="session")
def tiny_lora_path(tmp_path_factory):
    """A LoRA adapter for the tiny model."""
    return write_tiny_lora(tmp_path_factory.mktemp("models") / "tiny-lora.gguf")


@pytest.fixture(scope="session")
def tiny_model(tiny_path):
    """A tiny model shared by the session (tests must not free it)."""
    model = native.Model.load(tiny_path)
    yield model
    model.free()


@pytest.fixture
def tiny_ctx(tiny_model):
    """A fresh 2-sequence context on the tiny model, freed after the test."""
    ctx = native.Context.create(tiny_model, n_ctx=512, n_batch=512, n_seq_max=2, n_threads=1)
    yield ctx
    ctx.free()


@pytest.fixture(scope="session")
def gemma_path():
    """The default real model (Gemma 3 270M Q4_K_M), assembled from its PyPI package; the
    tests that use it are skipped, saying why, where that package is not installed."""
    from erllama.default_model import DEFAULT_MODEL_PACKAGE, default_model_path

    if importlib.util.find_spec(DEFAULT_MODEL_PACKAGE.replace("-", "_")) is None:
        pytest.skip(f"the default model's package {DEFAULT_MODEL_PACKAGE!r} is not installed "
                    f"(pip install 'erllama[test]')")
    return default_model_path()


@pytest.fixture(scope="session")
def gemma(gemma_path):
    """Gemma loaded once for the session (tests must not free it)."""
    model = native.Model.load(gemma_path)
    yield model
    model.free()


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory):
    """The application started once for a test module (default configuration, private cache
    and ram_file directories); yields its cache directory."""
    import erllama

    d = tmp_path_factory.mktemp("app")
    erllama.start(cache_dir=str(d / "c"), ram_file_dir=str(d / "shm"))
    yield d / "c"
    erllama.stop()


@pytest.fixture
def cache_app(tmp_path):
    """An application of the test's own (private cache and ram_file directories) whose save
    policy keeps prompts of 16 tokens and more, with the cache counters zeroed."""
    import erllama
    import erllama.cache

    with erllama.running(cache_dir=str(tmp_path / "c"), ram_file_dir=str(tmp_path / "shm"),
                         policy={"min_tokens": 16, "cold_min_tokens": 16}) as a:
        erllama.cache.reset_counters()
        yield a


# threads that live as long as the process by design, not per application or test:
# name prefix → why (anything else a test module leaves running fails it)
PROCESS_WIDE_THREADS = {
    "erllama-aio": "erllama/aio.py's pool for the short calls (tokenize, embed, load_model), kept for the process",
    "erllama-crc": "erllama/cache/tiers.py's CRC helper pool, created on first use, kept for the process",
}


@pytest.fixture(scope="module", autouse=True)
def no_thread_leaks(request):
    """Every test module ends with no thread of its own still running (actors, writer pools,
    worker readers: every non-daemon thread it started; daemon timers end on their own).
    Module-scoped, so module-scoped fixtures such as ``app_dir`` are torn down first."""
    before = set(threading.enumerate())
    yield

    def left() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t not in before and not t.daemon and t.is_alive()
                and not t.name.startswith(tuple(PROCESS_WIDE_THREADS))]

    try:
        wait_until(lambda: not left(), 10, step=0.01)
    except AssertionError:
        names = sorted(t.name for t in left())
        pykka.ActorRegistry.stop_all(timeout=5)  # so that one leak does not fail later modules
        pytest.fail(f"{request.module.__name__} left threads running: {names}", pytrace=False)


@pytest.fixture(autouse=True)
def no_native_leaks():
    """Every test leaves as many live native objects as it found (uvloop-style leak check)."""
    gc.collect()
    before = native.live_objects()
    yield
    gc.collect()
    after = native.live_objects()
    assert after == before, f"native objects leaked: before {before}, after {after}"
