"""What the isolation modes cost: load time, generation speed and warm TTFT per mode.

On the default model (Gemma 3 270M), in one run and one application, for ``isolation`` =
``"none"``, ``"probe"`` and ``"process"``:

- load time: ``load_model`` + ``unload`` wall time, ``--load-reps`` rounds. Before each
  ``"probe"`` load the model copy's mtime changes, so every probe load really probes (a
  cached probe costs nothing); the difference to ``"none"`` is the probe's added load time.
- generation: tokens/s of a greedy ``complete`` of ``--gen-tokens`` tokens (decode steps
  only: ``Stats.tokens_per_s``).
- warm TTFT: an exact cache hit on a ``--prompt-tokens`` prompt (restore the saved state
  and sample from its stored logits), ``Stats.ttft_ms``; each mode has a prompt of its own.
- the per-call overhead of the worker channel: an empty round trip to a ``"stub"`` worker.

The three models stay loaded together and the measurements alternate between them (the
order reversed every other round), so that the drift of a shared machine hits them alike;
ratios to ``"none"`` are taken within each round. Run: ``python bench/isolation.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

import erllama
from erllama.default_model import default_model_path
from erllama.demo import PARAGRAPH

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpuload import cpu_busy_s  # noqa: E402

MODES = ("none", "probe", "process")
STORY = ("Write a very long story about a lighthouse keeper who finds a message in a bottle. "
         "Describe every day of the year that follows in detail.")


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _own_cpu_s() -> float:
    """CPU seconds of this process and its live children (the worker processes)."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


class OtherLoad:
    """Cores used by other processes (and steal) while a block runs."""

    def __enter__(self) -> OtherLoad:
        self.t0, self.busy0, self.own0 = time.perf_counter(), cpu_busy_s(), _own_cpu_s()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, wall = cpu_busy_s(), time.perf_counter() - self.t0
        self.cores = float("nan") if busy is None or self.busy0 is None else \
            max(0.0, (busy - self.busy0 - (_own_cpu_s() - self.own0)) / wall)


def wait_idle(max_other: float, patience: float) -> float:
    """Wait (at most ``patience`` s) for a second in which other processes use less than
    ``max_other`` cores; returns the last second's other load."""
    deadline = time.monotonic() + patience
    while True:
        with OtherLoad() as load:
            time.sleep(1.0)
        if load.cores < max_other or time.monotonic() > deadline:
            return load.cores


def rpc_overhead_us(n: int = 3000) -> float:
    """Median µs of an empty call to a worker process (a stub backend), over 5 batches of ``n``."""
    from erllama.backend.process import ProcessBackend
    from erllama.config import ModelConfig

    backend = ProcessBackend("stub", ModelConfig.build(backend="stub", isolation="process", n_ctx=256))
    try:
        for _ in range(200):
            backend.ping()
        batches = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n):
                backend.ping()
            batches.append((time.perf_counter() - t0) / n * 1e6)
        return _med(batches)
    finally:
        backend.close()


