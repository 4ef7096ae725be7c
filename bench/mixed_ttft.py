"""A cache hit beside a cold prefill: its time to first token, short prefills first against
admission order, same run.

One model (default: Gemma 3 270M, ``n_seq_max=2``, ``n_batch=512``). Per repetition: a
``--prefix``-token prompt is cached (a cold run), then a fresh ``--cold``-token prompt starts
and, once its prefill runs, a hit on the cached prefix plus ``--tail`` new tokens
(``max_tokens=1`` each). Printed per planner: the hit's median time to first token alone
(no other work), beside the cold prefill, and the cold prompt's own; then the ratios.
``admission`` is the planner before short prefills went first (every prefill in admission
order), patched in for the comparison. Run:
``python bench/mixed_ttft.py [--model gemma|tiny|PATH] [--reps 5]``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

try:
    import erllama
except ImportError:  # run from a checkout without an installed erllama
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import erllama
import erllama.model.scheduler as scheduler
from erllama.default_model import default_model_path
from erllama.testing.tinymodel import write_tiny_model


def timed(mid: str, prompt: list[int], out: dict, key: str) -> None:
    """Run ``prompt`` for one token; store its wall time (ms) and cache hit under ``key``."""
    t0 = time.perf_counter()
    done = erllama.complete(mid, prompt, max_tokens=1, temperature=0)
    out[key] = ((time.perf_counter() - t0) * 1e3, done.cache_hit)


def one_rep(mid: str, rng: random.Random, args: argparse.Namespace, lo: int, hi: int) -> dict:
    """Alone and beside a cold prefill: the hit's and the cold prompt's times."""
    prefix = [rng.randrange(lo, hi) for _ in range(args.prefix)]
    erllama.complete(mid, prefix, max_tokens=1, temperature=0)
    erllama.cache.current().flush(30)
    res: dict = {}
    timed(mid, prefix + [rng.randrange(lo, hi) for _ in range(args.tail)], res, "alone")
    cold = [rng.randrange(lo, hi) for _ in range(args.cold)]
    hit = prefix + [rng.randrange(lo, hi) for _ in range(args.tail)]
    th = threading.Thread(target=timed, args=(mid, cold, res, "cold"))
    th.start()
    time.sleep(args.delay_ms / 1e3)  # the cold prefill is under way
    timed(mid, hit, res, "beside")
    th.join(600)
    assert res["alone"][1] != "cold" and res["beside"][1] != "cold", res
    return {k: v[0] for k, v in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma", help="gemma (default model), tiny (synthetic) or a GGUF path")
    ap.add_argument("--prefix", type=int, default=1024, help="cached prefix tokens")
    ap.add_argument("--tail", type=int, default=24, help="new tokens after the cached prefix")
    ap.add_argument("--cold", type=int, default=2048, help="the cold prompt's tokens")
    ap.add_argument("--delay-ms", type=float, default=100)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="erllama-bench-mixed-"))
    if args.model == "tiny":
        path, (lo, hi) = write_tiny_model(tmp / "tiny.gguf"), (3, 300)
    else:
        path = default_model_path() if args.model == "gemma" else Path(args.model)
        lo, hi = 1000, 200000
    opts = {"n_ctx": 8192, "n_seq_max": 2, "n_batch": 512, "n_threads": args.threads}
    short_first = scheduler.short_prefill
    out = {}
    with erllama.running(cache_dir=str(tmp / "cache"), ram_quota=2 << 30,
                         policy={"min_tokens": 16, "cold_min_tokens": 16}):
        mid = erllama.load_model(path, model_id="m", isolation="none", **opts)
        rng = random.Random(0)
        reps: dict[str, list[dict]] = {"short first": [], "admission": []}
        for _ in range(args.reps):  # interleaved, so drift on a shared machine hits both
            for name in reps:
                scheduler.short_prefill = short_first if name == "short first" else (lambda *a, **k: 0)
                reps[name].append(one_rep(mid, rng, args, lo, hi))
        scheduler.short_prefill = short_first
    print(f"model {path}; cached prefix {args.prefix} + {args.tail} new tokens beside a {args.cold}-token "
          f"cold prompt; n_batch 512, {args.threads} threads; median of {args.reps}")
    for name, rows in reps.items():
        med = {k: statistics.median(r[k] for r in rows) for k in ("alone", "beside", "cold")}
        out[name] = med
        print(f"{name:12s} hit alone {med['alone']:8.1f} ms  hit beside a cold prefill {med['beside']:8.1f} ms  "
              f"cold prompt {med['cold']:8.1f} ms", flush=True)
    a, s = out["admission"], out["short first"]
    print(f"hit beside a cold prefill: admission / short first = {a['beside'] / s['beside']:.1f}x; "
          f"the cold prompt's time: short first / admission = {s['cold'] / a['cold']:.2f}x")
    print("JSON " + json.dumps(out))


if __name__ == "__main__":
    main()
