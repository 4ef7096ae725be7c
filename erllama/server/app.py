"""The ASGI application: routes, the models' lifecycle, admission, streaming and
disconnects. ``create_app`` builds it; ``erllama serve`` runs it under uvicorn.

Requests go through :mod:`erllama.aio`, so every request is a cancellable stream on the
event loop: a client that disconnects cancels its request (during its prefill too), and its
sequence is free for the next one. Admission happens before any costly work: a model whose
queue already holds ``max_queue`` waiting requests, or that is loading or restarting, is
answered 503 with ``Retry-After`` at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

import erllama
import erllama.cache
from erllama import aio, errors
from erllama.server import openai_api as oa
from erllama.server.errors import APIError, bad, from_erllama, unavailable
from erllama.server.grammar import grammar_for
from erllama.server.metrics import Metrics
from erllama.types import Completion, Done, Token, TokenLogprobs

__all__ = ["ModelSpec", "ServerConfig", "create_app"]

logger = logging.getLogger("erllama.server")

MiB = 1 << 20


@dataclass(frozen=True)
class ModelSpec:
    """A model the server loads at start: its GGUF ``path``, its id (default: the file's
    stem) and ``erllama.load_model`` options."""

    path: str
    model_id: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerConfig:
    """How the server runs.

    ``models``: loaded at start (none: serve what the running application has loaded).
    ``api_key``: when set, every route but ``/health`` needs ``Authorization: Bearer <key>``.
    ``max_queue``: requests that may wait for a sequence per model before new ones get 503.
    ``max_body_bytes``: larger request bodies get 413. ``retry_after_s``: the ``Retry-After``
    of a 503. ``sse_ping_s``: a stream that has sent nothing for this long (a long prefill)
    gets an SSE comment, ``: ping``, so that proxies do not close it as idle.
    ``app_config``: ``erllama.start`` options when the server starts the application itself."""

    models: tuple[ModelSpec, ...] = ()
    api_key: str | None = None
    max_queue: int = 64
    max_body_bytes: int = 8 * MiB
    retry_after_s: float = 1.0
    sse_ping_s: float = 15.0
    app_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise errors.ConfigError(f"max_queue must be an int >= 0, got {self.max_queue!r}")
        if isinstance(self.max_body_bytes, bool) or not isinstance(self.max_body_bytes, int) \
                or self.max_body_bytes < 1024:
            raise errors.ConfigError(f"max_body_bytes must be an int >= 1024, got {self.max_body_bytes!r}")
        if isinstance(self.sse_ping_s, bool) or not isinstance(self.sse_ping_s, int | float) \
                or not 0 < self.sse_ping_s <= 3600:
            raise errors.ConfigError(f"sse_ping_s must be seconds in (0, 3600], got {self.sse_ping_s!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise errors.ConfigError("api_key must be a non-empty string or None")


class Server:
    """The state behind the routes: which models are ready, loading or failed."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.loading: dict[str, str] = {}  # model id -> "loading" | "failed: why"
        self.started_app = False
        self.metrics = Metrics()
        self._loads: list[asyncio.Task[None]] = []

    # ---- lifecycle ------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Start the application when none runs, then load the configured models in the
        background (``/health`` says 503 until they are ready)."""
        from erllama import app as app_mod

        try:
            app_mod.current()
        except errors.ErllamaError:
            await asyncio.to_thread(erllama.start, **self.config.app_config)
            self.started_app = True
        for spec in self.config.models:
            mid = spec.model_id or Path(spec.path).name.removesuffix(".gguf")
            self.loading[mid] = "loading"
            self._loads.append(asyncio.create_task(self._load(spec, mid)))

    async def _load(self, spec: ModelSpec, mid: str) -> None:
        try:
            await aio.load_model(spec.path, model_id=mid, **spec.options)
        except Exception as exc:  # reported by /health and by every request for it
            logger.error("model %s (%s) failed to load: %s", mid, spec.path, exc)
            self.loading[mid] = f"failed: {type(exc).__name__}: {exc}"
        else:
            del self.loading[mid]

    async def shutdown(self) -> None:
        """Stop loading, and stop the application if this server started it."""
        for task in self._loads:
            task.cancel()
        if self.started_app:
            await asyncio.to_thread(erllama.stop)
        logger.info("erllama server stopped%s", " (and its application)" if self.started_app else "")

    # ---- admission ------------------------------------------------------------------------------

    def model_for(self, model: str | None) -> str:
        """The model a request names (the only one loaded when it names none), or the error."""
        state = self.loading.get(model) if model is not None else None
        if state is not None:
            if state == "loading":
                raise unavailable(f"model {model!r} is loading", self.config.retry_after_s, "model_loading")
            raise APIError(503, f"model {model!r} failed to load: {state[len('failed: '):]}",
                           type="unavailable_error", code="model_failed")
        ids = [m.id for m in erllama.list_models()]
        if model is None:
            if len(ids) == 1:
                return ids[0]
            raise bad(f"model is required (loaded: {ids})", "model")
        if model not in ids:
            raise APIError(404, f"the model {model!r} does not exist (loaded: {ids})", code="model_not_found",
                           param="model")
        return model

    def enter(self, mid: str) -> None:
        """A request of ``mid`` admitted (for ``erllama_requests_running``)."""
        self.metrics.in_flight[mid] = self.metrics.in_flight.get(mid, 0) + 1

    def leave(self, mid: str) -> None:
        """A request of ``mid`` answered."""
        self.metrics.in_flight[mid] = self.metrics.in_flight.get(mid, 1) - 1

    def admit(self, mid: str) -> None:
        """Refuse at once (503) when the model is restarting, or when a new request would
        have to wait for a sequence and ``max_queue`` requests already wait."""
        info = erllama.model_info(mid)
        if info.status != "loaded":
            self.metrics.rejected(mid, "restarting")
            raise unavailable(f"model {mid!r} is {info.status}", self.config.retry_after_s, "model_restarting")
        # this server's own requests decide (the model's published queue length lags a tick
        # behind a submission); the published length still bounds what others queued
        waiting = self.metrics.in_flight.get(mid, 0) - info.n_seq_max  # beyond the sequences
        if waiting >= self.config.max_queue or info.pending_len > self.config.max_queue:
            waiting = max(waiting, info.pending_len)
            self.metrics.rejected(mid, "queue_full")
            raise unavailable(f"model {mid!r} has all {info.n_seq_max} sequences busy and {waiting} requests "
                              f"waiting (max_queue={self.config.max_queue}); retry later",
                              self.config.retry_after_s, "queue_full")


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


async def _pinging(stream: aio.AsyncStream, every: float) -> AsyncIterator[Token | Done | None]:
    """The stream's events, and ``None`` whenever ``every`` seconds pass without one (the
    pending read is kept, never cancelled: cancelling it would cancel the request)."""
    nxt: asyncio.Future[Token | Done] | None = None
    try:
        while True:
            if nxt is None:
                nxt = asyncio.ensure_future(stream.__anext__())
            done, _ = await asyncio.wait({nxt}, timeout=every)
            if not done:
                yield None
                continue
            try:
                ev = nxt.result()
            except StopAsyncIteration:
                return
            nxt = None
            yield ev
    finally:
        if nxt is not None and not nxt.done():
            nxt.cancel()


async def _until_disconnect(receive: Callable[[], Awaitable[Any]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _cancel_on_disconnect(req: Request, stream: aio.AsyncStream) -> asyncio.Future[None]:
    """Cancel ``stream``'s request when the client disconnects, even while nothing is being
    written (a long prefill); cancel the returned watcher once the answer is complete."""
    gone = asyncio.ensure_future(_until_disconnect(req.receive))
    gone.add_done_callback(lambda f: None if f.cancelled() else stream.cancel())
    return gone


def create_app(config: ServerConfig | None = None, **overrides: Any) -> Any:
    """The FastAPI application (mount it in your own service, or run it with uvicorn)."""
    cfg = dataclasses.replace(config or ServerConfig(), **overrides)
    server = Server(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        await server.startup()
        try:
            yield
        finally:
            await server.shutdown()

    api = FastAPI(title="erllama", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    api.state.erllama = server

    def error_response(err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @api.exception_handler(APIError)
    async def _api_error(_req: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @api.exception_handler(errors.ErllamaError)
    async def _erllama_error(_req: Request, exc: errors.ErllamaError) -> JSONResponse:
        return error_response(from_erllama(exc, cfg.retry_after_s))

    @api.exception_handler(404)
    async def _not_found(req: Request, _exc: Exception) -> JSONResponse:
        return error_response(APIError(404, f"no route {req.method} {req.url.path}", code="not_found"))

    @api.exception_handler(405)
    async def _not_allowed(req: Request, _exc: Exception) -> JSONResponse:
        return error_response(APIError(405, f"{req.method} is not allowed on {req.url.path}",
                                       code="method_not_allowed"))

    api.add_middleware(Guard, server=server)

    async def body_of(req: Request) -> Any:
        data = bytearray()
        async for chunk in req.stream():  # a chunked body has no length to check up front
            data += chunk
            if len(data) > cfg.max_body_bytes:
                raise APIError(413, f"the request body is over the limit of {cfg.max_body_bytes} bytes",
                               code="request_too_large")
        try:
            return json.loads(data)
        except ValueError as exc:
            raise bad(f"the request body is not valid JSON: {exc}") from None

    # ---- generation -----------------------------------------------------------------------------

    async def prepare(req: Request, gen: oa.Generation) -> tuple[str, list[int], dict[str, Any]]:
        """Admit the request (counted in flight from here: the caller leaves) and build its
        prompt and parameters."""
        mid = server.model_for(gen.model)
        server.admit(mid)
        server.enter(mid)  # before any await, so that concurrent admissions see it
        try:
            return mid, *(await _build(mid, gen))
        except BaseException:
            server.leave(mid)
            raise

    async def _build(mid: str, gen: oa.Generation) -> tuple[list[int], dict[str, Any]]:
        if gen.messages is not None:
            prompt = await aio.apply_chat_template(mid, gen.messages)
        elif isinstance(gen.prompt, str):
            prompt = await aio.tokenize(mid, gen.prompt)
        else:
            prompt = list(gen.prompt or [])
        info = erllama.model_info(mid)
        n_ctx = info.n_ctx // info.n_seq_max
        if len(prompt) >= n_ctx:
            raise bad(f"the prompt holds {len(prompt)} tokens; the model's context per sequence is {n_ctx}",
                      "messages" if gen.messages is not None else "prompt", "context_length_exceeded")
        params = dict(gen.params)
        room = n_ctx - len(prompt)
        params["max_tokens"] = min(gen.max_tokens, room) if gen.max_tokens is not None else room
        grammar = grammar_for(gen.response_format)
        if grammar is not None:
            params["grammar"] = grammar
        return prompt, params

    async def drain(stream: aio.AsyncStream) -> tuple[Completion, list[TokenLogprobs]]:
        lps: list[TokenLogprobs] = []
        async for ev in stream:
            if isinstance(ev, Done):
                return ev.completion, lps
            if ev.logprobs is not None:
                lps.append(ev.logprobs)
        raise errors.Released("the stream ended without its Done")

    async def run_to_end(req: Request, mid: str, prompt: list[int],
                         params: dict[str, Any]) -> tuple[Completion, list[TokenLogprobs]]:
        stream = aio.infer(mid, prompt, **params)
        gone = _cancel_on_disconnect(req, stream)
        try:
            done, lps = await drain(stream)
        finally:
            left = gone.done() and not gone.cancelled()
            gone.cancel()
        if left:  # the client went away: its request was cancelled
            server.metrics.finished(mid, "disconnected")
            raise APIError(499, "the client closed the connection", code="client_closed")
        server.metrics.completed(mid, done)
        return done, lps

    def streamed(mid: str, stream: aio.AsyncStream, gone: asyncio.Future[None], chat: bool,
                 include_usage: bool, rid: str, logprobs: bool) -> StreamingResponse:
        """The SSE answer, sent at once (a failure after this is an error event): a role
        chunk (chat), a chunk per token, a last chunk with the finish reason and the
        ``erllama`` extension, the usage chunk when asked, ``data: [DONE]``."""
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        async def events() -> AsyncIterator[bytes]:
            try:
                if chat:
                    yield _sse(oa.chat_chunk(rid, mid, created, {"role": "assistant", "content": ""}))
                lps: list[TokenLogprobs] = []  # of tokens whose text is held back, sent with the next text
                offset = 0
                async for ev in _pinging(stream, cfg.sse_ping_s):
                    if ev is None:
                        yield b": ping\n\n"
                        continue
                    if isinstance(ev, Token):
                        if ev.logprobs is not None:
                            lps.append(ev.logprobs)
                        if ev.text:
                            yield _sse(oa.chat_chunk(rid, mid, created, {"content": ev.text}, lps=lps) if chat
                                       else oa.completion_chunk(rid, mid, created, ev.text, lps=lps, offset=offset))
                            offset += len(ev.text)
                            lps = []
                        continue
                    done = ev.completion
                    if gone.done() and not gone.cancelled():
                        server.metrics.finished(mid, "disconnected")
                        return
                    server.metrics.completed(mid, done)
                    fin = oa.finish_reason(done)
                    yield _sse(oa.chat_chunk(rid, mid, created, {}, fin, done, lps=lps) if chat
                               else oa.completion_chunk(rid, mid, created, "", fin, done, lps=lps, offset=offset))
                    if include_usage:
                        yield _sse(oa.usage_chunk(rid, mid, created, obj, done))
            except asyncio.CancelledError:  # the server cancelled the body: the client is gone
                server.metrics.finished(mid, "disconnected")
                raise
            except Exception as exc:
                server.metrics.finished(mid, "error")
                yield _sse(from_erllama(exc, cfg.retry_after_s).body())
            finally:
                gone.cancel()
                await stream.aclose()
                server.leave(mid)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def generate(req: Request, gen: oa.Generation, chat: bool) -> Response:
        mid, prompt, params = await prepare(req, gen)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid_hex()}"
        if not gen.stream:
            try:
                done, lps = await run_to_end(req, mid, prompt, params)
            finally:
                server.leave(mid)
            asked = lps if "logprobs" in params else None
            return JSONResponse(oa.chat_response(rid, mid, done, asked) if chat
                                else oa.completion_response(rid, mid, done, asked))
        try:
            stream = aio.infer(mid, prompt, **params)
        except BaseException:
            server.leave(mid)
            raise
        gone = _cancel_on_disconnect(req, stream)
        return streamed(mid, stream, gone, chat, gen.include_usage, rid, "logprobs" in params)

    @api.post("/v1/chat/completions")
    async def chat_completions(req: Request) -> Response:
        return await generate(req, oa.parse_chat(await body_of(req)), chat=True)

    @api.post("/v1/completions")
    async def completions(req: Request) -> Response:
        return await generate(req, oa.parse_completion(await body_of(req)), chat=False)

    @api.post("/v1/embeddings")
    async def embeddings(req: Request) -> Response:
        model, items, encoding = oa.embedding_inputs(await body_of(req))
        mid = server.model_for(model)
        server.admit(mid)
        data, n_tokens = [], 0
        for i, item in enumerate(items):
            tokens = await aio.tokenize(mid, item) if isinstance(item, str) else item
            n_tokens += len(tokens)
            vec = await aio.embed(mid, tokens)
            value: Any = base64.b64encode(vec.astype("<f4").tobytes()).decode() if encoding == "base64" \
                else [float(x) for x in vec]
            data.append({"object": "embedding", "index": i, "embedding": value})
        return JSONResponse({"object": "list", "data": data, "model": mid,
                             "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})

    # ---- models, health, tokens, cache, metrics -------------------------------------------------

    @api.get("/v1/models")
    async def models() -> Response:
        data = [{"id": m.id, "object": "model", "created": int(m.loaded_at), "owned_by": "erllama",
                 "erllama": {"status": m.status, "n_ctx": m.n_ctx, "n_seq_max": m.n_seq_max, "quant": m.quant}}
                for m in erllama.list_models()]
        return JSONResponse({"object": "list", "data": data})

    @api.get("/health")
    async def health() -> Response:
        h = erllama.health()
        states = {m.id: m.status for m in erllama.list_models()} if h["state"] == "running" else {}
        states.update(server.loading)
        ok = h["state"] == "running" and bool(states) and all(s == "loaded" for s in states.values())
        body = {"status": "ok" if ok else "unavailable", "models": states, "failure": h["failure"]}
        if ok:
            return JSONResponse(body)
        why = h["failure"] or ("no model loaded" if not states else
                               "; ".join(f"{k}: {v}" for k, v in states.items() if v != "loaded"))
        err = unavailable(f"not ready: {why}", cfg.retry_after_s, "not_ready")
        return JSONResponse({**err.body(), **body}, status_code=503, headers=err.headers)

    @api.post("/tokenize")
    async def tokenize(req: Request) -> Response:
        body = await body_of(req)
        text = body.get("content", body.get("prompt")) if isinstance(body, dict) else None
        if not isinstance(text, str):
            raise bad("tokenize takes {\"model\", \"content\": str, \"add_special\": bool}", "content")
        add = body.get("add_special", True)
        if not isinstance(add, bool):
            raise bad(f"add_special must be a boolean, got {add!r}", "add_special")
        mid = server.model_for(body.get("model"))
        tokens = await aio.tokenize(mid, text, add_special=add)
        return JSONResponse({"model": mid, "tokens": tokens, "count": len(tokens)})

    @api.post("/detokenize")
    async def detokenize(req: Request) -> Response:
        body = await body_of(req)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise bad("detokenize takes {\"model\", \"tokens\": [int]}", "tokens")
        mid = server.model_for(body.get("model"))
        return JSONResponse({"model": mid, "content": await aio.detokenize(mid, tokens)})

    @api.get("/erllama/cache/stats")
    async def cache_stats() -> Response:
        return JSONResponse(await asyncio.to_thread(erllama.cache.stats))

    @api.post("/erllama/cache/gc")
    async def cache_gc() -> Response:
        return JSONResponse({"evicted": await asyncio.to_thread(erllama.cache.gc)})

    @api.get("/metrics")
    async def metrics() -> Response:
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)

    return api


class Guard:
    """Pure ASGI middleware (it leaves ``receive`` to the routes, so a disconnect reaches
    them): the API key, the declared body size, and the status of every answer for
    ``erllama_requests_total``."""

    def __init__(self, app: Any, server: Server) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cfg = self.server.config
        path = scope["path"]
        endpoint = path if path in ROUTES else "other"
        headers = dict(scope.get("headers") or [])
        err = None
        if cfg.api_key is not None and path != "/health":
            got = headers.get(b"authorization", b"")
            if not (got.startswith(b"Bearer ") and hmac.compare_digest(got[7:], cfg.api_key.encode())):
                err = APIError(401, "a valid API key is required: Authorization: Bearer <key>",
                               type="authentication_error", code="invalid_api_key")
        size = headers.get(b"content-length", b"")
        if err is None and size.isdigit() and int(size) > cfg.max_body_bytes:
            err = APIError(413, f"the request body has {int(size)} bytes, over the limit of {cfg.max_body_bytes}",
                           code="request_too_large")
        if err is not None:
            self.server.metrics.request(endpoint, err.status)
            body = json.dumps(err.body()).encode()
            await send({"type": "http.response.start", "status": err.status,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        status = [500]

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.server.metrics.request(endpoint, status[0])


ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics",
          "/tokenize", "/detokenize", "/erllama/cache/stats", "/erllama/cache/gc")


def uuid_hex() -> str:
    """A short random id for a response."""
    return uuid.uuid4().hex[:24]
