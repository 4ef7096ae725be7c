"""The runtime's own health: what the build compiled in (AMX off by default), the self-check
that tells a broken runtime from a bad file, ``erllama doctor``, and ``RuntimeBroken``.

A broken runtime is simulated with the test-only switch ``ERLLAMA_TEST_CRASH=decode:SIGSEGV``
(``erllama.backend.faults``): every child process (probe, self-check, worker) kills itself
by SIGSEGV where it would decode, as a build with a defective kernel does on some CPUs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import erllama
from erllama import errors, sysinfo
from erllama.backend import probe, selfcheck
from erllama.config import ModelConfig
from erllama.testing import malformed as M

ROOT = Path(__file__).resolve().parent.parent
X86 = platform.machine().lower() in ("x86_64", "amd64")
CPU_HAS_AMX = "amx_int8" in sysinfo.cpu_flags()
OPTS = dict(n_ctx=256, n_batch=64, n_threads=1)


def load_setup():
    spec = importlib.util.spec_from_file_location("erllama_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def runtime_cache(tmp_path, monkeypatch):
    """A private self-check cache, and no outcome remembered from earlier tests."""
    monkeypatch.setenv("ERLLAMA_RUNTIME_CACHE", str(tmp_path / "runtime"))
    monkeypatch.setattr(selfcheck, "_memory", {})
    return tmp_path / "runtime"


@pytest.fixture
def broken_runtime(runtime_cache, monkeypatch):
    """Every child process dies by SIGSEGV where it would decode."""
    monkeypatch.setenv("ERLLAMA_TEST_CRASH", "decode:SIGSEGV")


# ---- what the build compiled in ----------------------------------------------------------------

def test_default_build_has_no_amx_kernels():
    """The library's own system info: no AMX kernels in the default build, on any CPU (on an
    AMX CPU, -march=native would otherwise compile them in: llama.cpp#20824)."""
    info = sysinfo.system_info(check=False)
    assert info["amx"]["requested"] is False, "this suite checks the default build (ERLLAMA_AMX unset)"
    assert info["compiled"]["AMX_INT8"] is False
    assert "AMX_INT8 = 1" not in info["llama_cpp"]
    assert info["amx"]["cpu_has"] is CPU_HAS_AMX
    if X86:
        assert info["build"]["no_amx_flags"] is True
        assert any("-mno-amx-int8" in a for a in info["build"]["cmake_args"])


def test_default_build_keeps_the_other_native_features():
    compiled = sysinfo.compiled_features()
    flags = sysinfo.cpu_flags()
    if X86:
        for cpu_flag, ggml_name in (("avx2", "AVX2"), ("avx512f", "AVX512"), ("avx512_vnni", "AVX512_VNNI"),
                                    ("fma", "FMA")):
            if cpu_flag in flags:
                assert compiled.get(ggml_name) is True, f"{ggml_name} lost although the CPU has {cpu_flag}"
    assert compiled.get("REPACK") is True


@pytest.mark.skipif(not CPU_HAS_AMX, reason="needs a CPU with AMX (amx_int8 in /proc/cpuinfo)")
def test_on_an_amx_cpu_the_default_build_decodes_q4_k(gemma):
    """On an AMX CPU the default build decodes Gemma's Q4_K_M weights (the crashing path)."""
    from erllama import _native as native

    ctx = native.Context.create(gemma, n_ctx=512, n_batch=512, n_seq_max=2, n_threads=2)
    try:
        ctx.step([(0, gemma.tokenize("The capital of France is", add_special=True))])
        assert native.Sampler(gemma).sample(ctx, 0) >= 0
    finally:
        ctx.free()


def test_amx_switch_refuses_an_unclear_value(monkeypatch):
    setup = load_setup()
    monkeypatch.setenv("ERLLAMA_AMX", "maybe")
    with pytest.raises(setup.BuildError, match="ERLLAMA_AMX='maybe' is neither on"):
        setup.cmake_args()
    monkeypatch.setenv("ERLLAMA_AMX", "off")
    assert not setup.amx_requested()


