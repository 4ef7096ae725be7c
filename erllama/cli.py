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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
