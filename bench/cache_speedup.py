"""Cold vs warm time to first token through the public API, per tier, next to the floor.

For each tier (ram, ram_file, disk) and prompt length (512, 1024, 2048, 4096 tokens by
default) on the default model: a cold ``complete`` (prefill + first token), then the same
prompt again ``--warm-reps`` times (exact hits: restore the row, sample from its stored
logits); the first warm run and the median of all are reported. The floor is what a warm
start cannot avoid, measured in the same run: copying the row's bytes at the memory-copy
bandwidth (ram) or reading the row file into a reused buffer (files), plus one sampling
step over the stored logits. Next to each row: the CPU cores other processes used during
the cold run and during the warm runs (``cpuload.LoadMeter``; 2 cores here, and ggml's
threads spin). Each tier runs in an application of its own; the disk tier's
has no ``ram_file`` tier, so its rows stay on disk (with one, a disk hit is promoted to
tmpfs and the next hits are ``ram_file`` hits). Run: ``python bench/cache_speedup.py``.
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
from erllama.default_model import default_model_path
from erllama.demo import PARAGRAPH

from cpuload import LoadMeter


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


def _cores(load: LoadMeter) -> float | None:
    return None if load.other is None else round(load.other, 2)


def main() -> None:
    """Measure and print the table plus a JSON line."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", type=int, nargs="*", default=[512, 1024, 2048, 4096])
    ap.add_argument("--tiers", nargs="*", default=["ram", "ram_file", "disk"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--warm-reps", type=int, default=5, help="warm runs per length (the first is reported apart)")
    args = ap.parse_args()
    path = default_model_path()
    sampler_model = native.Model.load(path)
    sampler = native.Sampler(sampler_model)
    text = "Summarise the following notes.\n" + PARAGRAPH * (max(args.lengths) // 40 + 2)
    results = []
    try:
        for tier in args.tiers:
            root = Path(tempfile.mkdtemp(prefix="erllama-speedup-"))
            try:
                with erllama.running(cache_dir=str(root), ram_file_dir=str(root / "shm"), ram_quota=4 << 30,
                                     ram_file_quota=0 if tier == "disk" else 4 << 30, disk_quota=8 << 30):
                    results += _run_tier(tier, args, path, text, sampler, sampler_model)
            finally:
                shutil.rmtree(root, ignore_errors=True)
    finally:
        sampler.free()
        sampler_model.free()
    print(json.dumps({"bench": "cache_speedup", "rows": results}))


def _run_tier(tier: str, args: argparse.Namespace, path: str, text: str, sampler, sampler_model) -> list[dict]:
    store = erllama.cache.current()
    out = []
    mid = erllama.load_model(path, model_id=f"gemma-{tier}", n_ctx=max(args.lengths) + 512,
                             n_batch=512, n_threads=args.threads, tier=tier, isolation="none")
    for n in args.lengths:
        # a prompt of its own per tier and length: no row of another run may match it
        prompt = erllama.tokenize(mid, f"Run {tier} {n}. " + text)[:n]
        with LoadMeter() as cold_load:
            cold = erllama.complete(mid, prompt, max_tokens=1)
        store.flush()
        warms = []
        with LoadMeter() as warm_load:
            for _ in range(max(1, args.warm_reps)):
                warms.append(erllama.complete(mid, prompt, max_tokens=1))
                store.flush()
        rows = [r for r in store.index.rows.values() if r.n_tokens == n and r.tier == tier]
        row = rows[0] if rows else None
        logits = np.zeros(sampler_model.n_vocab, dtype=np.float32)
        floor = _floor_ms(row, tier, store, sampler, logits) if row else float("nan")
        first = warms[0].stats.ttft_ms
        med = statistics.median(w.stats.ttft_ms for w in warms)
        out.append({
            "tier": tier, "tokens": n, "cold_ttft_ms": round(cold.stats.ttft_ms, 1),
            "warm_first_ms": round(first, 2), "warm_ttft_ms": round(med, 2),
            "warm_all_ms": [round(w.stats.ttft_ms, 2) for w in warms],
            "hit": sorted({w.cache_hit for w in warms}),
            "same_first_token": all(w.tokens[:1] == cold.tokens[:1] for w in warms),
            "row_mb": round(row.size / 1e6, 2) if row else None, "floor_ms": round(floor, 2),
            "speedup": round(cold.stats.ttft_ms / med, 1), "speedup_first": round(cold.stats.ttft_ms / first, 1),
            "x_floor": round(med / floor, 2) if row else None,
            "x_floor_first": round(first / floor, 2) if row else None,
            "other_cpu_cold": _cores(cold_load), "other_cpu_warm": _cores(warm_load)})
        r = out[-1]
        print(f"{tier:9} {n:5} tokens: cold {r['cold_ttft_ms']:8.1f} ms  warm first {r['warm_first_ms']:6.2f}"
              f" median {r['warm_ttft_ms']:6.2f} ms  ({'/'.join(r['hit'])}, same first token {r['same_first_token']})"
              f"  row {r['row_mb']} MB  floor {r['floor_ms']:.2f} ms"
              f"  x floor {r['x_floor']} (first {r['x_floor_first']})"
              f"  speedup {r['speedup']}x (first {r['speedup_first']}x)"
              f"  other load {r['other_cpu_cold']}/{r['other_cpu_warm']} cores", flush=True)
    erllama.unload(mid)
    return out


if __name__ == "__main__":
    main()
