"""The OpenAI wire format: request bodies checked into erllama requests, results shaped
into responses and stream chunks. Pure functions of their arguments (no I/O), so every rule
here is tested without a server.

A bad field is an :class:`APIError` 400 naming it (``param``). Unknown fields are ignored,
as OpenAI-compatible servers do; fields this server cannot honour (``n`` > 1, ``tools``,
``echo``) are refused rather than ignored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from erllama.server.errors import bad
from erllama.types import Completion, TokenLogprobs

__all__ = ["Generation", "chat_chunk", "chat_response", "completion_chunk", "completion_response",
           "embedding_inputs", "parse_chat", "parse_completion", "usage", "usage_chunk"]

ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_STOPS = 16


@dataclass
class Generation:
    """A checked chat or completion request."""

    model: str | None
    messages: list[dict[str, str]] | None = None  # chat
    prompt: str | list[int] | None = None  # completions
    max_tokens: int | None = None
    stream: bool = False
    include_usage: bool = False
    params: dict[str, Any] = field(default_factory=dict)  # erllama.infer parameters
    response_format: dict[str, Any] | None = None


def _number(body: dict[str, Any], name: str, lo: float, hi: float) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
        raise bad(f"{name} must be a number in [{lo:g}, {hi:g}], got {v!r}", name)
    return float(v)


def _int(body: dict[str, Any], name: str, lo: int, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise bad(f"{name} must be an integer {bound}, got {v!r}", name)
    return v


def _stop(body: dict[str, Any]) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise bad(f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them, got {v!r:.80}", "stop")
    return stops


def _common(body: Any, kind: str) -> Generation:
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise bad(f"model must be a model id, got {model!r}", "model")
    n = body.get("n")
    if n is not None and n != 1:
        raise bad(f"n must be 1 (this server returns one choice per request), got {n!r}", "n")
    if body.get("tools") or body.get("functions"):
        raise bad("tools are not supported by this server", "tools")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad(f"stream must be a boolean, got {stream!r}", "stream")
    opts = body.get("stream_options")
    if opts is not None and (not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool)):
        raise bad(f"stream_options must be {{\"include_usage\": bool}}, got {opts!r}", "stream_options")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad(f"user must be a string, got {user!r}", "user")
    names = ("max_completion_tokens", "max_tokens") if kind == "chat" else ("max_tokens",)
    max_tokens = None
    for name in names:
        got = _int(body, name, 1)
        max_tokens = got if got is not None else max_tokens
    params: dict[str, Any] = {"temperature": 1.0}  # OpenAI's default; 0 is greedy
    for name, key, lo, hi in (("temperature", "temperature", 0.0, 2.0), ("top_p", "top_p", 0.0, 1.0),
                              ("min_p", "min_p", 0.0, 1.0), ("repetition_penalty", "repetition_penalty", 0.0, 10.0),
                              ("repeat_penalty", "repetition_penalty", 0.0, 10.0),
                              ("frequency_penalty", "frequency_penalty", -2.0, 2.0),
                              ("presence_penalty", "presence_penalty", -2.0, 2.0)):
        v = _number(body, name, lo, hi)
        if v is not None:
            params[key] = v
    if params.get("repetition_penalty") == 0.0:
        raise bad("repetition_penalty must be > 0", "repetition_penalty")
    top_k = _int(body, "top_k", 0)
    if top_k is not None:
        params["top_k"] = top_k
    seed = _int(body, "seed", -(1 << 63), (1 << 64) - 1)
    if seed is not None:
        params["seed"] = seed % (1 << 32)
    stops = _stop(body)
    if stops:
        params["stop"] = stops
    ext = body.get("erllama")
    if ext is not None:
        if not isinstance(ext, dict):
            raise bad(f"erllama must be an object of erllama options, got {ext!r:.80}", "erllama")
        unknown = sorted(set(ext) - {"session_id", "namespace"})
        if unknown:
            raise bad(f"unknown erllama options {unknown}; known: ['namespace', 'session_id']", "erllama")
        ns = ext.get("namespace")
        if ns is not None:
            if not isinstance(ns, str) or not 0 < len(ns.encode()) <= 256:
                raise bad(f"erllama.namespace must be a string of 1 to 256 bytes, got {ns!r:.80}",
                          "erllama.namespace")
            params["namespace"] = ns.encode()
        sid = ext.get("session_id")
        if sid is not None:
            if not isinstance(sid, str) or not sid:
                raise bad(f"erllama.session_id must be a non-empty string, got {sid!r}", "erllama.session_id")
            params["session_id"] = sid
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise bad(f"response_format must be {{\"type\": \"text\" | \"json_object\" | \"json_schema\"}}, "
                      f"got {fmt!r:.80}", "response_format")
        if fmt["type"] == "json_schema":
            js = fmt.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
                raise bad("response_format.json_schema must be an object with a 'schema' object",
                          "response_format.json_schema")
        if fmt["type"] == "text":
            fmt = None
    return Generation(model=model, max_tokens=max_tokens, stream=stream,
                      include_usage=bool(opts and opts.get("include_usage")), params=params, response_format=fmt)


def _content(i: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content[{j}] must be a text part ({{\"type\": \"text\", \"text\": ...}}); "
                          f"this server reads text only", f"messages[{i}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"messages[{i}].content must be a string or a list of text parts, got {content!r:.80}",
              f"messages[{i}].content")


def parse_chat(body: Any) -> Generation:
    """A ``/v1/chat/completions`` body."""
    gen = _common(body, "chat")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"messages[{i}] must be an object with a role in {list(ROLES)}, got {m!r:.80}",
                      f"messages[{i}].role")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _content(i, m.get("content", ""))})
    gen.messages = out
    lp, top = body.get("logprobs"), body.get("top_logprobs")
    if lp not in (None, False, True):
        raise bad(f"logprobs must be a boolean, got {lp!r}", "logprobs")
    if top is not None:
        _int(body, "top_logprobs", 0, 20)
        if not lp:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
    if lp:
        gen.params["logprobs"] = top or 0
    return gen


def parse_completion(body: Any) -> Generation:
    """A ``/v1/completions`` body (one prompt: a string, token ids, or a list holding one)."""
    gen = _common(body, "completion")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        gen.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        gen.prompt = list(prompt)
    else:
        raise bad("prompt must be a non-empty string or list of token ids (one prompt per request), "
                  f"got {prompt!r:.80}", "prompt")
    lp = _int(body, "logprobs", 0, 20)
    if lp is not None:
        gen.params["logprobs"] = lp
    if body.get("echo") or body.get("suffix") or (body.get("best_of") not in (None, 1)):
        raise bad("echo, suffix and best_of are not supported by this server", "echo")
    return gen


def embedding_inputs(body: Any) -> tuple[str | None, list[str | list[int]], str]:
    """The model, the inputs and the encoding (``float`` or ``base64``: little-endian
    float32, what the ``openai`` client asks for by default) of a ``/v1/embeddings`` body."""
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise bad(f"model must be a model id, got {model!r}", "model")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise bad(f"encoding_format must be 'float' or 'base64', got {encoding!r}", "encoding_format")
    raw = body.get("input")
    items: Any = [raw] if isinstance(raw, str) or (
        isinstance(raw, list) and raw and all(isinstance(t, int) for t in raw)) else raw
    if not isinstance(items, list) or not items or len(items) > 256:
        raise bad("input must be a string, a list of token ids, or a list of (at most 256) of either", "input")
    for i, item in enumerate(items):
        ok = (isinstance(item, str) and item) or (
            isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item))
        if not ok:
            raise bad(f"input[{i}] must be a non-empty string or list of token ids, got {item!r:.80}", "input")
    return model, items, encoding


def _text(b: bytes) -> str:
    return b.decode("utf-8", "replace")


def chat_logprobs(lps: list[TokenLogprobs]) -> dict[str, Any]:
    """Chat ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    return {"content": [{"token": _text(lp.token), "logprob": lp.logprob, "bytes": list(lp.token),
                         "top_logprobs": [{"token": _text(t), "logprob": v, "bytes": list(t)} for t, v in lp.top]}
                        for lp in lps]}


