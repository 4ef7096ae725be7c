"""``isolation="probe"``: a child process opens each new GGUF first, so a file that aborts
llama.cpp raises ``MalformedGGUF`` instead of killing the host.

The aborting files are ``erllama.testing.malformed.ABORT_CASES``; each writer's docstring
says what is wrong with its file and ``ABORT_LOG`` holds the GGML_ASSERT it hits. A probe
reaches the ``load``, ``context``, ``tokenize`` and ``decode`` stages, so those 18 cases are
tested here, each twice: under ``"probe"`` in this process (refused, and we live), and under
``"none"`` in a child interpreter (which dies by the signal), so the test shows that the
isolation is what saves us. The 6 ``adapter_load`` / ``adapter_decode`` cases are LoRA files
for a valid base model: a model probe never opens adapters; ``load_adapter`` runs an adapter
probe of its own (``tests/test_isolation_adapter_probe.py``).

The ``"none"`` children run two at a time on a thread pool while the probe tests go on.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

import erllama
from erllama import _native as native
from erllama import errors
from erllama.backend import probe
from erllama.config import ModelConfig
from erllama.testing import malformed as M

from child_helpers import probe_children

REACHABLE = sorted(name for name, (_, stage, _) in M.ABORT_CASES.items() if stage in probe.STAGES)
OPTS = dict(n_ctx=256, n_batch=64, n_threads=1)
ROOT = str(Path(erllama.__file__).resolve().parents[1])

# In-process load and first completion, in a throwaway interpreter: the "none" mode's fate.
_NONE_CHILD = r"""
import sys, erllama
path, cache = sys.argv[1], sys.argv[2]
erllama.start(cache_dir=cache, ram_file_dir=cache + "/shm")
mid = erllama.load_model(path, isolation="none", n_ctx=256, n_batch=64, n_threads=1)
print("LOADED", flush=True)
erllama.complete(mid, "hello world", max_tokens=2)
print("COMPLETED", flush=True)
erllama.stop()
"""


def _run_none(path: Path, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, GGML_NO_BACKTRACE="1")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-c", _NONE_CHILD, str(path), str(cache)], capture_output=True,
                          text=True, timeout=180, env=env, stdin=subprocess.DEVNULL)


@pytest.fixture(autouse=True)
def no_probe_child_left():
    yield
    assert probe_children() == []


@pytest.fixture(scope="module")
def abort_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("abort")
    return {name: M.ABORT_CASES[name][0](d / f"{name}.gguf") for name in REACHABLE}


@pytest.fixture(scope="module")
def none_runs(abort_files, tmp_path_factory):
    """Every reachable abort file loaded with ``isolation="none"`` in a child, 2 at a time."""
    root = tmp_path_factory.mktemp("none")
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {name: pool.submit(_run_none, path, root / name) for name, path in abort_files.items()}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def tiny_copy(tiny_path, tmp_path):
    """A private copy of the tiny model: its own file identity, so its own probe."""
    return Path(shutil.copyfile(tiny_path, tmp_path / "tiny.gguf"))


def _children() -> int:
    return probe.probe_stats()["children"]


def test_the_reachable_cases():
    assert len(REACHABLE) == 18
    rest = {stage for name, (_, stage, _) in M.ABORT_CASES.items() if name not in REACHABLE}
    assert rest == {"adapter_load", "adapter_decode"}


@pytest.mark.parametrize("name", REACHABLE)
def test_abort_file_is_refused_under_probe_and_kills_under_none(name, app_dir, abort_files, none_runs):
    """``ABORT_CASES[name]``: under "probe" the host gets MalformedGGUF naming the signal, the
    stage and the assert and never loads the file; under "none" the interpreter dies."""
    _, stage, observed = M.ABORT_CASES[name]
    path = abort_files[name]
    with pytest.raises(errors.MalformedGGUF) as info:
        erllama.load_model(path, model_id=name, isolation="probe", **OPTS)
    msg = str(info.value)
    assert str(path) in msg and f"died by {observed}" in msg and f"stage {stage!r}" in msg, msg
    assert M.ABORT_LOG[name] in msg, msg
    assert name not in [m.id for m in erllama.list_models()]

    r = none_runs[name].result()
    assert r.returncode == -getattr(signal, observed), (r.returncode, r.stderr[-2000:])
    assert M.ABORT_LOG[name] in r.stderr
    # load/context abort inside load_model; tokenize/decode at the first completion
    assert ("LOADED" in r.stdout) == (stage in ("tokenize", "decode")), r.stdout
    assert "COMPLETED" not in r.stdout


def test_good_model_loads_under_probe_and_serves(app_dir, tiny_copy):
    n = _children()
    mid = erllama.load_model(tiny_copy, isolation="probe", **OPTS)
    ref = erllama.load_model(tiny_copy, isolation="none", **OPTS)
    try:
        assert _children() == n + 1
        c = erllama.complete(mid, "hello world", max_tokens=4)
        assert len(c.tokens) == 4
        assert c.tokens == erllama.complete(ref, "hello world", max_tokens=4).tokens
        assert erllama.model_info(mid).isolation == "probe"
        assert probe.probe_stats()["last_seconds"] > 0
    finally:
        erllama.unload(mid)
        erllama.unload(ref)


def test_probe_cache(app_dir, tiny_copy, abort_files, tmp_path):
    """A reload of the same file identity spawns no child; a modified file is probed again;
    a failed file fails again from the cache; other context parameters are their own entry."""
    n = _children()
    erllama.unload(erllama.load_model(tiny_copy, **OPTS))   # the default isolation is "probe"
    erllama.unload(erllama.load_model(tiny_copy, **OPTS))
    assert _children() == n + 1
    st = tiny_copy.stat()
    os.utime(tiny_copy, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    erllama.unload(erllama.load_model(tiny_copy, **OPTS))
    assert _children() == n + 2
    erllama.unload(erllama.load_model(tiny_copy, swa_full=True, **OPTS))
    assert _children() == n + 3
    assert (app_dir / "probes.json").is_file()

    bad = Path(shutil.copyfile(abort_files["embd_odd_head_dim"], tmp_path / "bad.gguf"))
    with pytest.raises(errors.MalformedGGUF) as first:
        erllama.load_model(bad, **OPTS)
    hits = probe.probe_stats()["cache_hits"]
    t0 = time.monotonic()
    with pytest.raises(errors.MalformedGGUF) as again:
        erllama.load_model(bad, **OPTS)
    print(f"cached failure raised in {1000 * (time.monotonic() - t0):.1f} ms")
    assert str(again.value) == str(first.value)
    assert _children() == n + 4 and probe.probe_stats()["cache_hits"] == hits + 1


def test_in_process_cache_without_cache_dir(tiny_copy):
    cfg = ModelConfig(**OPTS)
    n = _children()
    probe.ensure_probed(tiny_copy, cfg)
    probe.ensure_probed(tiny_copy, cfg)
    assert _children() == n + 1


@pytest.mark.parametrize("case", ["bad_magic", "text_file", "truncated_tensor_data", "unknown_architecture"])
def test_clean_load_error_is_reraised_as_the_same_class(case, app_dir, tmp_path):
    """``malformed.ALL_CASES`` files fail cleanly, so loading one here is safe: the probe's
    error has the class and message the in-process load raises."""
    path = M.ALL_CASES[case](tmp_path / f"{case}.gguf")
    with pytest.raises(errors.LoadFailed) as direct:
        native.Model.load(str(path))
    n = _children()
    with pytest.raises(errors.LoadFailed) as probed:
        erllama.load_model(path, isolation="probe", **OPTS)
    assert type(probed.value) is type(direct.value)
    assert str(probed.value) == str(direct.value)
    assert _children() == n + 1


def test_missing_file_spawns_no_child(app_dir, tmp_path):
    n = _children()
    with pytest.raises(FileNotFoundError):
        erllama.load_model(tmp_path / "missing.gguf", isolation="probe", **OPTS)
    with pytest.raises(FileNotFoundError):
        probe.ensure_probed(tmp_path / "missing.gguf", ModelConfig())
    assert _children() == n


def test_timeout_kills_the_child_and_is_not_cached(tiny_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("ERLLAMA_PROBE_TIMEOUT", "0.01")
    cfg = ModelConfig(**OPTS)
    with pytest.raises(errors.LoadFailed, match="did not finish within 0.01 s"):
        probe.ensure_probed(tiny_copy, cfg, cache_dir=tmp_path)
    assert probe_children() == []
    monkeypatch.delenv("ERLLAMA_PROBE_TIMEOUT")
    n = _children()
    probe.ensure_probed(tiny_copy, cfg, cache_dir=tmp_path)
    assert _children() == n + 1


def test_no_child_process_is_left(none_runs):
    for f in none_runs.values():
        f.result()
    assert psutil.Process().children(recursive=True) == []
