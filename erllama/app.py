"""The application: the cache, the model supervisor, the registry and the in-flight table.

``start`` builds the tree: the cache first, then a ``SIMPLE_ONE_FOR_ONE`` supervisor whose
children are one small supervisor per model, each supervising that model's actor. ``stop``
takes it down in reverse order. A model actor that fails unexpectedly is restarted under
the same id (a new backend) by its own supervisor; the restart intensity is counted per
model, so a model that keeps crashing is marked ``failed`` (its requests raise
``ModelCrashed`` saying so) and the other models are not touched.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pykka

import supervision
from erllama import cache as cache_api
from erllama import errors
from erllama.backend.factory import open_backend
from erllama.cache.key import KeyMeta, ctx_params_hash, quant_byte, quant_from_ftype_name
from erllama.cache.store import CacheStore
from erllama.config import AppConfig, ModelConfig
from erllama.filestore import file_identity, read_json, write_json
from erllama.messages import LongestPrefix, Submit
from erllama.model.actor import ModelActor, Observed
from erllama.model.request import Request, RequestParams
from erllama.stream import Stream
from erllama.types import Token

__all__ = ["Application", "ModelInfo", "current", "start", "stop"]

logger = logging.getLogger("erllama")

_lock = threading.RLock()
_app: Application | None = None
_model_ids = itertools.count(1)


@dataclass(frozen=True)
class ModelInfo:
    """What ``model_info`` reports."""

    id: str
    path: str
    status: str
    phase: str
    pending_len: int
    n_ctx: int
    n_seq_max: int
    tier: str
    isolation: str
    restarts: int
    last_cache_hit: tuple[str, int] | None = None
    quant: str | None = None
    fingerprint: bytes | None = None
    loaded_at: float = 0.0
    last_failure: str | None = None
    last_exit_signal: str | None = None
    worker_pid: int | None = None
    config: ModelConfig | None = field(default=None, repr=False)


def _file_digest(path: str) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.digest()


_CHUNK = 64 << 20


def _chunked_digest(path: str, size: int) -> bytes:
    def one(offset: int) -> bytes:
        with open(path, "rb") as f:  # hashlib releases the GIL on large buffers
            f.seek(offset)
            return hashlib.sha256(f.read(_CHUNK)).digest()

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        parts = list(pool.map(one, range(0, max(size, 1), _CHUNK)))
    return hashlib.sha256(b"gguf_chunked\0" + b"".join(parts)).digest()


class Application:
    """The running tree. Use ``erllama.start()`` / ``erllama.stop()``."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.cache = CacheStore.start(config.cache_config())
        cache_api.attach(self.cache, self._longest_prefix, self._key_groups)
        self.models: dict[str, tuple[str, ModelConfig]] = {}
        self.restarts: dict[str, int] = {}
        self.observed: dict[str, Observed] = {}
        self.loaded: dict[str, dict[str, Any]] = {}
        self.failed: dict[str, str] = {}
        self.sups: dict[str, pykka.ActorRef[Any]] = {}
        self.unloading: set[str] = set()
        self.stopping = False
        self.inflight: dict[int, Request] = {}
        spec = supervision.ChildSpec("model", self._start_model_sup, restart=supervision.Restart.TEMPORARY,
                                     type=supervision.ChildType.SUPERVISOR, start_timeout=600)
        try:
            self.model_sup = supervision.start_supervisor(
                supervision.SupFlags(supervision.Strategy.SIMPLE_ONE_FOR_ONE,
                                     intensity=config.model_intensity, period=config.model_period), [spec])
        except BaseException:
            self.cache.close()
            cache_api.detach()
            raise

    def _start_model_sup(self, model_id: str) -> pykka.ActorRef[Any]:
        """The model's own supervisor: restarts its actor within the model's intensity,
        and shuts down when the actor is not to be restarted."""
        _, cfg = self.models[model_id]
        restart = supervision.Restart(cfg.restart)
        spec = supervision.ChildSpec(model_id, self._start_model, args=(model_id,), restart=restart,
                                     significant=restart is not supervision.Restart.PERMANENT,
                                     start_timeout=600)
        flags = supervision.SupFlags(supervision.Strategy.ONE_FOR_ONE, intensity=self.config.model_intensity,
                                     period=self.config.model_period,
                                     auto_shutdown=supervision.AutoShutdown.ANY_SIGNIFICANT
                                     if restart is not supervision.Restart.PERMANENT else
                                     supervision.AutoShutdown.NEVER)
        ref = supervision.start_supervisor(flags, [spec], timeout=600)
        self.sups[model_id] = ref
        supervision.monitor(ref, lambda down: self._model_sup_down(model_id, down))
        return ref

    def _model_sup_down(self, model_id: str, down: supervision.Down) -> None:
        """The model's supervisor ended: an unload, or the model gave up restarting."""
        with _lock:
            if self.sups.get(model_id) is down.actor_ref:
                del self.sups[model_id]
            if self.stopping or model_id in self.unloading or model_id not in self.models:
                return
            obs = self.observed.get(model_id)
            last = obs.last_failure if obs is not None else None
            self.failed[model_id] = (
                f"model {model_id!r} failed and is not restarted any more ({down.reason}; "
                f"{self.restarts.get(model_id, 0)} restarts; last failure: {last}); unload and load it again")
        logger.error("%s", self.failed[model_id])
        supervision.registry.unregister(f"erllama.model.{model_id}")

    def _start_model(self, model_id: str) -> pykka.ActorRef[Any]:
        path, cfg = self.models[model_id]
        name = f"erllama.model.{model_id}"
        if model_id in self.restarts:
            self.restarts[model_id] += 1
        else:
            self.restarts[model_id] = 0
        backend = open_backend(path, cfg, cache_dir=self.config.cache_dir)
        try:
            quant = quant_from_ftype_name(backend.ftype_name)
            km = KeyMeta(self._fingerprint(path, cfg), quant_byte(quant), ctx_params_hash(**cfg.context_params()),
                         cfg.namespace)
            ref = ModelActor.start(model_id, backend, cfg.prefill_chunk, cache=self.cache, key_meta=km,
                                   policy=cfg.policy or self.config.policy, tier=cfg.tier,
                                   observed=self.observed[model_id],
                                   redirect=lambda req: self._redirect(model_id, req))
        except BaseException:
            backend.close()
            raise
        # the registry entry follows restarts: lookups wait while the model reloads
        supervision.registry.register(name, ref, supervised=True)
        self.loaded[model_id] = {"quant": quant, "fingerprint": km.fingerprint, "loaded_at": time.time(),
                                 "pid": getattr(backend, "pid", None)}
        return ref

    def _fingerprint(self, path: str, cfg: ModelConfig) -> bytes:
        """The model's cache fingerprint: configured bytes, or a digest of the file
        (``"file"``: SHA-256 of the bytes; ``"gguf_chunked"``: SHA-256 over the SHA-256 of
        each 64 MiB chunk, hashed on several threads), remembered per (mode, path, size,
        mtime, inode) in the cache directory."""
        if isinstance(cfg.fingerprint, bytes):
            return cfg.fingerprint
        ident = f"{os.path.realpath(path)}|{file_identity(path)}"
        if cfg.fingerprint != "file":
            ident = f"{cfg.fingerprint}|{ident}"
        store = Path(self.config.cache_dir) / "fingerprints.json"
        with _lock:
            known = read_json(store).get(ident)
        if known is not None:
            return bytes.fromhex(known)
        if cfg.fingerprint == "gguf_chunked":
            digest = _chunked_digest(path, os.path.getsize(path))
        else:
            digest = _file_digest(path)
        with _lock:  # re-read: another load may have added its own entry meanwhile
            write_json(store, {**read_json(store), ident: digest.hex()})
        return digest

    def stop(self, timeout: float = 30.0) -> None:
        """Models first, then the cache."""
        self.stopping = True
        supervision.stop_supervisor(self.model_sup, timeout)
        for model_id in list(self.models):
            supervision.registry.unregister(f"erllama.model.{model_id}")
        self.cache.close(timeout)
        cache_api.detach()

    # ---- models ---------------------------------------------------------------------------------

    def load_model(self, path: str | os.PathLike[str], model_id: str | None, options: dict[str, Any]) -> str:
        cfg = ModelConfig.build(**options)
        path = os.fspath(path)
        if cfg.tier not in self.cache.tiers:
            raise errors.ConfigError(f"tier {cfg.tier!r} has no quota in this application; "
                                     f"configured tiers: {sorted(self.cache.tiers)}")
        if not os.path.exists(path):
            raise FileNotFoundError(2, "model file not found", path)
        with _lock:
            model_id = model_id or f"model-{next(_model_ids)}"
            if not isinstance(model_id, str) or not model_id:
                raise errors.ConfigError(f"model_id must be a non-empty str, got {model_id!r}")
            if model_id in self.models:
                raise errors.AlreadyLoaded(f"a model is already loaded as {model_id!r}")
            self.models[model_id] = (path, cfg)
            self.observed[model_id] = Observed()
            self.failed.pop(model_id, None)
        try:
            supervision.start_child(self.model_sup, model_id, timeout=600)
        except supervision.StartError as exc:
            with _lock:
                del self.models[model_id]
                self.restarts.pop(model_id, None)
                self.observed.pop(model_id, None)
            cause = exc.cause
            while isinstance(cause, supervision.StartError):  # through the model's own supervisor
                cause = cause.cause
            raise cause if isinstance(cause, BaseException) else errors.LoadFailed(str(cause)) from None
        return model_id

    def ref(self, model_id: str, timeout: float = 30.0) -> pykka.ActorRef[Any]:
        """The live actor of ``model_id`` (waits while it restarts)."""
        if model_id not in self.models:
            raise errors.ModelNotFound(f"no model is loaded as {model_id!r}")
        if model_id in self.failed:
            raise errors.ModelCrashed(self.failed[model_id])
        try:
            return supervision.registry.whereis(f"erllama.model.{model_id}", timeout=timeout)
        except (supervision.NameNotFound, supervision.NameUnavailable) as exc:
            if model_id in self.failed:
                raise errors.ModelCrashed(self.failed[model_id]) from None
            raise errors.ModelCrashed(f"model {model_id!r} is not running: {exc}") from None

    def unload(self, model_id: str) -> None:
        """Stop the model (live sequences get a shutdown save) and forget it."""
        if model_id not in self.models:
            raise errors.ModelNotFound(f"no model is loaded as {model_id!r}")
        with _lock:
            self.unloading.add(model_id)
            sup = self.sups.get(model_id)
        try:
            if sup is not None:
                supervision.terminate_child(self.model_sup, sup, timeout=60)
        finally:
            with _lock:
                self.models.pop(model_id, None)
                for table in (self.observed, self.failed, self.loaded, self.restarts):
                    table.pop(model_id, None)
                self.unloading.discard(model_id)
            supervision.registry.unregister(f"erllama.model.{model_id}")

    def info(self, model_id: str) -> ModelInfo:
        """What ``model_info`` reports (no message to the actor: lock-free reads)."""
        path, cfg = self.models.get(model_id) or (None, None)
        if cfg is None:
            raise errors.ModelNotFound(f"no model is loaded as {model_id!r}")
        obs = self.observed.get(model_id) or Observed()
        if model_id in self.failed:
            status = "failed"
        else:
            try:
                supervision.registry.whereis(f"erllama.model.{model_id}", timeout=0)
                status = "loaded"
            except (supervision.NameNotFound, supervision.NameUnavailable):
                status = "restarting"
        loaded = self.loaded.get(model_id, {})
        return ModelInfo(model_id, path, status, obs.phase, obs.pending_len, cfg.n_ctx, cfg.n_seq_max, cfg.tier,
                         cfg.isolation, self.restarts.get(model_id, 0), obs.last_cache_hit, loaded.get("quant"),
                         loaded.get("fingerprint"), loaded.get("loaded_at", 0.0), obs.last_failure,
                         obs.last_exit_signal, loaded.get("pid"), cfg)

    def _redirect(self, model_id: str, req: Request) -> None:
        """A request that reached a model actor as it died, unprocessed: send it to the
        restarted actor (from another thread: the dying actor must not wait for its
        successor), or fail it when the model is gone."""

        def resubmit() -> None:
            try:
                if self.stopping or model_id in self.unloading:
                    raise errors.ModelCrashed(f"model {model_id!r} was unloaded or stopped")
                self.ref(model_id, timeout=60).tell(Submit(req))
            except (errors.ErllamaError, pykka.ActorDeadError) as exc:
                req.finished = True
                req.sink(exc if isinstance(exc, errors.ErllamaError) else
                         errors.ModelCrashed(f"model {model_id!r} stopped before the request ran"))

        threading.Thread(target=resubmit, name=f"erllama-redirect-{req.id}", daemon=True).start()

    def _key_groups(self) -> dict[str, bytes | None]:
        return {mid: obs.key_group for mid, obs in list(self.observed.items()) if mid in self.models}

    def _longest_prefix(self, model_id: str, tokens: Any) -> int:
        return self.ref(model_id).ask(LongestPrefix(list(tokens)), timeout=60)

    # ---- requests -------------------------------------------------------------------------------

    def submit(self, model_id: str, prompt: Any, params: dict[str, Any], sink: Any = None) -> Stream:
        try:
            rp = RequestParams(**params)
        except TypeError:
            known = set(RequestParams.__dataclass_fields__)
            unknown = sorted(set(params) - known)
            raise errors.InvalidParameter(
                f"unknown request parameters {unknown}; known: {sorted(known)}") from None
        ref = self.ref(model_id)

        def deliver(event: Any) -> None:  # runs in the model actor's thread
            if not isinstance(event, Token):
                self.inflight.pop(req.id, None)
            stream._push(event)

        req = Request(prompt if isinstance(prompt, str) else list(prompt), rp, deliver)
        stream = Stream(req.id, req.cancelled.set, sink)
        self.inflight[req.id] = req
        try:
            ref.tell(Submit(req))
        except pykka.ActorDeadError:
            self.inflight.pop(req.id, None)
            raise errors.ModelCrashed(f"model {model_id!r} stopped") from None
        return stream

    def cancel(self, request_id: int) -> None:
        req = self.inflight.get(request_id)
        if req is not None:
            req.cancelled.set()


def current() -> Application:
    """The running application (``errors.ErllamaError`` when not started)."""
    if _app is None:
        raise errors.ErllamaError("erllama is not running: call erllama.start()")
    return _app


def start(config: AppConfig | None = None, **overrides: Any) -> Application:
    """Start the application, or return the running one (a conflicting config raises)."""
    global _app
    with _lock:
        cfg = AppConfig.build(config, **overrides) if (config is not None or overrides) else None
        if _app is not None:
            if cfg is not None and cfg != _app.config:
                raise errors.AlreadyStarted("erllama is running with another configuration; stop it first")
            return _app
        _app = Application(cfg or AppConfig())
        return _app


def stop(timeout: float = 30.0) -> None:
    """Stop the application (idempotent)."""
    global _app
    with _lock:
        app, _app = _app, None
    if app is not None:
        app.stop(timeout)
