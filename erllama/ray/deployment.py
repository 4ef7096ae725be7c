"""erllama on Ray Serve: an ``Engine`` deployment (one erllama application and the
OpenAI-compatible server of :mod:`erllama.server` per replica, one replica per node by
default) behind an ``Ingress`` deployment that tokenizes each request with the model's own
vocabulary and hands it to the replica :class:`erllama.ray.router.PrefixRouter` picks.

The engine runs the very ASGI application ``erllama serve`` runs: the ingress forwards the
HTTP request (method, path, headers, body) and streams back the ASGI messages, so the
request and response models, errors, admission, metrics and disconnect handling are the
server's own. A request whose replica dies before it sent anything is retried on another;
one that dies mid-stream ends with an SSE error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

import erllama
from erllama import cache as cache_api
from erllama.config import ModelConfig, default_cache_dir
from erllama.ray.router import encode_meta, short_key
from erllama.server import openai_api as oa
from erllama.server.app import ModelSpec, ServerConfig, create_app
from erllama.server.errors import APIError

__all__ = ["Engine", "Ingress", "build_app"]

logger = logging.getLogger("erllama.ray")

MAX_PUBLISHED_ROWS = 8192
RETRIES = 2
READY_TIMEOUT_S = 300.0


class Engine:
    """One replica: an erllama application with its models loaded, serving forwarded HTTP
    requests (:meth:`handle`) and publishing what its cache holds (:meth:`record_routing_stats`).

    ``cache_root``: each replica's cache lives in ``cache_root/node-<node id>`` (default
    ``~/.cache/erllama/ray``; unless ``app_config`` names a ``cache_dir``). One replica per
    node: a second one on the same node would find the directory locked. The cluster's
    shared cold tier is ``app_config["shared_dir"]``, a directory every node mounts (see
    the cluster guide)."""

    async def __init__(self, config: ServerConfig, cache_root: str | None = None) -> None:  # type: ignore[misc]
        app_config = dict(config.app_config)
        if "cache_dir" not in app_config:
            cache_root = cache_root if cache_root is not None else str(default_cache_dir() / "ray")
            node = serve.get_replica_context().replica_id.unique_id
            with contextlib.suppress(Exception):
                import ray

                node = "node-" + ray.get_runtime_context().get_node_id()[:12]
            app_config["cache_dir"] = str(Path(cache_root) / node)
        self.config = dataclasses.replace(config, app_config=app_config)
        self.api = create_app(self.config)
        self._life = self.api.router.lifespan_context(self.api)
        await self._life.__aenter__()
        try:
            await self._ready()
        except BaseException:
            await self._life.__aexit__(None, None, None)
            raise
        self.models = [m.id for m in erllama.list_models()]
        self.id = serve.get_replica_context().replica_id.unique_id.encode()

    async def _ready(self) -> None:
        server = self.api.state.erllama
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT_S
        while server.loading:
            failed = {m: s for m, s in server.loading.items() if s != "loading"}
            if failed:
                raise RuntimeError(f"erllama replica: models failed to load: {failed}")
            if loop.time() > deadline:
                raise TimeoutError(f"erllama replica: models still loading after {READY_TIMEOUT_S} s")
            await asyncio.sleep(0.05)

    async def handle(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Run one forwarded HTTP request through the server application and yield its
        ASGI response messages. Cancelling the generator (the client left) is the
        request's disconnect."""
        gone = asyncio.Event()
        body_sent = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": request["body"], "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        out: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        async def send(message: dict[str, Any]) -> None:
            await out.put(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request["method"],
                 "scheme": "http", "path": request["path"], "raw_path": request["path"].encode(),
                 "query_string": request.get("query", b""), "root_path": "",
                 "headers": [(k, v) for k, v in request["headers"]], "client": ("127.0.0.1", 0),
                 "server": ("127.0.0.1", 0), "app": self.api}

        async def run() -> None:
            try:
                await self.api(scope, receive, send)
            finally:
                await out.put(None)

        task = asyncio.create_task(run())
        try:
            while (message := await out.get()) is not None:
                if message["type"] == "http.response.start":  # which replica answered
                    message = {**message, "headers": [*message.get("headers", []), (b"x-erllama-replica", self.id)]}
                yield message
            await task
        finally:
            gone.set()  # a no-op once the answer is complete; else the server cancels the request

    def record_routing_stats(self) -> dict[str, Any]:
        """What the router scores this replica by: per model, its cache key metadata and
        its rows as ``{short key: tokens}`` (the longest ``MAX_PUBLISHED_ROWS``)."""
        models = {}
        for mid in self.models:
            with contextlib.suppress(Exception):
                meta = cache_api.key_meta_of(mid)
                if meta is None:
                    continue
                rows = sorted(cache_api.rows_of(mid).items(), key=lambda kv: -kv[1])[:MAX_PUBLISHED_ROWS]
                models[mid] = {"meta": encode_meta(meta), "rows": {short_key(k): n for k, n in rows}}
        return {"models": models}

    def check_health(self) -> None:
        """Serve's health check: the application runs and every model is loaded."""
        for info in erllama.list_models():
            if info.status not in ("loaded",):
                raise RuntimeError(f"model {info.id!r} is {info.status}")

    async def __del__(self) -> None:
        """Stop the application (Serve's graceful shutdown)."""
        with contextlib.suppress(Exception):
            await self._life.__aexit__(None, None, None)


