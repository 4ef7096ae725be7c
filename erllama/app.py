"""The application: the cache, the model supervisor, the registry and the in-flight table.

``start`` builds the tree (cache first, then a ``SIMPLE_ONE_FOR_ONE`` supervisor of model
actors); ``stop`` takes it down in reverse order. A model actor that fails unexpectedly is
restarted under the same id (a new backend), within the configured intensity.

Not yet here (issue 5): continued saves, sticky sessions, embeddings, adapters,
``prefill_only``; the ``probe``/``process`` isolation modes (issue 6) run
in-process for now.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import threading
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
from erllama.model.actor import ModelActor, Submit
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
    config: ModelConfig = field(repr=False)


class Application:
    """The running tree. Use ``erllama.start()`` / ``erllama.stop()``."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.cache = CacheStore.start(config.cache_config())
        cache_api.attach(self.cache)
        self.models: dict[str, tuple[str, ModelConfig]] = {}
        self.restarts: dict[str, int] = {}
        self.inflight: dict[int, Request] = {}
        spec = supervision.ChildSpec("model", self._start_model, restart=supervision.Restart.TRANSIENT)
        try:
            self.model_sup = supervision.start_supervisor(
                supervision.SupFlags(supervision.Strategy.SIMPLE_ONE_FOR_ONE,
                                     intensity=config.model_intensity, period=config.model_period), [spec])
        except BaseException:
            self.cache.close()
            cache_api.detach()
            raise

    def _start_model(self, model_id: str) -> pykka.ActorRef[Any]:
        path, cfg = self.models[model_id]
        name = f"erllama.model.{model_id}"
        if model_id in self.restarts:
            self.restarts[model_id] += 1
        else:
            self.restarts[model_id] = 0
        backend = open_backend(path, cfg, cache_dir=self.config.cache_dir)
        try:
            km = KeyMeta(self._fingerprint(path, cfg), quant_byte(quant_from_ftype_name(backend.ftype_name)),
                         ctx_params_hash(**cfg.context_params()), cfg.namespace)
            ref = ModelActor.start(model_id, backend, cfg.prefill_chunk, cache=self.cache, key_meta=km,
                                   policy=cfg.policy or self.config.policy, tier=cfg.tier)
        except BaseException:
            backend.close()
            raise
        # the registry entry follows restarts: lookups wait while the model reloads
        supervision.registry.register(name, ref, supervised=True)
        return ref

    def _fingerprint(self, path: str, cfg: ModelConfig) -> bytes:
        """The model's cache fingerprint: configured bytes, or the SHA-256 of the file,
        remembered per (path, size, mtime, inode) in the cache directory."""
        if isinstance(cfg.fingerprint, bytes):
            return cfg.fingerprint
        st = os.stat(path)
        ident = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        store = Path(self.config.cache_dir) / "fingerprints.json"
        with _lock:
            try:
                known = json.loads(store.read_text())
            except (OSError, ValueError):
                known = {}
            if ident in known:
                return bytes.fromhex(known[ident])
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        with _lock:
            known[ident] = h.hexdigest()
            store.parent.mkdir(parents=True, exist_ok=True)
            tmp = store.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, store)
        return h.digest()

    def stop(self, timeout: float = 30.0) -> None:
        """Models first, then the cache."""
        supervision.stop_supervisor(self.model_sup, timeout)
        for model_id in list(self.models):
            supervision.registry.unregister(f"erllama.model.{model_id}")
        self.cache.close(timeout)
        cache_api.detach()

    # ---- models ---------------------------------------------------------------------------------

    def load_model(self, path: str | os.PathLike[str], model_id: str | None, options: dict[str, Any]) -> str:
        cfg = ModelConfig.build(**options)
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(2, "model file not found", path)
        with _lock:
            model_id = model_id or f"model-{next(_model_ids)}"
            if not isinstance(model_id, str) or not model_id:
                raise errors.ConfigError(f"model_id must be a non-empty str, got {model_id!r}")
            if model_id in self.models:
                raise errors.AlreadyLoaded(f"a model is already loaded as {model_id!r}")
            self.models[model_id] = (path, cfg)
        try:
            supervision.start_child(self.model_sup, model_id, timeout=600)
        except supervision.StartError as exc:
            with _lock:
                del self.models[model_id]
                self.restarts.pop(model_id, None)
            cause = exc.cause
            raise cause if isinstance(cause, BaseException) else errors.LoadFailed(str(cause)) from None
        return model_id

    def ref(self, model_id: str, timeout: float = 30.0) -> pykka.ActorRef[Any]:
        if model_id not in self.models:
            raise errors.ModelNotFound(f"no model is loaded as {model_id!r}")
        try:
            return supervision.registry.whereis(f"erllama.model.{model_id}", timeout=timeout)
        except (supervision.NameNotFound, supervision.NameUnavailable) as exc:
            raise errors.ModelCrashed(f"model {model_id!r} is not running: {exc}") from None

    def unload(self, model_id: str) -> None:
        ref = self.ref(model_id)
        supervision.terminate_child(self.model_sup, ref, timeout=60)
        with _lock:
            self.models.pop(model_id, None)
        supervision.registry.unregister(f"erllama.model.{model_id}")

    def info(self, model_id: str) -> ModelInfo:
        path, cfg = self.models.get(model_id) or (None, None)
        if cfg is None:
            raise errors.ModelNotFound(f"no model is loaded as {model_id!r}")
        try:
            ref = self.ref(model_id, timeout=5)
            phase, depth, status = ref.ask("phase", timeout=10), ref.ask("queue_depth", timeout=10), "loaded"
        except errors.ModelCrashed:
            phase, depth, status = "idle", 0, "restarting"
        return ModelInfo(model_id, path, status, phase, depth, cfg.n_ctx, cfg.n_seq_max, cfg.tier, cfg.isolation,
                         self.restarts.get(model_id, 0), cfg)

    # ---- requests -------------------------------------------------------------------------------

    def submit(self, model_id: str, prompt: Any, params: dict[str, Any], sink: Any = None) -> Stream:
        rp = RequestParams(**params)
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