def _defines(cc: str, flags: list[str]) -> set[str]:
    out = subprocess.run([cc, *flags, "-dM", "-E", "-x", "c", os.devnull], capture_output=True, text=True,
                         check=True).stdout
    return {line.split()[1] for line in out.splitlines() if line.startswith("#define")}


def _cflags(args: list[str]) -> list[str]:
    for a in args:
        if a.startswith("-DCMAKE_C_FLAGS="):
            return a.split("=", 1)[1].split()
    return []


@pytest.mark.skipif(not X86, reason="AMX is an x86-64 feature")
def test_amx_switch_at_flag_level(monkeypatch):
    """ERLLAMA_AMX=1 drops the -mno-amx flags (and is another build-cache key); with them, a
    compiler targeting an AMX CPU (Sapphire Rapids, as -march=native does there) does not
    define __AMX_INT8__, so ggml's AMX kernels (#if defined(__AMX_INT8__)) are not compiled."""
    setup = load_setup()
    monkeypatch.delenv("ERLLAMA_CMAKE_ARGS", raising=False)
    monkeypatch.delenv("ERLLAMA_AMX", raising=False)
    default = setup.cmake_args()
    monkeypatch.setenv("ERLLAMA_AMX", "1")
    opted = setup.cmake_args()
    assert _cflags(default) == setup.NO_AMX_FLAGS.split() and _cflags(opted) == []
    assert default != opted  # the choice is part of the build-cache key (which hashes the args)
    cc = shutil.which("cc") or shutil.which("gcc")
    march = ["-march=sapphirerapids"]
    assert "__AMX_INT8__" in _defines(cc, march + _cflags(opted))
    off = _defines(cc, _cflags(default) + march)  # CMake puts CMAKE_C_FLAGS before -march=native
    assert not {"__AMX_INT8__", "__AMX_TILE__", "__AMX_BF16__"} & off
    assert {"__AVX512F__", "__AVX512VNNI__"} <= off  # the other native features stay


# ---- the self-check ------------------------------------------------------------------------------

def test_selfcheck_passes_and_is_cached(runtime_cache):
    first = selfcheck.selfcheck(refresh=True)
    assert first.ok and not first.cached and first.stage is None, first
    stored = json.loads((runtime_cache / "selfcheck.json").read_text())
    assert stored[selfcheck.runtime_id()]["ok"] is True
    selfcheck._memory.clear()
    again = selfcheck.selfcheck()
    assert again.ok and again.cached  # from the file: no child this time


def test_selfcheck_of_a_broken_runtime_names_the_signal_and_stage(broken_runtime):
    result = selfcheck.selfcheck()
    assert not result.ok and result.conclusive
    assert result.signal == "SIGSEGV" and result.stage == "decode"
    assert "SIGSEGV" in result.message


def test_which_outcomes_blame_the_runtime_and_which_are_cached():
    S = selfcheck.SelfCheck
    crash, env, clean = S(False, 0.1, "decode", "SIGSEGV", -11), S(False, 0.1, "write", None, 1), S(False, 0.1, "load")
    killed, timeout = S(False, 0.1, "decode", "SIGKILL", -9), S(False, 120.0, None, None, -1)
    assert [x.conclusive for x in (crash, env, clean, killed, timeout)] == [True, True, True, False, False]
    assert [x.durable for x in (crash, env, clean, killed, timeout)] == [True, False, True, False, False]


@pytest.mark.parametrize("var", ["ERLLAMA_SELFCHECK_TIMEOUT", "ERLLAMA_PROBE_TIMEOUT"])
def test_a_bad_child_timeout_is_a_config_error(var, monkeypatch, tiny_path, tmp_path, runtime_cache):
    monkeypatch.setenv(var, "soon")
    with pytest.raises(errors.ConfigError, match=f"{var} must be a positive number of seconds, got 'soon'"):
        if var == "ERLLAMA_SELFCHECK_TIMEOUT":
            selfcheck.run_selfcheck()
        else:
            probe.ensure_probed(tiny_path, ModelConfig(isolation="probe", **OPTS), cache_dir=tmp_path)


