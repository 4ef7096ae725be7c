"""What HTTP costs, and how the server compares with llama-cpp-python's (``llama_cpp.server``).

1. Overhead: the same chats (temperature 0) streamed through ``erllama serve`` with the real
   ``openai`` client, and in-process (``bench/streams.py``), at 1 and 4 concurrent streams:
   aggregate generated tokens/s, the ratio, and the cost per token over HTTP (goal <= 5 %).
2. Against llama-cpp-python's server, same model, context per sequence, threads and batch:
   warm time to first token on a resent chat with a ~2k-token system prompt (resent at once,
   and after another conversation used the server), and 4 clients at once (aggregate
   tokens/s, slowest time to first token). llama-cpp-python is built in its own venv as
   ``compare_llama_cpp_python.py`` builds it (``--skip-llcp`` leaves it out).

Every server runs alone (one at a time) on 127.0.0.1; the numbers and ratios are printed.
Usage: ``python bench/http.py [--tokens 64] [--rounds 3] [--threads N] [--skip-llcp]``.
"""

# ruff: noqa: E402  (the path is fixed before the imports, see below)
from __future__ import annotations

import sys
from pathlib import Path

# this file is named as the issue asks, like the standard library's ``http`` package: move its
# folder behind the standard library on the path, or every ``import http`` would find it
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import httpx
import openai

import erllama
from erllama.default_model import default_model_path

from report import fmt, git_rev, med
from streams import timed_streams

NOTES = ("Meeting notes, library committee. The library opens at nine and closes at six. Books are "
         "lent for three weeks and can be renewed twice. The reading room is quiet after four. ")
QUESTIONS = ["Write one sentence about the sea.", "Write one sentence about a mountain.",
             "Write one sentence about a forest.", "Write one sentence about a desert."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(cmd: list[str], health: str, env: dict[str, str] | None = None, timeout: float = 300) -> Iterator[None]:
    """Run a server process until its health URL answers 200; stop it (SIGINT) after."""
    log = tempfile.NamedTemporaryFile("w+", prefix="erllama-bench-http-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise SystemExit(f"{cmd[:4]} exited:\n{log.read()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(health, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"{cmd[:4]} not ready in {timeout} s")
            time.sleep(0.1)
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def http_chats(base: str, model: str, chats: list[list[dict]], max_tokens: int) -> list[dict]:
    """Stream the chats at once; per chat: time to first token, token arrival times."""
    async with openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600) as client:
        async def one(messages: list[dict], t0: float) -> dict:
            stream = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                          temperature=0, stream=True)
            stamps: list[float] = []
            parts: list[str] = []
            finish = None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    stamps.append(time.perf_counter())
                    parts.append(chunk.choices[0].delta.content)
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
            return {"ttft_s": stamps[0] - t0 if stamps else float("nan"), "stamps": stamps, "text": "".join(parts),
                    "finish": finish}

        t0 = time.perf_counter()
        return await asyncio.gather(*(one(m, t0) for m in chats))


def aggregate(runs: list[dict], t0_key: str = "t0") -> tuple[float, float]:
    """(aggregate generated tokens/s from the first token on, slowest first token in s)."""
    empty = [r for r in runs if not r["stamps"]]
    if empty:
        raise SystemExit(f"{len(empty)} of {len(runs)} streams produced no text: {empty}")
    first = min(r["stamps"][0] for r in runs)
    last = max(r["stamps"][-1] for r in runs)
    n = sum(len(r["stamps"]) - 1 for r in runs)
    return n / (last - first) if last > first else float("nan"), max(r["ttft_s"] for r in runs)


def chats_for(k: int) -> list[list[dict]]:
    return [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" ({i})"}] for i in range(k)]


def long_chat(tag: str) -> list[dict]:
    """~2k tokens in one user turn (llama-cpp-python's gemma format drops system messages)."""
    return [{"role": "user", "content": f"{tag}. " + NOTES * 50 + "\nWhen does the library open?"}]


def erllama_overhead(args: argparse.Namespace, model: str) -> dict:
    """Aggregate tokens/s in-process and over HTTP, per stream count."""
    out: dict = {}
    root = tempfile.mkdtemp(prefix="erllama-bench-http-")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "erllama.cli", "serve", f"{model}:m", "--port", str(port), "--n-ctx",
           str(args.n_ctx * 4), "--n-seq-max", "4", "--isolation", "none", "--chat-template", "gemma",
           "--threads", str(args.threads), "--cache-dir", f"{root}/http"]
    with server(cmd, base + "/health"):
        asyncio.run(http_chats(base, "m", chats_for(4), 8))  # warm up (first requests, the sampler chains)
        for k in args.streams:
            vals = []
            for _ in range(args.rounds):
                runs = asyncio.run(http_chats(base, "m", chats_for(k), args.tokens))
                vals.append(aggregate(runs)[0])
            out[("http", k)] = vals
        # section 2 for erllama: a resent long chat, at once and after another conversation
        n = httpx.post(base + "/tokenize", json={"content": long_chat("x")[0]["content"]}).json()["count"]
        print(f"   (the long chat holds {n} tokens before its template)", flush=True)
        out["warm"] = resent(base, "m", args)
        out["clients"] = [aggregate(asyncio.run(http_chats(base, "m", chats_for(4), args.tokens)))
                          for _ in range(args.rounds)]
    with erllama.running(cache_dir=f"{root}/inproc"):
        mid = erllama.load_model(model, n_ctx=args.n_ctx * 4, n_seq_max=4, isolation="none", chat_template="gemma",
                                 n_threads=args.threads)
        for k in args.streams:
            prompts = [erllama.apply_chat_template(mid, c) for c in chats_for(k)]
            vals = []
            for _ in range(args.rounds):
                runs, _ = timed_streams(mid, prompts, args.tokens)
                vals.append(aggregate([{"stamps": r.stamps, "ttft_s": r.ttft_ms / 1e3} for r in runs])[0])
            out[("inproc", k)] = vals
    return out


