"""Does saving one stream's large state stall the other streams? Same run, saves off vs on.

Stream B holds a long context (``--context`` tokens of the default model, restored from the
cache) and generates; stream A, a short prompt, generates beside it. Run twice on the same
model and cache: B with continued saves off, and B saving its whole state every
``--interval`` generated tokens (each save packs the full context, ``state_get``, and hands
it to the writer pool). Printed: A's tokens/s in both runs and the ratio (goal: >= 0.80),
how many of B's saves fell inside A's generation, and the time the model actor spent packing
them (``pack_total_ns``). Run: ``python bench/save_stall.py [--context 8000] [--interval 16]``.
"""

from __future__ import annotations

import argparse
import json
import random
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
from erllama.default_model import default_model_path


def run_once(path: str, opts: dict, interval: int, long: list[int], short: list[int], a_tokens: int) -> dict:
    """Load with continued saves every ``interval`` tokens; B restores ``long`` and generates,
    A generates ``a_tokens`` beside it. A's tokens/s, B's saves in A's window, pack time."""
    policy = {"continued_interval": interval, "min_tokens": 16}
    mid = erllama.load_model(path, policy=policy, **{"isolation": "none", **opts})
    try:
        b_first = threading.Event()
        b_done = threading.Event()
        b_tokens = [0]

        def b_sink(ev):
            if isinstance(ev, erllama.Token) and ev.id >= 0:
                b_tokens[0] += 1
                b_first.set()
            elif not isinstance(ev, erllama.Token):
                b_done.set()
                b_first.set()

        erllama.infer(mid, long, sink=b_sink, max_tokens=4 * a_tokens, temperature=1.0, seed=1)
        assert b_first.wait(300), "B did not start"
        c0 = erllama.cache.counters()
        stamps = []
        for ev in erllama.infer(mid, short, max_tokens=a_tokens, temperature=1.0, seed=2):
            if isinstance(ev, erllama.Token) and ev.id >= 0:
                stamps.append(time.perf_counter())
        c1 = erllama.cache.counters()
        b_still = not b_done.is_set()
        rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
        return {"interval": interval, "a_tok_s": rate, "a_tokens": len(stamps),
                "b_saves_in_window": c1["saves_continued"] - c0["saves_continued"],
                "pack_ms_in_window": (c1["pack_total_ns"] - c0["pack_total_ns"]) / 1e6,
                "parked_ms_in_window": (c1["pack_parked_ns"] - c0["pack_parked_ns"]) / 1e6,
                "b_ran_throughout": b_still}
    finally:
        erllama.unload(mid)
        erllama.cache.current().flush(120)


def measure(path: str, opts: dict, context: int, interval: int, a_tokens: int,
            token_range: tuple[int, int] = (1000, 200000)) -> dict:
    """Both layouts, saves off and on, in an application of its own; per layout the runs and
    A's tokens/s ratio."""
    rng = random.Random(0)
    long = [rng.randrange(*token_range) for _ in range(context)]
    short = [rng.randrange(*token_range) for _ in range(32)]
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp, \
            erllama.running(cache_dir=tmp, ram_quota=64 << 30, ram_file_quota=0, disk_quota=0):
        for layout, extra in (("split streams", {}), ("resident tier", {"resident_seqs": 2})):
            lopts = {"isolation": "none", **opts, **extra}
            seed = erllama.load_model(path, **lopts)
            t0 = time.perf_counter()
            erllama.complete(seed, long, max_tokens=1)
            erllama.cache.current().flush(300)
            erllama.unload(seed)
            print(f"{layout}: B's context of {context} tokens prefilled and saved in "
                  f"{time.perf_counter() - t0:.1f} s")
            runs: dict = {}
            for label, every in (("saves off", 10**6), ("saves on", interval)):
                r = run_once(path, lopts, every, long, short, a_tokens)
                runs[label] = r
                print(f"  {label:9s}: A {r['a_tok_s']:6.1f} tok/s over {r['a_tokens']} tokens; B's saves during A: "
                      f"{r['b_saves_in_window']}, {r['pack_ms_in_window']:.0f} ms in the model actor, "
                      f"{r['parked_ms_in_window']:.0f} ms copying in writers; B ran throughout: "
                      f"{r['b_ran_throughout']}", flush=True)
            runs["ratio"] = runs["saves on"]["a_tok_s"] / max(runs["saves off"]["a_tok_s"], 1e-9)
            print(f"  A keeps {runs['ratio']:.2f} of its tokens/s while B's {context}-token state is saved "
                  f"every {interval} tokens (goal >= 0.80)", flush=True)
            out[layout] = runs
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=8000, help="B's context (tokens)")
    ap.add_argument("--interval", type=int, default=16, help="B's continued-save interval in the saves-on run")
    ap.add_argument("--a-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    opts = {"n_ctx": 2 * (args.context + 1024), "n_seq_max": 2, "n_batch": 512, "n_threads": args.threads}
    out = measure(str(default_model_path()), opts, args.context, args.interval, args.a_tokens)
    print("JSON " + json.dumps(out))


if __name__ == "__main__":
    main()