def test_probe_on_a_broken_runtime_raises_runtime_broken(broken_runtime, tiny_path, tmp_path):
    """A valid file whose probe dies, on a runtime whose known-good model dies too: the
    runtime is blamed (RuntimeBroken, not MalformedGGUF), and nothing is cached for the file."""
    cfg = ModelConfig(isolation="probe", **OPTS)
    with pytest.raises(errors.RuntimeBroken) as ei:
        probe.ensure_probed(tiny_path, cfg, cache_dir=tmp_path)
    exc = ei.value
    assert not isinstance(exc, errors.MalformedGGUF) and isinstance(exc, errors.NativeError)
    assert exc.signal == "SIGSEGV" and exc.stage == "decode"
    assert "known-good" in str(exc) and "erllama doctor" in str(exc) and str(tiny_path) in str(exc)
    assert not (tmp_path / "probes.json").exists() or str(tiny_path) not in (tmp_path / "probes.json").read_text()


def test_load_model_on_a_broken_runtime_probe_and_process(broken_runtime, tiny_path, tmp_path):
    with erllama.running(cache_dir=str(tmp_path / "cache"), ram_file_dir=str(tmp_path / "shm")):
        for isolation in ("probe", "process"):
            with pytest.raises(errors.RuntimeBroken, match="SIGSEGV"):
                erllama.load_model(tiny_path, isolation=isolation, **OPTS)
        assert erllama.list_models() == []


def test_malformed_files_still_blame_the_file(runtime_cache, tmp_path):
    """A crash on a bad file while the known-good model passes stays MalformedGGUF."""
    decode_case = next(n for n, (_, st, _) in M.ABORT_CASES.items() if st == "decode")
    load_case = next(n for n, (_, st, _) in M.ABORT_CASES.items() if st == "load")
    with erllama.running(cache_dir=str(tmp_path / "cache"), ram_file_dir=str(tmp_path / "shm")):
        for name in (decode_case, load_case):
            path = M.ABORT_CASES[name][0](tmp_path / f"{name}.gguf")
            for isolation in ("probe", "process"):
                with pytest.raises(errors.MalformedGGUF):
                    erllama.load_model(path, isolation=isolation, **OPTS)
    assert selfcheck.selfcheck().ok


# ---- erllama doctor ------------------------------------------------------------------------------

def _doctor(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "erllama.cli", "doctor", *args], capture_output=True, text=True,
                          timeout=180, env={**os.environ, **(env or {})}, cwd=ROOT)


def test_doctor_reports_the_runtime(runtime_cache):
    r = _doctor("--json", env={"ERLLAMA_RUNTIME_CACHE": str(runtime_cache)})
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["selfcheck"]["ok"] is True
    assert info["build"]["source"].startswith(("sdist-", "tree-"))
    assert len(info["build"]["cache_key"]) == 20 and info["build"]["cache_key"] in info["build"]["cache_dir"]
    assert "CPU" in info["llama_cpp"] and info["cpu"]["model"]
    assert info["amx"] == {"cpu_has": CPU_HAS_AMX, "compiled": False, "requested": False}
    text = _doctor(env={"ERLLAMA_RUNTIME_CACHE": str(runtime_cache)})
    assert text.returncode == 0 and "self-check  ok" in text.stdout and "build key" in text.stdout


def test_doctor_fails_on_a_broken_runtime(runtime_cache):
    r = _doctor(env={"ERLLAMA_RUNTIME_CACHE": str(runtime_cache), "ERLLAMA_TEST_CRASH": "decode:SIGSEGV"})
    assert r.returncode == 1
    assert "self-check  FAILED at stage 'decode'" in r.stdout and "SIGSEGV" in r.stdout
