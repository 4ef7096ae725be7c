"""The ``"probe"`` isolation mode: a short-lived child process opens a GGUF before the host does.

The child (``python -m erllama.backend.probe PATH PARAMS_JSON``, a fresh interpreter, never a
fork of the threaded host) loads the model, creates a small context with the model's
crash-relevant context parameters, tokenizes a short text with ``add_special=True``, decodes
it, samples a token and decodes that token. It prints a ``STAGE`` line before each stage and
one ``RESULT`` JSON line at the end. A clean Python error in the child is re-raised in the
host as the same ``erllama.errors`` class; a child that dies (GGML_ASSERT → SIGABRT, a
segfault, an abnormal exit) becomes :class:`~erllama.errors.MalformedGGUF` naming the signal,
the stage and the last llama.cpp line, and the host never loads the file.

An adapter probe (``python -m erllama.backend.probe MODEL PARAMS_JSON ADAPTER``, run by
:func:`ensure_adapter_probed` before ``load_adapter`` under ``"probe"``) loads the model and the
LoRA (stage ``adapter_load``), creates the same small context, applies the adapter at scale 1.0
and decodes, samples and decodes (stage ``adapter_decode``). Its outcomes are reported the same
way. Every death of a probe child, model or adapter, is classified by one function,
:func:`_died`.

Outcomes are cached per file identity (realpath, size, mtime_ns, inode, ctime_ns) and probed parameters
(for an adapter: the adapter's identity, the model's realpath and identity, and the parameters),
in ``cache_dir/probes.json`` or, without a cache directory, in this process only.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erllama import errors
from erllama.backend import faults, selfcheck
from erllama.backend.child import CRASH_SIGNALS, child_env, env_seconds, how_it_died, read_report, telling_line
from erllama.filestore import file_identity, read_json, write_json

__all__ = ["ProbeResult", "ensure_adapter_probed", "ensure_probed", "probe_adapter_file", "probe_file",
           "probe_params", "probe_stats"]

log = logging.getLogger(__name__)

STAGES = ("load", "context", "tokenize", "decode")
ADAPTER_STAGES = ("load", "adapter_load", "context", "tokenize", "adapter_decode")  # with an adapter
PROBE_N_CTX = 256  # llama.cpp pads a sequence to 256 cells anyway
PROBE_TEXT = "Hello, world"
DEFAULT_TIMEOUT = 300.0

_lock = threading.Lock()
_memory: dict[str, dict[str, Any]] = {}  # realpath -> {"ident": ..., "results": {params: record}}
_stats: dict[str, Any] = {"children": 0, "cache_hits": 0, "last_seconds": None}


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
    path = os.fspath(path)
    return _run_child([path, json.dumps(probe_params(config))], repr(path), "file", timeout)


def probe_adapter_file(model_path: str | os.PathLike[str], adapter_path: str | os.PathLike[str], config: Any, *,
                       timeout: float | None = None) -> ProbeResult:
    """Run one adapter probe child now (no cache): ``model_path`` under ``config``'s probe
    parameters with the LoRA ``adapter_path`` applied; the same ``timeout`` as :func:`probe_file`."""
    model_path, adapter_path = os.fspath(model_path), os.fspath(adapter_path)
    return _run_child([model_path, json.dumps(probe_params(config)), adapter_path],
                      f"adapter {adapter_path!r} (on model {model_path!r})", "adapter", timeout)


def _run_child(argv: list[str], subject: str, kind: str, timeout: float | None) -> ProbeResult:
    """Run ``python -m erllama.backend.probe *argv`` and turn its exit into a ProbeResult;
    ``subject`` names what is probed in messages, ``kind`` (``file``/``adapter``) what the host refuses."""
    if timeout is None:
        timeout = env_seconds("ERLLAMA_PROBE_TIMEOUT", DEFAULT_TIMEOUT)
    env = child_env()
    args = [sys.executable, "-m", "erllama.backend.probe", *argv]
    t0 = time.monotonic()
    with _lock:
        _stats["children"] += 1
    try:
        # subprocess.run kills and reaps the child on timeout
        r = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           errors="replace", timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise errors.LoadFailed(f"probe of {subject} did not finish within {timeout:g} s "
                                f"(ERLLAMA_PROBE_TIMEOUT); the child was killed") from None
    seconds = time.monotonic() - t0
    with _lock:
        _stats["last_seconds"] = seconds
    stage, report = read_report(r.stdout)
    if r.returncode == 0 and report is not None:
        result = ProbeResult(report["ok"], seconds, report.get("stage"), report.get("error"), report.get("message"))
    else:
        result = _died(subject, kind, r.returncode, stage, r.stderr, seconds)
    log.debug("probe of %s: %s in %.3f s", subject, "ok" if result.ok else result.error, seconds)
    return result


def _died(subject: str, kind: str, returncode: int, stage: str | None, stderr: str, seconds: float) -> ProbeResult:
    """The one classification of a probe child (model or adapter) that died by a signal or
    exited abnormally (``returncode`` non-zero, or zero without a RESULT line): ``subject``
    names what was probed, ``kind`` what the host will not load, ``stage`` is the last stage
    the child announced and ``stderr`` its whole standard error."""
    how = how_it_died(returncode)
    # before blaming the file, know that this build decodes a known-good model on this CPU:
    # RuntimeBroken propagates, and is not cached as the file's outcome
    selfcheck.blame(subject, how, stage)
    line = telling_line(stderr.splitlines())
    return ProbeResult(False, seconds, stage, "MalformedGGUF",
                       f"{subject}: the probe process died by {how} at stage {stage!r}; "
                       f"the host will not load this {kind}. Last llama.cpp line: {line or '(none)'}",
                       how if returncode < 0 else None, returncode)


def ensure_probed(
    path: str | os.PathLike[str], config: Any, *, cache_dir: str | os.PathLike[str] | None = None
) -> None:
    """Return if ``path`` passed a probe under ``config``'s parameters, else raise what it failed with.

    A cached outcome for the same file identity and parameters is used without a child.
    Raises ``FileNotFoundError`` for a missing path, ``MalformedGGUF`` when the child died,
    the child's own ``erllama.errors`` class for a clean failure, and ``LoadFailed`` on timeout.
    """
    key = json.dumps(probe_params(config), sort_keys=True)
    _ensure(path, key, cache_dir, lambda: probe_file(path, config))


def ensure_adapter_probed(model_path: str | os.PathLike[str], adapter_path: str | os.PathLike[str], config: Any, *,
                          cache_dir: str | os.PathLike[str] | None = None) -> None:
    """Return if the LoRA ``adapter_path`` passed a probe on ``model_path`` under ``config``'s
    parameters, else raise what it failed with (as :func:`ensure_probed`; a child that died
    gives ``MalformedGGUF`` naming the adapter, the signal, the stage ``adapter_load`` or
    ``adapter_decode`` and the last llama.cpp line).

    The outcome is cached under the adapter's file identity, keyed by the model's realpath and
    identity and the probe parameters: a changed adapter or model file is probed again.
    """
    key = json.dumps({"adapter_of": os.path.realpath(model_path), "model_ident": file_identity(model_path),
                      **probe_params(config)}, sort_keys=True)
    _ensure(adapter_path, key, cache_dir, lambda: probe_adapter_file(model_path, adapter_path, config))


def _ensure(path: str | os.PathLike[str], key: str, cache_dir: str | os.PathLike[str] | None,
            run: Any) -> None:
    """The probe cache: the record under ``path``'s identity and ``key``, else ``run()``'s
    (kept when :func:`_cacheable`); raises the recorded error of a failed probe."""
    ident = file_identity(path)
    real = os.path.realpath(path)
    store = Path(cache_dir) / "probes.json" if cache_dir is not None else None
    with _lock:
        entry = _load(store).get(real)
        record = entry.get("results", {}).get(key) if entry and entry.get("ident") == ident else None
        if record is not None:
            _stats["cache_hits"] += 1
    if record is None:
        result = run()
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
    return result.signal in CRASH_SIGNALS


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


def _child(path: str, params: dict[str, Any], adapter: str | None = None) -> None:
    """The probe itself, in the child: stage markers and one RESULT line on stdout. With
    ``adapter``, the LoRA is loaded after the model and applied before the decodes."""
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(message)s")
    logging.getLogger("erllama.llama").setLevel(logging.INFO)  # context for a crash with no assert line
    from erllama.backend.llama import native

    stage = None
    try:
        stage = "load"
        print("STAGE load", flush=True)
        model = native.Model.load(path, n_gpu_layers=params["n_gpu_layers"])
        if adapter is not None:
            stage = "adapter_load"
            print("STAGE adapter_load", flush=True)
            lora = native.Adapter.load(model, adapter)
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
        stage = "decode" if adapter is None else "adapter_decode"
        print(f"STAGE {stage}", flush=True)
        if adapter is not None:
            ctx.set_adapters([(lora, 1.0)])
        faults.crash_point("decode")
        ctx.step([(0, tokens)])
        token = native.Sampler(model).sample(ctx, 0)
        ctx.step([(0, [token])])
        report: dict[str, Any] = {"ok": True}
    except Exception as exc:  # noqa: BLE001 - reported to the host, which re-raises it
        report = {"ok": False, "stage": stage, "error": type(exc).__name__, "message": str(exc)}
    print("RESULT " + json.dumps(report), flush=True)
    sys.stderr.flush()
    os._exit(0)  # the host only needs the report; skip freeing and interpreter teardown


if __name__ == "__main__":
    _child(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