def main() -> None:
    """Measure and print the tables plus a JSON line."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds of generation and warm TTFT")
    ap.add_argument("--load-reps", type=int, default=3, help="load/unload rounds per mode")
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=1536)
    ap.add_argument("--threads", type=int, default=2,
                    help="llama.cpp threads (default 2: the reference machine's cores)")
    ap.add_argument("--model", default=None, help="a GGUF file (default: Gemma 3 270M)")
    ap.add_argument("--max-other", type=float, default=0.2,
                    help="cores of other load above which a measurement is repeated (ggml's threads spin)")
    ap.add_argument("--patience", type=float, default=60, help="seconds to wait for an idle machine per measurement")
    ap.add_argument("--max-tries", type=int, default=4, help="tries per measurement before keeping a loaded one")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="erllama-isolation-"))
    # a copy of our own: touching it makes the next probe load probe again
    model = root / "model.gguf"
    shutil.copyfile(args.model or default_model_path(), model)
    opts = dict(n_ctx=args.prompt_tokens + args.gen_tokens + 256, n_batch=512, n_threads=args.threads,
                tier="ram", chat_template="gemma", fingerprint=hashlib.sha256(b"bench/isolation.py").digest())
    load_s: dict[str, list[float]] = {m: [] for m in args.modes}
    tps: dict[str, list[float]] = {m: [] for m in args.modes}
    warm: dict[str, list[float]] = {m: [] for m in args.modes}
    other: dict[str, list[float]] = {m: [] for m in args.modes}
    first_warm: dict[str, float] = {}
    ratios: dict[str, dict[str, list[float]]] = {m: {"tps": [], "warm": []} for m in args.modes}
    try:
        rpc_us = rpc_overhead_us()
        print(f"worker channel: {rpc_us:.1f} µs per empty call", flush=True)
        with erllama.running(cache_dir=str(root / "c"), ram_file_dir=str(root / "shm"), ram_quota=4 << 30):
            store = erllama.cache.current()
            # warm the page cache and the probe module's imports: the first load pays them once
            erllama.unload(erllama.load_model(model, isolation="none", **opts))
            for rep in range(args.load_reps):
                for mode in args.modes if rep % 2 == 0 else args.modes[::-1]:
                    wait_idle(args.max_other, args.patience)
                    if mode == "probe":
                        st = os.stat(model)
                        os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
                    t0 = time.perf_counter()
                    mid = erllama.load_model(model, isolation=mode, **opts)
                    load_s[mode].append(time.perf_counter() - t0)
                    erllama.unload(mid)
            print("load s: " + "  ".join(f"{m} {_med(v):.3f}" for m, v in load_s.items()), flush=True)
            mids = {m: erllama.load_model(model, model_id=f"gemma-{m}", isolation=m, **opts) for m in args.modes}
            text = "Summarise the following notes.\n" + PARAGRAPH * (args.prompt_tokens // 40 + 2)
            prompts, story = {}, {}
            for mode, mid in mids.items():
                prompts[mode] = erllama.tokenize(mid, f"Notes of the {mode} run. " + text)[: args.prompt_tokens]
                story[mode] = erllama.apply_chat_template(mid, [{"role": "user", "content": STORY}])
                cold = erllama.complete(mid, prompts[mode], max_tokens=1)  # saves the row
                store.flush()
                first_warm[mode] = erllama.complete(mid, prompts[mode], max_tokens=1).stats.ttft_ms
                assert cold.cache_hit == "cold", cold.cache_hit
                erllama.complete(mid, story[mode], max_tokens=8)  # warm-up
            for rnd in range(args.rounds):
                got_tps, got_warm, got_other = {}, {}, {}
                for mode in args.modes if rnd % 2 == 0 else args.modes[::-1]:
                    for _ in range(args.max_tries):
                        wait_idle(args.max_other, args.patience)
                        with OtherLoad() as load:
                            c = erllama.complete(mids[mode], story[mode], max_tokens=args.gen_tokens)
                            w = erllama.complete(mids[mode], prompts[mode], max_tokens=1)
                        if load.cores < args.max_other:
                            break
                    assert w.cache_hit == "exact", w.cache_hit
                    got_tps[mode], got_warm[mode], got_other[mode] = c.stats.tokens_per_s, w.stats.ttft_ms, load.cores
                for mode in args.modes:
                    tps[mode].append(got_tps[mode])
                    warm[mode].append(got_warm[mode])
                    other[mode].append(got_other[mode])
                    if "none" in got_tps:
                        ratios[mode]["tps"].append(got_tps[mode] / got_tps["none"])
                        ratios[mode]["warm"].append(got_warm[mode] / got_warm["none"])
                print(f"round {rnd}: " + "  ".join(f"{m} {got_tps[m]:.1f} t/s warm {got_warm[m]:.2f} ms "
                                                  f"(other {got_other[m]:.2f})" for m in args.modes), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print()
    print("| mode | load s | added load s | gen tokens/s | × none | warm TTFT ms | × none | first warm ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    base = _med(load_s.get("none", []))
    for m in args.modes:
        print(f"| {m} | {_med(load_s[m]):.3f} | {_med(load_s[m]) - base:+.3f} | {_med(tps[m]):.1f} "
              f"| {_med(ratios[m]['tps']):.3f} | {_med(warm[m]):.2f} | {_med(ratios[m]['warm']):.2f} "
              f"| {first_warm[m]:.2f} |")
    print(json.dumps({"bench": "isolation", "threads": args.threads, "prompt_tokens": args.prompt_tokens,
                      "gen_tokens": args.gen_tokens, "rpc_us": round(rpc_us, 2), "load_s": load_s, "tokens_per_s": tps,
                      "warm_ttft_ms": warm, "other_cores": other, "first_warm_ttft_ms": first_warm, "ratios": ratios}))


if __name__ == "__main__":
    main()