class Ingress:
    """The HTTP entry: routes every request of the server's API to an engine replica.
    Generation requests are tokenized here (vocab-only models, the engine's template code)
    so the router can match their exact token prefixes."""

    def __init__(self, engine: Any, models: tuple[ModelSpec, ...]) -> None:
        from erllama.backend.llama import Vocab

        self.engine = engine.options(stream=True, method_name="handle")
        self.vocabs = {}
        for spec in models:
            mid = spec.model_id or Path(spec.path).name.removesuffix(".gguf")
            self.vocabs[mid] = Vocab(spec.path, spec.options.get("chat_template"))

    def route(self, path: str, body: bytes) -> dict[str, Any]:
        """The request's model, prompt tokens, session and namespace (empty when it has
        none or is malformed: the engine answers the error)."""
        if path not in ("/v1/chat/completions", "/v1/completions"):
            return {}
        try:
            data = json.loads(body)
            gen = oa.parse_chat(data) if path == "/v1/chat/completions" else oa.parse_completion(data)
            model = gen.model if gen.model is not None else (next(iter(self.vocabs)) if len(self.vocabs) == 1
                                                              else None)
            vocab = self.vocabs.get(model) if model is not None else None
            route: dict[str, Any] = {"model": model, "session": gen.params.get("session_id"),
                                     "namespace": gen.params.get("namespace")}
            if vocab is not None:
                from erllama.backend.protocol import chat_tokens

                if gen.messages is not None:
                    route["tokens"] = chat_tokens(vocab, gen.messages)
                elif isinstance(gen.prompt, str):
                    route["tokens"] = vocab.tokenize(gen.prompt)
                else:
                    route["tokens"] = list(gen.prompt or [])
            return route
        except (APIError, ValueError, erllama.errors.ErllamaError):
            return {}

    async def __call__(self, request: Request) -> Response:
        """Forward the request; stream the engine's answer back."""
        body = await request.body()
        path = request.url.path
        forwarded = {"method": request.method, "path": path, "query": request.url.query.encode(),
                     "headers": list(request.headers.raw), "body": body, "route": self.route(path, body)}
        for attempt in range(RETRIES + 1):
            gen = self.engine.remote(forwarded)
            try:
                start = await gen.__anext__()
                break
            except asyncio.CancelledError:  # the client left while the engine worked
                gen.cancel()
                raise
            except StopAsyncIteration:
                raise
            except Exception as exc:  # the replica died before answering: nothing was sent
                gen.cancel()
                if attempt == RETRIES:
                    return JSONResponse({"error": {"message": f"no replica could serve the request: {exc}",
                                                   "type": "unavailable_error", "code": "replica_failed"}},
                                        status_code=503, headers={"Retry-After": "1"})
                logger.warning("erllama.ray: replica failed before answering (%s); retrying", exc)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start["headers"]
                   if k.lower() not in (b"content-length", b"transfer-encoding")}
        sse = headers.get("content-type", "").startswith("text/event-stream")

        async def rest() -> AsyncIterator[bytes]:
            try:
                async for message in gen:
                    if message.get("body"):
                        yield message["body"]
            except Exception as exc:  # the replica died mid-answer
                if not sse:
                    raise
                err = {"error": {"message": f"the replica serving this stream failed: {exc}",
                                 "type": "unavailable_error", "code": "replica_failed"}}
                yield f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()
            finally:
                gen.cancel()

        return StreamingResponse(rest(), status_code=start["status"], headers=headers)


def build_app(config: ServerConfig, *, num_replicas: int | None = None, cache_root: str | None = None,
              ray_actor_options: dict[str, Any] | None = None, router: bool = True,
              router_kwargs: dict[str, Any] | None = None, stats_period_s: float = 1.0) -> Any:
    """The Serve application: ``serve.run(build_app(ServerConfig(models=(...))))``.

    ``num_replicas``: engine replicas (default: one per alive node, each asking for one
    CPU, spread across nodes). ``router=False`` uses Serve's default router (the baseline of
    ``bench/cluster.py``). ``router_kwargs``: :class:`erllama.ray.routing.Policy` fields."""
    if not config.models:
        raise erllama.errors.ConfigError("build_app needs the models to load (ServerConfig.models)")
    if num_replicas is None:
        import ray

        num_replicas = max(1, sum(1 for n in ray.nodes() if n.get("Alive")))
    seqs = ModelConfig().n_seq_max
    per_replica = config.max_queue + max(int(m.options.get("n_seq_max", seqs)) for m in config.models)
    options: dict[str, Any] = {
        "num_replicas": num_replicas, "max_ongoing_requests": per_replica,
        "ray_actor_options": ray_actor_options or {"num_cpus": 1},
        "health_check_period_s": 2.0, "health_check_timeout_s": 30.0, "graceful_shutdown_timeout_s": 20.0}
    if router:
        router_config: Any = RequestRouterConfig
        options["request_router_config"] = router_config(
            request_router_class="erllama.ray.router:PrefixRouter", request_router_kwargs=router_kwargs or {},
            request_routing_stats_period_s=stats_period_s, request_routing_stats_timeout_s=10.0)
    deployment: Any = serve.deployment
    engine = deployment(Engine, name="ErllamaEngine", **options).bind(config, cache_root)
    ingress = deployment(Ingress, name="ErllamaIngress", num_replicas=1, max_ongoing_requests=10_000,
                         ray_actor_options={"num_cpus": 0})
    return ingress.bind(engine, config.models)
