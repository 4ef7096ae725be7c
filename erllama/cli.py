"""The ``erllama`` console script."""

from __future__ import annotations

import argparse
import logging
import sys


def _cmd_demo(args: argparse.Namespace) -> int:
    from erllama import demo

    res = demo.run(prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, n_threads=args.threads,
                   cache_dir=args.cache_dir)
    return 0 if res["identical"] else 1


def _model_path(name: str) -> str:
    if name == "default":
        from erllama.default_model import default_model_path

        return str(default_model_path())
    return name


def _cmd_complete(args: argparse.Namespace) -> int:
    import erllama

    with erllama.running(**({"cache_dir": args.cache_dir} if args.cache_dir else {})):
        mid = erllama.load_model(_model_path(args.model), n_ctx=args.n_ctx, isolation="none",
                                 chat_template=args.chat_template)
        for event in erllama.infer(mid, args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                   seed=args.seed):
            if isinstance(event, erllama.Token):
                print(event.text, end="", flush=True)
            else:
                c = event.completion
                print(f"\n[{c.finish_reason}; {c.stats.completion_tokens} tokens; cache {c.cache_hit}; "
                      f"first token {c.stats.ttft_ms:.0f} ms; {c.stats.tokens_per_s:.1f} tokens/s]")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    import json

    import erllama
    import erllama.cache

    with erllama.running(**({"cache_dir": args.cache_dir} if args.cache_dir else {})):
        evicted = erllama.cache.gc() if args.action == "gc" else None
        st = erllama.cache.stats()
    if args.json:
        print(json.dumps({**st, "evicted": evicted} if evicted is not None else st, indent=1, sort_keys=True))
        return 0
    if evicted is not None:
        print(f"evicted {evicted} rows")
    print(f"{'tier':9} {'rows':>6} {'MB':>9} {'charged MB':>11} {'quota MB':>9} {'saves':>6} {'in':>5} "
          f"{'out':>5} {'evicted':>7} {'hits':>6}")
    for tier, t in st["tiers"].items():
        print(f"{tier:9} {t['rows']:6} {t['bytes'] / 1e6:9.1f} {t['charged'] / 1e6:11.1f} {t['quota'] / 1e6:9.0f} "
              f"{t['saves'] + t['adopted']:6} {t['moves_in']:5} {t['moves_out']:5} "
              f"{t['evictions'] + t['removed']:7} {t['hits']:6}")
    return 0


def _cmd_tree(args: argparse.Namespace) -> int:
    import json

    import erllama

    with erllama.running(**({"cache_dir": args.cache_dir} if args.cache_dir else {})):
        for path in args.model:
            erllama.load_model(path, n_ctx=args.n_ctx, isolation=args.isolation)
        out = erllama.tree(text=not args.json)
    print(json.dumps(out, indent=1) if args.json else out)
    return 0


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def _cmd_doctor(args: argparse.Namespace) -> int:
    import json

    from erllama import sysinfo

    info = sysinfo.system_info(check=not args.no_check, refresh=args.recheck)
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        build, amx = info["build"], info["amx"]
        print(f"erllama     {info['erllama']} on Python {info['python']} ({info['platform']})")
        print(f"cpu         {info['cpu']['model']}")
        print(f"cpu flags   {' '.join(info['cpu']['flags']) or '(none of interest)'}")
        print(f"compiled    {' '.join(k for k, v in info['compiled'].items() if v)}")
        print(f"llama.cpp   {info['llama_cpp']}")
        print(f"source      {build.get('source', '?')}")
        print(f"build key   {build.get('cache_key', '?')} ({build.get('cache_dir', '?')})")
        print(f"cmake args  {' '.join(build.get('cmake_args', []))}")
        print(f"compiler    {build.get('compiler', '?')}; built on {build.get('built_for_cpu', '?')}")
        print(f"amx         cpu has it: {amx['cpu_has']}; kernels compiled: {amx['compiled']}; "
              f"requested (ERLLAMA_AMX): {amx['requested']}")
        print(f"backends    {' '.join(info['backends']) or '?'}")
        cuda = build.get("cuda")
        gpus = ", ".join(d["name"] for d in info["gpu"])
        print(f"gpu         {gpus or 'none'}" + (f" (CUDA build for architectures {cuda['archs']})" if cuda else ""))
        print("devices")
        for d in info["devices"]:
            print(f"  {d['name']:<10} {d['type']:<5} {d['description']}: {_gib(d['free'])} free of "
                  f"{_gib(d['total'])}")
        check = info.get("selfcheck")
        if check is not None:
            if check["ok"]:
                verdict = "ok"
            else:
                verdict = f"FAILED at stage {check['stage']!r}: {check['message']}"
            print(f"self-check  {verdict} ({check['seconds']:.2f} s{', cached' if check['cached'] else ''})")
    check = info.get("selfcheck")
    return 0 if check is None or check["ok"] else 1


