"""What a cache row of N tokens costs and saves, on the default model (Gemma 3 270M).

For each prompt length N: the cold prefill time, the per-sequence state size and the time
to copy it out (a save's pack step) and back in plus sampling from stored logits (a warm
restore). The last columns give the prefill time saved per MB stored, the number the save
policy's ``min_tokens`` trades on. Run: ``python bench/save_tradeoff.py [--threads 2]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from erllama.backend.llama import native
from erllama.default_model import default_model_path
from erllama.demo import PARAGRAPH


def main() -> None:
    """Measure and print the table plus a JSON line."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", type=int, nargs="*", default=[64, 128, 256, 512, 1024, 2048])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    model = native.Model.load(default_model_path())
    text = PARAGRAPH * 200
    all_tokens = model.tokenize(text)
    ctx = native.Context.create(model, n_ctx=2 * 2304, n_batch=2048, n_seq_max=2, n_threads=args.threads)
    sampler = native.Sampler(model)
    rows = []
    try:
        for n in args.lengths:
            toks = all_tokens[:n]
            pre, pack, rest = [], [], []
            for _ in range(args.reps):
                ctx.clear()
                t0 = time.perf_counter()
                ctx.step([(0, toks)])
                pre.append(time.perf_counter() - t0)
                logits = ctx.logits(0)
                t0 = time.perf_counter()
                blob = ctx.state_get(0)
                pack.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                ctx.state_set(1, blob)
                sampler.sample_logits(logits)
                rest.append(time.perf_counter() - t0)
            size = len(blob) + logits.nbytes
            p, k, r = (statistics.median(x) * 1e3 for x in (pre, pack, rest))
            rows.append({"tokens": n, "prefill_ms": round(p, 1), "pack_ms": round(k, 2), "restore_ms": round(r, 2),
                         "row_mb": round(size / 1e6, 2), "saved_ms_per_mb": round((p - r) / (size / 1e6), 1),
                         "speedup": round(p / r, 1)})
    finally:
        sampler.free()
        ctx.free()
        model.free()
    print(f"{'tokens':>7} {'prefill ms':>11} {'pack ms':>8} {'restore ms':>11} {'row MB':>7} "
          f"{'saved ms/MB':>12} {'speedup':>8}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['prefill_ms']:>11} {r['pack_ms']:>8} {r['restore_ms']:>11} {r['row_mb']:>7} "
              f"{r['saved_ms_per_mb']:>12} {r['speedup']:>7}x")
    print(json.dumps({"bench": "save_tradeoff", "rows": rows}))


if __name__ == "__main__":
    main()
