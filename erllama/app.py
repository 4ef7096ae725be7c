"""The application: one supervision tree under the root supervisor ``erllama_sup``.

``start`` builds the tree: the model registry, the in-flight table, the cache supervisor,
then a ``SIMPLE_ONE_FOR_ONE`` supervisor whose children are one small supervisor per model,
each supervising that model's actor (``tree()`` shows it live). ``stop`` takes it down in
reverse order. A model actor that fails unexpectedly is restarted under
the same id (a new backend) by its own supervisor; the restart intensity is counted per
model, so a model that keeps crashing is marked ``failed`` (its requests raise
``ModelCrashed`` saying so) and the other models are not touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, cast

import pykka

import supervision
from erllama import cache as cache_api
from erllama import errors, private
from erllama.backend.factory import open_backend
from erllama.cache.fingerprint import file_fingerprint
from erllama.cache.key import KeyMeta, ctx_params_hash, quant_byte, quant_from_ftype_name
from erllama.cache.store import CacheStore
from erllama.config import AppConfig, ModelConfig
from erllama.messages import LongestPrefix, Submit
from erllama.model.actor import ModelActor, Observed
from erllama.model.request import Request, RequestParams
from erllama.stream import Stream
from erllama.tables import Table
from erllama.types import Token

__all__ = ["Application", "ModelInfo", "current", "start", "stop"]

logger = logging.getLogger("erllama")

_lock = threading.RLock()
_app: Application | None = None
_model_ids = itertools.count(1)
_app_ids = itertools.count(1)


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


@dataclass(frozen=True)
class ModelEntry:
    """One loaded model in the registry: how it was loaded, what its actor publishes, how
    often it restarted, what was loaded (quant, fingerprint, time, worker pid), why it
    failed, its own supervisor, and whether an unload is under way."""

    path: str
    config: ModelConfig
    observed: Observed
    restarts: int = -1
    loaded: dict[str, Any] = field(default_factory=dict)
    failed: str | None = None
    sup: pykka.ActorRef[Any] | None = None
    unloading: bool = False


ROOT_INTENSITY = 5
ROOT_PERIOD = 30.0


class Application:
    """The running tree. Use ``erllama.start()`` / ``erllama.stop()``.

    The root supervisor ``erllama_sup`` (``ONE_FOR_ONE``) starts, in order: the model
    registry and the in-flight table (actors owning their tables), the cache supervisor
    (meta server, writer pool, memory-pressure poller) and the model supervisor
    (``SIMPLE_ONE_FOR_ONE``, one small supervisor per model over its actor); it stops them
    in reverse order. A child that exits past its supervisor's intensity escalates; when
    the root itself gives up, :attr:`failure` says why and every call raises it."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        private.private_dir(config.cache_dir, "cache_dir")
        self.cache = CacheStore(config.cache_config(), supervise=False)
        self.registry: Table[ModelEntry] = Table(f"erllama.registry.{next(_app_ids)}")
        self.inflight: Table[Request] = Table(f"{self.registry.name}.inflight")
        self.stopping = False
        self.failure: str | None = None
        self._models_name = f"{self.registry.name}.models"
        model = supervision.ChildSpec("model", self._start_model_sup, restart=supervision.Restart.TEMPORARY,
                                      type=supervision.ChildType.SUPERVISOR, start_timeout=600,
                                      shutdown=supervision.INFINITY)
        model_flags = supervision.SupFlags(supervision.Strategy.SIMPLE_ONE_FOR_ONE,
                                           intensity=config.model_intensity, period=config.model_period)
        specs = [self.registry.child_spec("registry"), self.inflight.child_spec("inflight"),
                 self.cache.child_spec("cache"),
                 supervision.ChildSpec("models", lambda: supervision.Supervisor.start(model_flags, [model]),
                                       type=supervision.ChildType.SUPERVISOR, name=self._models_name,
                                       shutdown=supervision.INFINITY)]
        try:
            self.root = supervision.start_supervisor(
                supervision.SupFlags(supervision.Strategy.ONE_FOR_ONE, intensity=ROOT_INTENSITY, period=ROOT_PERIOD),
                specs)
        except BaseException:
            self.cache.release_locks()
            raise
        supervision.monitor(self.root, self._root_down)
        cache_api.attach(self.cache, self._longest_prefix, self._key_metas)

    @property
    def model_sup(self) -> pykka.ActorRef[Any]:
        """The model supervisor (follows its restarts)."""
        return supervision.registry.whereis(self._models_name, timeout=30.0)

    def _root_down(self, down: supervision.Down) -> None:
        if self.stopping:
            return
        self.failure = f"erllama's root supervisor exited ({down.reason}); the application is down: stop and start it"
        logger.error("%s", self.failure)

    def check(self) -> None:
        """Raise ``errors.ErllamaError`` when the tree has failed (an escalation reached the root)."""
        if self.failure is not None:
            raise errors.ErllamaError(self.failure)

    def entry(self, model_id: str) -> ModelEntry:
        """The registry entry of ``model_id`` (``ModelNotFound`` if none)."""
        e = self.registry.get(model_id)
        if e is None:
            raise errors.ModelNotFound(f"no model is loaded as {model_id!r}")
        return e

    def model_ids(self) -> list[str]:
        """The loaded models' ids."""
        return [mid for mid, _ in self.registry.items()]

    def _start_model_sup(self, model_id: str, path: str, cfg: ModelConfig) -> pykka.ActorRef[Any]:
        """The model's own supervisor: restarts its actor within the model's intensity,
        and shuts down when the actor is not to be restarted."""
        restart = supervision.Restart(cfg.restart)
        # a model's stop runs shutdown saves (each waits for its write): no timeout cuts it short
        spec = supervision.ChildSpec(model_id, self._start_model, args=(model_id, path, cfg), restart=restart,
                                     significant=restart is not supervision.Restart.PERMANENT,
                                     start_timeout=600, shutdown=supervision.INFINITY)
        flags = supervision.SupFlags(supervision.Strategy.ONE_FOR_ONE, intensity=self.config.model_intensity,
                                     period=self.config.model_period,
                                     auto_shutdown=supervision.AutoShutdown.ANY_SIGNIFICANT
                                     if restart is not supervision.Restart.PERMANENT else
                                     supervision.AutoShutdown.NEVER)
        ref = supervision.start_supervisor(flags, [spec], timeout=600)
        self.registry.update(model_id, sup=ref)
        supervision.monitor(ref, lambda down: self._model_sup_down(model_id, down))
        return ref

    def _model_sup_down(self, model_id: str, down: supervision.Down) -> None:
        """The model's supervisor ended: an unload, or the model gave up restarting."""
        e = self.registry.get(model_id)
        if e is None or self.stopping or e.unloading:
            return
        last = e.observed.last_failure
        failed = (f"model {model_id!r} failed and is not restarted any more ({down.reason}; "
                  f"{max(e.restarts, 0)} restarts; last failure: {last}); unload and load it again")
        with contextlib.suppress(Exception):  # the registry itself may be going down
            self.registry.update(model_id, failed=failed, sup=None)
        logger.error("%s", failed)
        supervision.registry.unregister(f"erllama.model.{model_id}")

    def _start_model(self, model_id: str, path: str, cfg: ModelConfig) -> pykka.ActorRef[Any]:
        e = self.registry.apply(model_id, lambda old: old and dataclasses.replace(old, restarts=old.restarts + 1))
        if e is None:
            raise errors.ModelNotFound(f"model {model_id!r} was unloaded")
        name = f"erllama.model.{model_id}"
        backend = open_backend(path, cfg, cache_dir=self.config.cache_dir)
        try:
            quant = quant_from_ftype_name(backend.ftype_name)
            fp = cfg.fingerprint if isinstance(cfg.fingerprint, bytes) else \
                file_fingerprint(path, cfg.fingerprint, self.config.cache_dir)
            km = KeyMeta(fp, quant_byte(quant), ctx_params_hash(**cfg.context_params()), cfg.namespace)
            ref = ModelActor.start(model_id, backend, cfg.prefill_chunk, cache=self.cache, key_meta=km,
                                   policy=cfg.policy or self.config.policy, tier=cfg.tier,
                                   observed=e.observed, resident_budget=cfg.resident_budget(),
                                   redirect=lambda req: self._redirect(model_id, req))
        except BaseException:
            backend.close()
            raise
        # the registry entry follows restarts: lookups wait while the model reloads
        supervision.registry.register(name, ref, supervised=True)
        self.registry.update(model_id, loaded={"quant": quant, "fingerprint": km.fingerprint,
                                               "loaded_at": time.time(), "pid": getattr(backend, "pid", None)})
        return ref

    def prepare_stop(self, timeout: float = 30.0) -> None:
        """Models first (their shutdown saves), then the cache's queued saves and its
        ``ram`` rows, before the root supervisor stops the rest."""
        self.stopping = True
        with contextlib.suppress(supervision.SupervisionError, pykka.ActorDeadError, supervision.NameNotFound,
                                 supervision.NameUnavailable):
            supervision.terminate_child(self.root, "models", timeout=timeout)
        for model_id in self.model_ids():
            supervision.registry.unregister(f"erllama.model.{model_id}")
        self.cache.close(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Models, then the cache, then the tables: the root supervisor in reverse order."""
        try:
            self.prepare_stop(timeout)
        finally:
            supervision.stop_supervisor(self.root, timeout)
            self.cache.release_locks()
            cache_api.detach()

    # ---- models ---------------------------------------------------------------------------------

    def load_model(self, path: str | os.PathLike[str], model_id: str | None, options: dict[str, Any]) -> str:
        self.check()
        cfg = ModelConfig.build(**options)
        path = os.fspath(path)
        if cfg.tier not in self.cache.tiers:
            raise errors.ConfigError(f"tier {cfg.tier!r} has no quota in this application; "
                                     f"configured tiers: {sorted(self.cache.tiers)}")
        if not os.path.exists(path):
            raise FileNotFoundError(2, "model file not found", path)
        model_id = model_id or f"model-{next(_model_ids)}"
        if not isinstance(model_id, str) or not model_id:
            raise errors.ConfigError(f"model_id must be a non-empty str, got {model_id!r}")
        entry = ModelEntry(path, cfg, Observed())

        def claim(old: ModelEntry | None) -> ModelEntry | None:
            return entry if old is None else old

        if self.registry.apply(model_id, claim) is not entry:
            raise errors.AlreadyLoaded(f"a model is already loaded as {model_id!r}")
        try:
            supervision.start_child(self.model_sup, model_id, path, cfg, timeout=600)
        except supervision.StartError as exc:
            self.registry.pop(model_id)
            cause = exc.cause
            while isinstance(cause, supervision.StartError):  # through the model's own supervisor
                cause = cause.cause
            raise cause if isinstance(cause, BaseException) else errors.LoadFailed(str(cause)) from None
        return model_id

    def ref(self, model_id: str, timeout: float = 30.0) -> pykka.ActorRef[Any]:
        """The live actor of ``model_id`` (waits while it restarts)."""
        self.check()
        e = self.entry(model_id)
        if e.failed is not None:
            raise errors.ModelCrashed(e.failed)
        try:
            return supervision.registry.whereis(f"erllama.model.{model_id}", timeout=timeout)
        except (supervision.NameNotFound, supervision.NameUnavailable) as exc:
            now = self.registry.get(model_id)
            if now is not None and now.failed is not None:
                raise errors.ModelCrashed(now.failed) from None
            raise errors.ModelCrashed(f"model {model_id!r} is not running: {exc}") from None

    def unload(self, model_id: str) -> None:
        """Stop the model (live sequences get a shutdown save) and forget it."""
        e = self.registry.update(model_id, unloading=True)
        if e is None:
            raise errors.ModelNotFound(f"no model is loaded as {model_id!r}")
        try:
            if e.sup is not None:
                supervision.terminate_child(self.model_sup, e.sup, timeout=None)
        finally:
            self.registry.pop(model_id)
            supervision.registry.unregister(f"erllama.model.{model_id}")

    def info(self, model_id: str) -> ModelInfo:
        """What ``model_info`` reports (no message to the actor: lock-free reads)."""
        e = self.entry(model_id)
        obs, cfg = e.observed, e.config
        if e.failed is not None:
            status = "failed"
        else:
            try:
                supervision.registry.whereis(f"erllama.model.{model_id}", timeout=0)
                status = "loaded"
            except (supervision.NameNotFound, supervision.NameUnavailable):
                status = "restarting"
        loaded = e.loaded
        return ModelInfo(model_id, e.path, status, obs.phase, obs.pending_len, cfg.n_ctx, cfg.n_seq_max, cfg.tier,
                         cfg.isolation, max(e.restarts, 0), obs.last_cache_hit, loaded.get("quant"),
                         loaded.get("fingerprint"), loaded.get("loaded_at", 0.0), obs.last_failure,
                         obs.last_exit_signal, loaded.get("pid"), cfg)

    def _redirect(self, model_id: str, req: Request) -> None:
        """A request that reached a model actor as it died, unprocessed: send it to the
        restarted actor (from another thread: the dying actor must not wait for its
        successor), or fail it when the model is gone."""

        def resubmit() -> None:
            try:
                e = self.registry.get(model_id)
                if self.stopping or e is None or e.unloading:
                    raise errors.ModelCrashed(f"model {model_id!r} was unloaded or stopped")
                self.ref(model_id, timeout=60).tell(Submit(req))
            except (errors.ErllamaError, pykka.ActorDeadError) as exc:
                req.state.finished = True
                req.sink(exc if isinstance(exc, errors.ErllamaError) else
                         errors.ModelCrashed(f"model {model_id!r} stopped before the request ran"))

        threading.Thread(target=resubmit, name=f"erllama-redirect-{req.id}", daemon=True).start()

    def _key_metas(self) -> dict[str, Any]:
        return {mid: e.observed.key_meta for mid, e in self.registry.items()}

    def _longest_prefix(self, model_id: str, tokens: Any) -> int:
        return cast(int, self.ref(model_id).ask(LongestPrefix(list(tokens)), timeout=60))

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
                self.inflight.discard(req.id)
            stream._push(event)

        req = Request(prompt if isinstance(prompt, str) else list(prompt), rp, deliver)
        stream = Stream(req.id, req.cancel, sink)
        self.inflight.put(req.id, req)
        try:
            ref.tell(Submit(req))
        except pykka.ActorDeadError:  # it died since ref() found it: its successor runs it
            self._redirect(model_id, req)
        return stream

    def cancel(self, request_id: int) -> None:
        req = self.inflight.get(request_id)
        if req is not None:
            req.cancel()

    # ---- the tree -------------------------------------------------------------------------------

    def tree(self) -> dict[str, Any]:
        """The live supervision tree from the root: each supervisor's strategy and
        intensity, and its children with their type, restart type, thread, status and
        restart count (the ``observer`` view)."""
        return _describe("erllama_sup", self.root, "supervisor", "permanent", None, 0, "running")


def _describe(child_id: str, ref: pykka.ActorRef[Any] | None, kind: str, restart: str, thread: str | None,
              restarts: int, status: str) -> dict[str, Any]:
    node: dict[str, Any] = {"id": child_id, "type": kind, "restart": restart, "thread": thread,
                            "restarts": restarts, "status": status,
                            "actor": ref.actor_class.__name__ if ref is not None else None}
    if kind == "supervisor" and ref is not None:
        try:
            st = supervision.inspect(ref, timeout=5.0)
        except Exception:  # it is stopping or restarting
            node["status"] = "unavailable"
            return node
        node["strategy"] = st.strategy.value
        node["intensity"] = f"{st.intensity}/{st.period:g}s"
        node["children"] = [_describe(c.id, c.ref, c.type.value, c.restart.value, c.thread, c.restarts, c.status)
                            for c in st.children]
    return node


def format_tree(node: dict[str, Any]) -> str:
    """The tree of :meth:`Application.tree` as indented text."""
    lines: list[str] = []

    def walk(n: dict[str, Any], prefix: str, last: bool, top: bool) -> None:
        what = n["actor"] or "-"
        extra = f" {n['strategy']} {n['intensity']}" if "strategy" in n else ""
        line = (f"{n['id']} [{n['type']} {n['restart']}{extra}] {what} {n['status']}"
                f"{' thread ' + n['thread'] if n['thread'] else ''} restarts {n['restarts']}")
        lines.append(line if top else f"{prefix}{'└── ' if last else '├── '}{line}")
        kids = n.get("children", [])
        for i, k in enumerate(kids):
            walk(k, prefix if top else prefix + ("    " if last else "│   "), i == len(kids) - 1, False)

    walk(node, "", True, True)
    return "\n".join(lines)


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