def _cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses
    import os

    import uvicorn

    from erllama.server import ServerConfig, create_app
    from erllama.server.config import load_toml, model_arg

    opts = {k: v for k, v in (("n_ctx", args.n_ctx), ("n_seq_max", args.n_seq_max), ("isolation", args.isolation),
                              ("chat_template", args.chat_template), ("n_threads", args.threads)) if v is not None}
    if args.config:
        cfg, (host, port) = load_toml(args.config)
    else:
        cfg, (host, port) = ServerConfig(), ("127.0.0.1", 8080)
    specs = [model_arg(m, opts) for m in [*args.models, *args.model]]
    if not specs and not cfg.models:
        from erllama.default_model import default_model_path

        specs = [model_arg(f"{default_model_path()}:gemma", {"chat_template": "gemma", **opts})]
    changes: dict[str, object] = {"models": (*cfg.models, *specs)}
    key = args.api_key or os.environ.get("ERLLAMA_API_KEY")
    if key:
        changes["api_key"] = key
    if args.max_queue is not None:
        changes["max_queue"] = args.max_queue
    if args.cache_dir:
        changes["app_config"] = {**cfg.app_config, "cache_dir": args.cache_dir}
    cfg = dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]
    host, port = args.host or host, args.port if args.port is not None else port
    print(f"erllama serving {[s.model_id or s.path for s in cfg.models]} on http://{host}:{port}/v1"
          f"{' (API key required)' if cfg.api_key else ''}", flush=True)
    uvicorn.run(create_app(cfg), host=host, port=port, log_level="warning" if not args.verbose else "info",
                timeout_graceful_shutdown=10)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from erllama import demo

    for n in args.prompt_tokens:
        res = demo.run(prompt_tokens=n, max_tokens=16, n_threads=args.threads)
        print(f"bench      {n} tokens: cold {res['cold_ttft_ms']:.0f} ms, warm {res['warm_ttft_ms']:.1f} ms, "
              f"identical {res['identical']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``erllama`` command."""
    parser = argparse.ArgumentParser(prog="erllama", description="llama.cpp with a token-exact KV-state cache")
    parser.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="start the tree, load the default model; cold then warm completions, "
                                    "a conversation resumed from the cache, timings and counters")
    p.add_argument("--prompt-tokens", type=int, default=2048, help="prompt length (default 2048)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens to generate (default 48)")
    p.add_argument("--threads", type=int, default=None, help="decode threads (default: all CPUs)")
    p.add_argument("--cache-dir", default=None, help="cache directory (default: a temporary one, removed after)")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("complete", help="complete a prompt and stream the text")
    p.add_argument("model", help="a GGUF path, or 'default' for Gemma 3 270M")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--chat-template", default=None, help="template name used when the GGUF has none")
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(func=_cmd_complete)
    p = sub.add_parser("cache", help="rows and bytes per tier of the persistent cache; gc evicts unused rows")
    p.add_argument("action", choices=["stats", "gc"], nargs="?", default="stats")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", action="store_true", help="print erllama.cache.stats() as one JSON object")
    p.set_defaults(func=_cmd_cache)
    p = sub.add_parser("tree", help="the live supervision tree of an application (with --model files loaded)")
    p.add_argument("--model", action="append", default=[], help="a GGUF file to load first (repeatable)")
    p.add_argument("--n-ctx", type=int, default=512)
    p.add_argument("--isolation", default="none", choices=["none", "probe", "process"])
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", action="store_true", help="print the tree as JSON")
    p.set_defaults(func=_cmd_tree)
    p = sub.add_parser("doctor", help="what this runtime is (build, CPU features compiled in and present, "
                                      "build-cache key) and whether it decodes a known-good model here")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--recheck", action="store_true", help="run the self-check now instead of using its cache")
    p.add_argument("--no-check", action="store_true", help="skip the self-check")
    p.set_defaults(func=_cmd_doctor)
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat, completions, embeddings, "
                                     "models, health, metrics) on 127.0.0.1 unless told otherwise")
    p.add_argument("models", nargs="*", help="GGUF files to serve, each PATH or PATH:ID (default: Gemma 3 270M)")
    p.add_argument("--model", action="append", default=[], help="another PATH[:ID] (repeatable)")
    p.add_argument("--config", default=None, help="a TOML file: [server], [app], [[models]] (erllama.server.config)")
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8080)")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY (or $ERLLAMA_API_KEY)")
    p.add_argument("--max-queue", type=int, default=None, help="requests that may wait per model (default 64)")
    p.add_argument("--n-ctx", type=int, default=None)
    p.add_argument("--n-seq-max", type=int, default=None, help="requests decoded together per model")
    p.add_argument("--isolation", default=None, choices=["none", "probe", "process"])
    p.add_argument("--chat-template", default=None, help="template name used when a GGUF has none")
    p.add_argument("--threads", type=int, default=None, help="decode threads per model (default: all CPUs)")
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(func=_cmd_serve)
    p = sub.add_parser("bench", help="cold vs warm time to first token on the default model")
    p.add_argument("--prompt-tokens", type=int, nargs="*", default=[512, 2048])
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_cmd_bench)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    from erllama import errors

    try:
        return args.func(args)
    except (errors.ErllamaError, OSError, ModuleNotFoundError) as exc:
        print(f"erllama: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
