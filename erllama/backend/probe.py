"""The ``"probe"`` isolation mode: a short-lived child process opens a GGUF before the host does.

The child (``python -m erllama.backend.probe PATH PARAMS_JSON``, a fresh interpreter, never a
fork of the threaded host) loads the model, creates a small context with the model's
crash-relevant context parameters, tokenizes a short text with ``add_special=True``, decodes
it, samples a token and decodes that token. It prints a ``STAGE`` line before each stage and
one ``RESULT`` JSON line at the end. A clean Python error in the child is re-raised in the
host as the same ``erllama.errors`` class; a child that dies (GGML_ASSERT → SIGABRT, a
segfault, an abnormal exit) becomes :class:`~erllama.errors.MalformedGGUF` naming the signal,
the stage and the last llama.cpp line, and the host never loads the file.

Outcomes are cached per file identity (realpath, size, mtime_ns, inode) and probed parameters,
in ``cache_dir/probes.json`` or, without a cache directory, in this process only.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erllama import errors
from erllama.filestore import file_identity, read_json, write_json

__all__ = ["ProbeResult", "ensure_probed", "probe_file", "probe_params", "probe_stats"]

log = logging.getLogger(__name__)

STAGES = ("load", "context", "tokenize", "decode")
PROBE_N_CTX = 256  # llama.cpp pads a sequence to 256 cells anyway
PROBE_TEXT = "Hello, world"
DEFAULT_TIMEOUT = 300.0
_CRASH_SIGNALS = ("SIGABRT", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL")
_ABORT_WORDS = ("GGML_ASSERT", "GGML_ABORT", "terminate called", "error", "failed")

_lock = threading.Lock()
_memory: dict[str, dict[str, Any]] = {}  # realpath -> {"ident": ..., "results": {params: record}}
_stats = {"children": 0, "cache_hits": 0, "last_seconds": None}


@dataclass(frozen=True)
class ProbeResult:
    """What one probe child reported: ``ok``, or the error class name and message, the stage
    it had reached, its exit status (``signal`` names the signal that killed it), and the wall time."""

    ok: bool
    seconds: float
    stage: str | None = None
    error: str | None = None
    message: str | None = None
    signal: str | None = None
    returncode: int = 0

    def record(self) -> dict[str, Any]:
        """The JSON-able form kept in the probe cache."""
        return {"ok": self.ok, "seconds": round(self.seconds, 4), "stage": self.stage,
                "error": self.error, "message": self.message, "signal": self.signal,
                "returncode": self.returncode}


def probe_params(config: Any) -> dict[str, Any]:
    """The parameters a probe of ``config`` uses; they are part of the cache key. ``n_ctx`` and
    ``n_seq_max`` are fixed small values: they size the KV, not the graph that asserts."""
    return {"n_gpu_layers": config.n_gpu_layers, "n_ubatch": min(config.n_ubatch, PROBE_N_CTX),
            "type_k": config.type_k, "type_v": config.type_v, "flash_attn": config.flash_attn,
            "swa_full": config.swa_full}


def probe_stats() -> dict[str, Any]:
    """Counters of this process: probe ``children`` started, ``cache_hits``, and
    ``last_seconds`` (wall time of the most recent probe child, ``None`` before the first)."""
    with _lock:
        return dict(_stats)


def probe_file(path: str | os.PathLike[str], config: Any, *, timeout: float | None = None) -> ProbeResult:
    """Run one probe child for ``path`` now (no cache) and return what it reported.

    ``timeout`` defaults to ``$ERLLAMA_PROBE_TIMEOUT`` or 300 s; past it the child is killed
    and :class:`~erllama.errors.LoadFailed` is raised.
    """
    if timeout is None:
        timeout = float(os.environ.get("ERLLAMA_PROBE_TIMEOUT", DEFAULT_TIMEOUT))
    params = probe_params(config)
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else root
    env["GGML_NO_BACKTRACE"] = "1"  # ggml would otherwise attach gdb for a backtrace on abort
    args = [sys.executable, "-m", "erllama.backend.probe", os.fspath(path), json.dumps(params)]
    t0 = time.monotonic()
    with _lock:
        _stats["children"] += 1
    try:
        # subprocess.run kills and reaps the child on timeout
        r = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           errors="replace", timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise errors.LoadFailed(f"probe of {os.fspath(path)!r} did not finish within {timeout:g} s "
                                f"(ERLLAMA_PROBE_TIMEOUT); the child was killed") from None
    seconds = time.monotonic() - t0
    with _lock:
        _stats["last_seconds"] = seconds
    stage, report = None, None
    for line in r.stdout.splitlines():
        if line.startswith("STAGE "):
            stage = line[6:].strip()
        elif line.startswith("RESULT "):
            report = json.loads(line[7:])
    if r.returncode == 0 and report is not None:
        result = ProbeResult(report["ok"], seconds, report.get("stage"), report.get("error"), report.get("message"))
    else:
        if r.returncode < 0:
            try:
                how = signal.Signals(-r.returncode).name
            except ValueError:
                how = f"signal {-r.returncode}"
        else:
            how = f"exit code {r.returncode}"
        line = _last_relevant(r.stderr)
        result = ProbeResult(False, seconds, stage, "MalformedGGUF",
                             f"{os.fspath(path)!r}: the probe process died by {how} at stage {stage!r}; "
                             f"the host will not load this file. Last llama.cpp line: {line or '(none)'}",
                             how if r.returncode < 0 else None, r.returncode)
    log.debug("probe of %s: %s in %.3f s", os.fspath(path), "ok" if result.ok else result.error, seconds)
    return result


def ensure_probed(path: str | os.PathLike[str], config: Any, *, cache_dir: str | os.PathLike[str] | None = None) -> None:
    """Return if ``path`` passed a probe under ``config``'s parameters, else raise what it failed with.

    A cached outcome for the same file identity and parameters is used without a child.
    Raises ``FileNotFoundError`` for a missing path, ``MalformedGGUF`` when the child died,
    the child's own ``erllama.errors`` class for a clean failure, and ``LoadFailed`` on timeout.
    """
    ident = file_identity(path)
    real = os.path.realpath(path)
    key = json.dumps(probe_params(config), sort_keys=True)
    store = Path(cache_dir) / "probes.json" if cache_dir is not None else None
    with _lock:
        entry = _load(store).get(real)
        record = entry.get("results", {}).get(key) if entry and entry.get("ident") == ident else None
        if record is not None:
            _stats["cache_hits"] += 1
    if record is None:
        result = probe_file(path, config)
        record = result.record()
        if _cacheable(result):
            with _lock:
                known = _load(store)
                for gone in [p for p in known if not os.path.exists(p)]:
                    del known[gone]
                entry = known.get(real)
                if not entry or entry.get("ident") != ident:  # a changed file: older results are stale
                    entry = known[real] = {"ident": ident, "results": {}}
                entry["results"][key] = record
                _save(store, known)
    if not record["ok"]:
        raise _error(record["error"])(record["message"])


def _cacheable(result: ProbeResult) -> bool:
    # Only outcomes the file's contents decide are kept: success, a clean MalformedGGUF, and a
    # death by a crash signal. Memory or I/O errors, an exit code (a broken environment) or a
    # SIGKILL (the OOM killer, an operator) may not recur, so those are probed again next time.
    if result.returncode == 0:
        return result.ok or result.error == "MalformedGGUF"
    return result.signal in _CRASH_SIGNALS


def _error(name: str | None) -> type[Exception]:
    cls = getattr(errors, name or "", None)
    if isinstance(cls, type) and issubclass(cls, errors.ErllamaError):
        return cls
    builtin = getattr(builtins, name or "", None)
    if isinstance(builtin, type) and issubclass(builtin, OSError):
        return builtin
    return errors.LoadFailed


def _load(store: Path | None) -> dict[str, Any]:
    return _memory if store is None else read_json(store)


def _save(store: Path | None, known: dict[str, Any]) -> None:
    if store is not None:
        write_json(store, known)


def _last_relevant(stderr: str) -> str | None:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    return next((ln for ln in reversed(lines) if any(w in ln for w in _ABORT_WORDS)), lines[-1] if lines else None)


def _child(path: str, params: dict[str, Any]) -> None:
    """The probe itself, in the child: stage markers and one RESULT line on stdout."""
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(message)s")
    logging.getLogger("erllama.llama").setLevel(logging.INFO)  # context for a crash with no assert line
    from erllama.backend.llama import native

    stage = None
    try:
        stage = "load"
        print("STAGE load", flush=True)
        model = native.Model.load(path, n_gpu_layers=params["n_gpu_layers"])
        stage = "context"
        print("STAGE context", flush=True)
        n = params["n_ubatch"]
        ctx = native.Context.create(model, n_ctx=PROBE_N_CTX, n_batch=n, n_ubatch=n, n_seq_max=1,
                                    n_threads=1, type_k=params["type_k"],
                                    type_v=params["type_v"], flash_attn=params["flash_attn"],
                                    swa_full=params["swa_full"])
        stage = "tokenize"
        print("STAGE tokenize", flush=True)
        tokens = model.tokenize(PROBE_TEXT, add_special=True)[:n] or [0]
        stage = "decode"
        print("STAGE decode", flush=True)
        ctx.step([(0, tokens)])
        token = native.Sampler(model).sample(ctx, 0)
        ctx.step([(0, [token])])
        report = {"ok": True}
    except Exception as exc:  # noqa: BLE001 - reported to the host, which re-raises it
        report = {"ok": False, "stage": stage, "error": type(exc).__name__, "message": str(exc)}
    print("RESULT " + json.dumps(report), flush=True)
    sys.stderr.flush()
    os._exit(0)  # the host only needs the report; skip freeing and interpreter teardown


if __name__ == "__main__":
    _child(sys.argv[1], json.loads(sys.argv[2]))