def resent(base: str, model: str, args: argparse.Namespace) -> dict:
    """Time to first token of a long chat: cold, resent at once, resent after another chat."""
    got: dict = {"cold": [], "at_once": [], "after_other": []}
    for r in range(args.rounds):
        chat = long_chat(f"round {r}")
        got["cold"].append(asyncio.run(http_chats(base, model, [chat], 8))[0]["ttft_s"])
        time.sleep(1.0)  # the saves of the first answer land
        got["at_once"].append(asyncio.run(http_chats(base, model, [chat], 8))[0]["ttft_s"])
        asyncio.run(http_chats(base, model, [long_chat(f"other {r}")], 8))
        time.sleep(1.0)
        got["after_other"].append(asyncio.run(http_chats(base, model, [chat], 8))[0]["ttft_s"])
    return got


def llcp_server(args: argparse.Namespace, model: str) -> dict | None:
    """The same measurements against llama_cpp.server (None when it cannot be installed)."""
    sys.path.insert(0, str(HERE))
    import compare_llama_cpp_python as cmp

    python = cmp.ensure_venv(args.venv)
    probe = subprocess.run([str(python), "-c", "import llama_cpp.server, sse_starlette, starlette_context"],
                           capture_output=True)
    if probe.returncode != 0:
        print("installing llama-cpp-python's server dependencies into its venv", flush=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "fastapi", "uvicorn", "sse-starlette",
                        "starlette-context", "pydantic-settings"], check=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [str(python), "-m", "llama_cpp.server", "--model", model, "--n_ctx", str(args.n_ctx), "--n_threads",
           str(args.threads), "--n_batch", "512", "--chat_format", "gemma", "--interrupt_requests", "False",
           "--host", "127.0.0.1", "--port", str(port)]  # queue concurrent requests instead of cutting them off
    out: dict = {}
    with server(cmd, base + "/v1/models"):
        asyncio.run(http_chats(base, "m", chats_for(1), 4))  # warm up
        out["warm"] = resent(base, "m", args)
        out["clients"] = [aggregate(asyncio.run(http_chats(base, "m", chats_for(4), args.tokens)))
                          for _ in range(args.rounds)]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF (default: Gemma 3 270M)")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per stream")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--streams", type=int, nargs="*", default=[1, 4])
    p.add_argument("--n-ctx", type=int, default=4096, help="context per sequence")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--skip-llcp", action="store_true")
    p.add_argument("--venv", type=Path, default=None)
    args = p.parse_args(argv)
    if args.venv is None:
        sys.path.insert(0, str(HERE))
        import compare_llama_cpp_python as cmp

        args.venv = cmp.DEFAULT_VENV
    model = str(Path(args.model) if args.model else default_model_path())
    print(f"bench/http.py on {git_rev()}: {Path(model).name}, {args.threads} threads, {args.tokens} tokens per "
          f"stream, {args.rounds} rounds (median [min-max])", flush=True)
    er = erllama_overhead(args, model)
    print("\n1. streaming over HTTP (erllama serve + openai client) vs in-process, aggregate tokens/s")
    for k in args.streams:
        http, inproc = er[("http", k)], er[("inproc", k)]
        ratio = med(http)[0] / med(inproc)[0]
        per_token_ms = (1 / med(http)[0] - 1 / med(inproc)[0]) * 1e3 * k
        print(f"   {k} stream(s): in-process {fmt(inproc)}  HTTP {fmt(http)}  HTTP/in-process {ratio:.3f} "
              f"(cost {100 * (1 - ratio):+.1f} %, {per_token_ms:+.2f} ms per token per stream)")
    lc = None if args.skip_llcp else llcp_server(args, model)
    print("\n2. against llama-cpp-python's server (llama_cpp.server), same model, threads, context per sequence")
    rows = [("erllama", er)] + ([("llama-cpp-python", lc)] if lc else [])
    for name, d in rows:
        w = d["warm"]
        print(f"   {name:17} chat with a ~2k-token system prompt: cold TTFT {fmt([x * 1e3 for x in w['cold']])} ms, "
              f"resent at once {fmt([x * 1e3 for x in w['at_once']], '.1f')} ms, resent after another chat "
              f"{fmt([x * 1e3 for x in w['after_other']], '.1f')} ms (cold/resent "
              f"{med(w['cold'])[0] / med(w['at_once'])[0]:.0f}x and "
              f"{med(w['cold'])[0] / med(w['after_other'])[0]:.0f}x)")
        tps = [c[0] for c in d["clients"]]
        slow = [c[1] * 1e3 for c in d["clients"]]
        print(f"   {name:17} 4 clients at once: {fmt(tps)} tokens/s aggregate, "
              f"slowest first token {fmt(slow, '.0f')} ms")
    if lc:
        def ratio(key: str) -> float:
            return med(lc["warm"][key])[0] / med(er["warm"][key])[0]

        print(f"   ratios (llama-cpp-python / erllama): warm TTFT resent at once {ratio('at_once'):.1f}x, after "
              f"another chat {ratio('after_other'):.1f}x; 4 clients tokens/s "
              f"{med([c[0] for c in er['clients']])[0] / med([c[0] for c in lc['clients']])[0]:.2f}x (erllama/llcp), "
              f"slowest TTFT {med([c[1] for c in lc['clients']])[0] / med([c[1] for c in er['clients']])[0]:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
