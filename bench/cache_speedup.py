"""Cold vs warm time to first token through the public API, per tier, next to the floor.

For each tier (ram, ram_file, disk) and prompt length (512, 1024, 2048, 4096 tokens by
default) on the default model: a cold ``complete`` (prefill + first token), then the same
prompt again (an exact hit: restore the row, sample from its stored logits). The floor is
what a warm start cannot avoid, measured in the same run: copying the row's bytes at the
memory-copy bandwidth (ram) or reading the row file into a reused buffer (files), plus one
sampling step over the stored logits. Run: ``python bench/cache_speedup.py``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import erllama
from erllama.backend.llama import native
from erllama.demo import PARAGRAPH
from erllama.models import default_model_path


def _floor_ms(row, tier: str, store, sampler, logits: np.ndarray, reps: int = 5) -> float:
    size = row.size
    buf = bytearray(size)
    src = bytes(size) if tier == "ram" else None
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        if tier == "ram":
            memoryview(buf)[:] = src
        else:
            with open(row.location, "rb", buffering=0) as f:
                f.readinto(buf)
        sampler.sample_logits(logits)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    """Measure and print the table plus a JSON line."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", type=int, nargs="*", default=[512, 1024, 2048, 4096])
    ap.add_argument("--tiers", nargs="*", default=["ram", "ram_file", "disk"])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="erllama-speedup-"))
    results = []
    try:
        with erllama.running(cache_dir=str(root), ram_file_dir=str(root / "shm"),
                             ram_quota=4 << 30, ram_file_quota=4 << 30, disk_quota=8 << 30):
            store = erllama.cache.current()
            path = default_model_path()
            sampler_model = native.Model.load(path)
            sampler = native.Sampler(sampler_model)
            text = "Summarise the following notes.\n" + PARAGRAPH * (max(args.lengths) // 40 + 2)
            try:
                for tier in args.tiers:
                    mid = erllama.load_model(path, model_id=f"gemma-{tier}", n_ctx=max(args.lengths) + 512,
                                             n_batch=512, n_threads=args.threads, tier=tier, isolation="none")
                    for n in args.lengths:
                        # a prompt of its own per tier and length: no row of another run may match it
                        prompt = erllama.tokenize(mid, f"Run {tier} {n}. " + text)[:n]
                        cold = erllama.complete(mid, prompt, max_tokens=1)
                        store.flush()
                        warm = erllama.complete(mid, prompt, max_tokens=1)
                        rows = [r for r in store.index.rows.values() if r.n_tokens == n and r.tier == tier]
                        row = rows[0] if rows else None
                        logits = np.zeros(sampler_model.n_vocab, dtype=np.float32)
                        floor = _floor_ms(row, tier, store, sampler, logits) if row else float("nan")
                        results.append({
                            "tier": tier, "tokens": n, "cold_ttft_ms": round(cold.stats.ttft_ms, 1),
                            "warm_ttft_ms": round(warm.stats.ttft_ms, 2), "hit": warm.cache_hit,
                            "same_first_token": warm.tokens[:1] == cold.tokens[:1],
                            "row_mb": round(row.size / 1e6, 2) if row else None, "floor_ms": round(floor, 2),
                            "speedup": round(cold.stats.ttft_ms / warm.stats.ttft_ms, 1),
                            "x_floor": round(warm.stats.ttft_ms / floor, 2) if row else None})
                        r = results[-1]
                        print(f"{tier:9} {n:5} tokens: cold {r['cold_ttft_ms']:8.1f} ms  warm {r['warm_ttft_ms']:7.2f} ms"
                              f"  ({r['hit']}, same first token {r['same_first_token']})  row {r['row_mb']} MB"
                              f"  floor {r['floor_ms']:.2f} ms  x floor {r['x_floor']}  speedup {r['speedup']}x",
                              flush=True)
                    erllama.unload(mid)
            finally:
                sampler.free()
                sampler_model.free()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"bench": "cache_speedup", "rows": results}))


if __name__ == "__main__":
    main()
