"""The resident tier against the ram tier: time to first token of an exact hit, same run.

For each model (the tiny synthetic one and the default model, Gemma 3 270M) and prompt
length, one application holds two copies of the model: ``ram`` (no resident tier: a hit
restores the row's bytes from the ram tier with ``state_set``) and ``resident``
(``resident_seqs=2``: a hit shares the KV cells of a spare sequence, no bytes move). Each
gets a cold run, then ``--reps`` exact hits (``max_tokens=1``); printed: the median warm
TTFT of each, the tier that served it, and the ratio; then the decode speed of each
configuration (the resident one runs one unified KV stream). Run:
``python bench/resident.py [--models tiny,gemma] [--reps 7]``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

try:
    import erllama
except ImportError:  # run from a checkout without an installed erllama
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import erllama
from erllama.default_model import default_model_path
from erllama.testing.tinymodel import write_tiny_model

SETUPS = {
    # model: (lengths, load options, token id range)
    "tiny": ((128, 512, 2000), {"n_ctx": 8192, "n_seq_max": 2, "n_batch": 512, "n_threads": 2}, (3, 300)),
    "gemma": ((512, 2048, 4096), {"n_ctx": 16384, "n_seq_max": 2, "n_batch": 512, "n_threads": 2}, (1000, 200000)),
}


def warm_ttfts(mid: str, prompt: list[int], reps: int) -> tuple[float, list[float], set[str]]:
    """The cold TTFT, the warm TTFTs and the tiers that served the warm runs."""
    cold = erllama.complete(mid, prompt, max_tokens=1, temperature=0)
    assert cold.cache_hit == "cold", cold.cache_hit
    erllama.cache.current().flush(30)
    ttfts, tiers = [], set()
    for _ in range(reps):
        w = erllama.complete(mid, prompt, max_tokens=1, temperature=0)
        assert w.cache_hit == "exact" and w.tokens == cold.tokens, (w.cache_hit, w.tokens, cold.tokens)
        ttfts.append(w.stats.ttft_ms)
        tiers.add(str(w.cache_delta.tier))
    return cold.stats.ttft_ms, ttfts, tiers


def decode_speed(mid: str, prompt: list[int]) -> float:
    """Tokens/s of a 64-token generation after a short prompt."""
    done = erllama.complete(mid, prompt, max_tokens=64, temperature=0)
    return done.stats.tokens_per_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,gemma")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    rng = random.Random(0)
    out = []
    tmp = Path(tempfile.mkdtemp(prefix="erllama-bench-resident-"))
    for name in args.models.split(","):
        lengths, opts, (lo, hi) = SETUPS[name]
        path = write_tiny_model(tmp / "tiny.gguf") if name == "tiny" else default_model_path()
        with erllama.running(cache_dir=str(tmp / f"c-{name}"), ram_file_dir=str(tmp / f"shm-{name}"),
                             ram_quota=4 << 30, policy={"min_tokens": 16, "cold_min_tokens": 16}):
            ram = erllama.load_model(path, model_id=f"{name}-ram", isolation="none", **opts)
            res = erllama.load_model(path, model_id=f"{name}-resident", isolation="none", resident_seqs=2, **opts)
            for n in lengths:
                prompt = [rng.randrange(lo, hi) for _ in range(n)]
                row = {"model": name, "tokens": n}
                for label, mid in (("ram", ram), ("resident", res)):
                    cold, warm, tiers = warm_ttfts(mid, prompt, args.reps)
                    row[label] = {"cold_ms": cold, "warm_ms": statistics.median(warm), "tiers": sorted(tiers)}
                row["ratio"] = row["ram"]["warm_ms"] / max(row["resident"]["warm_ms"], 1e-6)
                out.append(row)
                print(f"{name:6s} {n:5d} tokens  cold {row['ram']['cold_ms']:8.1f} ms  "
                      f"ram hit {row['ram']['warm_ms']:7.2f} ms {row['ram']['tiers']}  "
                      f"resident hit {row['resident']['warm_ms']:7.2f} ms {row['resident']['tiers']}  "
                      f"ram/resident {row['ratio']:5.1f}x", flush=True)
            short = [rng.randrange(lo, hi) for _ in range(32)]
            speeds = {label: decode_speed(mid, short) for label, mid in (("ram", ram), ("resident", res))}
            print(f"{name:6s} decode: {speeds['ram']:.1f} tok/s split streams, {speeds['resident']:.1f} tok/s "
                  f"unified stream ({speeds['resident'] / speeds['ram']:.2f}x)", flush=True)
            out.append({"model": name, "decode_tok_s": speeds})
    print("JSON " + json.dumps(out))


if __name__ == "__main__":
    main()