def completion_logprobs(lps: list[TokenLogprobs], offset: int = 0) -> dict[str, Any]:
    """Completion ``logprobs``: tokens, their log-probabilities, the top alternatives and
    each token's offset in the text (from ``offset``)."""
    offsets = []
    for lp in lps:
        offsets.append(offset)
        offset += len(_text(lp.token))
    return {"tokens": [_text(lp.token) for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{_text(t): v for t, v in lp.top} for lp in lps], "text_offset": offsets}


def usage(done: Completion) -> dict[str, Any]:
    """OpenAI ``usage`` with ``prompt_tokens_details.cached_tokens`` (restored from the cache)."""
    p, c = done.stats.prompt_tokens, done.stats.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": done.cache_delta.read}}


def erllama_info(done: Completion) -> dict[str, Any]:
    """The ``erllama`` extension of a response: the cache's part and the timings."""
    return {"cache_hit": done.cache_hit, "cached_tokens": done.cache_delta.read, "cache_tier": done.cache_delta.tier,
            "finish_key": done.finish_key.hex() if done.finish_key else None,
            "ttft_ms": round(done.stats.ttft_ms, 3), "queued_ms": round(done.stats.queued_ms, 3),
            "tokens_per_s": round(done.stats.tokens_per_s, 3)}


def finish_reason(done: Completion) -> str:
    """OpenAI's finish reason: ``stop`` (end of text or a stop sequence) or ``length``."""
    return "length" if done.finish_reason == "length" else "stop"


def chat_response(rid: str, model: str, done: Completion, lps: list[TokenLogprobs] | None = None) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                         "finish_reason": finish_reason(done),
                         "logprobs": chat_logprobs(lps) if lps is not None else None}],
            "usage": usage(done), "erllama": erllama_info(done)}


def completion_response(rid: str, model: str, done: Completion,
                        lps: list[TokenLogprobs] | None = None) -> dict[str, Any]:
    """A ``text_completion`` object."""
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": done.text, "finish_reason": finish_reason(done),
                         "logprobs": completion_logprobs(lps) if lps is not None else None}],
            "usage": usage(done), "erllama": erllama_info(done)}


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, Any], finish: str | None = None,
               done: Completion | None = None, lps: list[TokenLogprobs] | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk``; the last one carries ``finish_reason`` and the
    ``erllama`` extension."""
    out: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                        "logprobs": chat_logprobs(lps) if lps else None}]}
    if done is not None:
        out["erllama"] = erllama_info(done)
    return out


def completion_chunk(rid: str, model: str, created: int, text: str, finish: str | None = None,
                     done: Completion | None = None, lps: list[TokenLogprobs] | None = None,
                     offset: int = 0) -> dict[str, Any]:
    """One streamed ``text_completion`` chunk."""
    out: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created, "model": model,
                           "choices": [{"index": 0, "text": text, "finish_reason": finish,
                                        "logprobs": completion_logprobs(lps, offset) if lps else None}]}
    if done is not None:
        out["erllama"] = erllama_info(done)
    return out


def usage_chunk(rid: str, model: str, created: int, obj: str, done: Completion) -> dict[str, Any]:
    """The last chunk with ``stream_options.include_usage``: no choices, the usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage(done)}


