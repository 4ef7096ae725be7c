"""The runtime self-check: does this build decode a known-good model on this CPU?

A child process (``python -m erllama.backend.selfcheck DIR``, a fresh interpreter) writes the
known-good model of :func:`erllama.testing.tinymodel.write_known_good_model` (weights in Q4_0,
Q4_K, Q6_K, Q8_0 and F16, the types common GGUFs use), loads it, creates a context with two
sequences, tokenizes, decodes a one-row and a two-row batch, samples and decodes the sampled
tokens. It prints a ``STAGE`` line before each stage and one ``RESULT`` line at the end.

The outcome is kept per *runtime* (the build's facts and this CPU, :func:`runtime_id`) in
this process and in ``$XDG_CACHE_HOME/erllama-runtime/`` (``~/.cache/erllama-runtime``), so
the child runs once per build and CPU. Outcomes that may not recur (a timeout, SIGKILL, an
abnormal exit) are not kept.

When a probe child or a worker dies on a model file, :func:`blame` runs the self-check
before the file is blamed: if the known-good model dies too, the build is broken on this
CPU and :class:`~erllama.errors.RuntimeBroken` is raised instead of ``MalformedGGUF``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from erllama import errors
from erllama.backend import faults
from erllama.backend.child import CRASH_SIGNALS, child_env, env_seconds, how_it_died, read_report, telling_line
from erllama.filestore import read_json, write_json

__all__ = ["SelfCheck", "blame", "cache_path", "run_selfcheck", "runtime_id", "selfcheck"]

log = logging.getLogger(__name__)

STAGES = ("write", "load", "context", "tokenize", "decode", "decode_batch")
DEFAULT_TIMEOUT = 120.0
_lock = threading.Lock()
_memory: dict[str, SelfCheck] = {}


@dataclass(frozen=True)
class SelfCheck:
    """One self-check outcome: ``ok``; else the ``stage`` reached, ``signal`` (the name of the
    signal that killed the child) or ``returncode``, and ``message``. ``cached`` says whether
    it came from the cache rather than a child started now."""

    ok: bool
    seconds: float
    stage: str | None = None
    signal: str | None = None
    returncode: int = 0
    message: str | None = None
    runtime: str = ""
    cached: bool = False

    @property
    def conclusive(self) -> bool:
        """True when the outcome says something about the runtime: it passed, it died by a
        crash signal, it exited abnormally (the installation is broken), or llama.cpp failed
        cleanly on the known-good model. A timeout or a SIGKILL/SIGTERM (the OOM killer, an
        operator) says nothing either way."""
        if self.ok or self.signal in CRASH_SIGNALS or self.returncode > 0:
            return True
        return self.returncode == 0 and self.stage in STAGES[1:]

    @property
    def durable(self) -> bool:
        """True when the outcome is the build's and CPU's alone and may be cached: a pass, a
        crash signal, or a clean llama.cpp failure. An abnormal exit (a package missing from
        the environment, say) is conclusive but may be fixed without a rebuild."""
        return self.ok or self.signal in CRASH_SIGNALS or (self.returncode == 0 and self.stage in STAGES[1:])

    def record(self) -> dict[str, Any]:
        """The JSON-able form (kept in the cache, shown by ``erllama doctor``)."""
        out = asdict(self)
        out["seconds"] = round(self.seconds, 4)
        return out


def runtime_id() -> str:
    """A digest of what decides whether decoding works: the build's facts (source, CMake
    arguments, cache key) and this CPU (model name and feature flags)."""
    from erllama import sysinfo

    facts = {"build": sysinfo.build_info(), "cpu": sysinfo.cpu_model(), "flags": sorted(sysinfo.cpu_flags()),
             "crash": faults.crash_requested()}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:20]


def cache_path() -> Path:
    """Where self-check outcomes are kept: ``$ERLLAMA_RUNTIME_CACHE`` or
    ``$XDG_CACHE_HOME/erllama-runtime/selfcheck.json``."""
    env = os.environ.get("ERLLAMA_RUNTIME_CACHE")
    if env:
        return Path(env).expanduser() / "selfcheck.json"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "erllama-runtime" / "selfcheck.json"


def run_selfcheck(*, timeout: float | None = None) -> SelfCheck:
    """Run the self-check child now (no cache) and return its outcome.

    ``timeout`` defaults to ``$ERLLAMA_SELFCHECK_TIMEOUT`` or 120 s; a child past it is killed
    and the outcome is inconclusive.
    """
    if timeout is None:
        timeout = env_seconds("ERLLAMA_SELFCHECK_TIMEOUT", DEFAULT_TIMEOUT)
    rid = runtime_id()
    env = child_env()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="erllama-selfcheck-") as d:
        args = [sys.executable, "-m", "erllama.backend.selfcheck", d]
        try:
            r = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               errors="replace", timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return SelfCheck(False, time.monotonic() - t0, None, None, -1,
                             f"the self-check did not finish within {timeout:g} s", rid)
    seconds = time.monotonic() - t0
    stage, report = read_report(r.stdout)
    if r.returncode == 0 and report is not None:
        return SelfCheck(report["ok"], seconds, report.get("stage"), None, 0, report.get("message"), rid)
    how = how_it_died(r.returncode) if r.returncode < 0 else None
    died = f"died by {how}" if how else f"exited with code {r.returncode}"
    return SelfCheck(False, seconds, stage, how, r.returncode,
                     f"the self-check child {died} at stage {stage!r}; "
                     f"last llama.cpp line: {telling_line(r.stderr.splitlines()) or '(none)'}",
                     rid)


def selfcheck(*, refresh: bool = False) -> SelfCheck:
    """The self-check outcome of this runtime: from this process's memory, the on-disk cache,
    or a child started now (``refresh=True`` always starts one). Durable outcomes are kept."""
    rid = runtime_id()
    store = cache_path()
    with _lock:
        if not refresh:
            if rid in _memory:
                return _memory[rid]
            rec = read_json(store).get(rid)
            if isinstance(rec, dict):
                try:
                    got = SelfCheck(**{**rec, "cached": True})
                except TypeError:
                    got = None
                if got is not None:
                    _memory[rid] = got
                    return got
        result = run_selfcheck()
        if result.durable:
            _memory[rid] = result
            try:
                known = read_json(store)
                known[rid] = result.record()
                write_json(store, known)
            except OSError as exc:  # a read-only home: the process memory still holds it
                log.debug("self-check outcome not stored in %s: %s", store, exc)
    return result


def blame(subject: str, how: str, stage: str | None) -> None:
    """Called when a child died on ``subject`` (a model or adapter file) by ``how`` at
    ``stage``: raise :class:`~erllama.errors.RuntimeBroken` when the known-good model dies
    too (the build is broken on this CPU, not the file); return when the self-check passed
    or was inconclusive, and the caller blames the file."""
    result = selfcheck()
    if result.ok or not result.conclusive:
        if not result.ok:
            log.warning("the runtime self-check was inconclusive (%s); blaming %s", result.message, subject)
        return
    from erllama import sysinfo

    compiled = sysinfo.compiled_features()
    on = ", ".join(k for k, v in compiled.items() if v) or "(none reported)"
    raise errors.RuntimeBroken(
        f"this erllama build cannot decode on this CPU: {subject} died by {how} at stage {stage!r}, and so "
        f"did the known-good self-check model ({result.message}). The file is not to blame. "
        f"CPU: {sysinfo.cpu_model()}; compiled in: {on}. What to do: run `erllama doctor`; rebuild "
        f"without the optional kernels (unset ERLLAMA_AMX, remove custom ERLLAMA_CMAKE_ARGS) or with "
        f"-DGGML_NATIVE=OFF in ERLLAMA_CMAKE_ARGS, then reinstall.",
        signal=result.signal, stage=result.stage, features=sorted(k for k, v in compiled.items() if v))


def _child(workdir: str) -> None:
    """The self-check itself, in the child: stage markers and one RESULT line on stdout."""
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(message)s")
    stage = None
    try:
        stage = "write"
        print("STAGE write", flush=True)
        from erllama.testing.tinymodel import write_known_good_model

        path = write_known_good_model(Path(workdir) / "known-good.gguf")
        from erllama.backend.llama import native

        stage = "load"
        print("STAGE load", flush=True)
        model = native.Model.load(str(path))
        stage = "context"
        print("STAGE context", flush=True)
        ctx = native.Context.create(model, n_ctx=512, n_batch=64, n_ubatch=64, n_seq_max=2, n_threads=2)
        stage = "tokenize"
        print("STAGE tokenize", flush=True)
        tokens = model.tokenize("hello world, the cat and the dog", add_special=True)
        stage = "decode"
        print("STAGE decode", flush=True)
        faults.crash_point("decode")
        ctx.step([(0, tokens)])
        sampler = native.Sampler(model)
        first = sampler.sample(ctx, 0)
        stage = "decode_batch"
        print("STAGE decode_batch", flush=True)
        ctx.step([(0, [first]), (1, tokens[:5])])
        sampler.sample(ctx, 0)
        sampler.sample(ctx, 1)
        report: dict[str, Any] = {"ok": True}
    except Exception as exc:  # noqa: BLE001 - reported to the host
        report = {"ok": False, "stage": stage, "message": f"{type(exc).__name__}: {exc}"}
    print("RESULT " + json.dumps(report), flush=True)
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    _child(sys.argv[1])
