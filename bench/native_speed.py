"""Prompt-processing and generation speed of llama.cpp through the erllama binding.

Measures, on one context with one sequence (default model: Gemma 3 270M Q4_K_M):

* ``pp512`` (JSON ``pp``): one ``Context.step`` of 512 prompt tokens into an empty
  sequence (cleared between repetitions); tokens/s = 512 / step time.
* ``tg128`` (JSON ``tg``): 128 single-token decode steps from an empty sequence, each
  preceded by greedy sampling through ``native.Sampler`` (sample + decode per token, as a
  completion runs).
* ``tg128`` decode only (JSON ``tg_nosample``): the same 128 steps feeding a fixed token.

Each repetition runs the three measurements back to back, so machine drift affects them
alike; the table reports the median and the min/max over repetitions. ``--thread`` selects
where the decodes run: ``main`` (the main thread), ``worker`` (one dedicated
``threading.Thread`` that creates the context and does every decode of it, as the runtime
does), or ``mixed`` (the warm-up decodes on the main thread, the measured ones on the
worker: with an OpenMP build, libgomp keeps a thread team per calling thread and stops
spinning once its threads outnumber the CPUs, which slows every later decode).

The last output line is a JSON object for scripts. Run ``--help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from erllama.backend.llama import native

from cpuload import LoadMeter

METRICS = ("pp", "tg", "tg_nosample")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="GGUF file (default: the Gemma 3 270M model erllama assembles)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads (n_threads and n_threads_batch)")
    p.add_argument("--reps", type=int, default=5, help="measured repetitions (after one warm-up)")
    p.add_argument("--thread", choices=("main", "worker", "mixed"), default="worker",
                   help="the Python thread that runs the decodes")
    p.add_argument("--pp", type=int, default=512, help="prompt tokens for the prefill test")
    p.add_argument("--tg", type=int, default=128, help="generated tokens for the generation tests")
    p.add_argument("--max-other", type=float, default=0.2,
                   help="drop and repeat a repetition during which other processes used more cores")
    p.add_argument("--max-dropped", type=int, default=10,
                   help="repetitions dropped at most; later disturbed ones are kept and flagged")
    p.add_argument("--label", default="", help="free text copied into the JSON line (e.g. the build)")
    args = p.parse_args(argv)
    if args.reps < 1 or args.threads < 1 or args.pp < 1 or args.tg < 1:
        p.error("--reps, --threads, --pp and --tg must be positive")
    return args


class Bench:
    """One model and context; each method runs one measurement and returns tokens/s."""

    def __init__(self, model: native.Model, n_pp: int, n_tg: int, n_threads: int):
        self.model = model
        self.n_pp = n_pp
        self.n_tg = n_tg
        # llama-bench style: prompt tokens drawn uniformly from the vocabulary, fixed seed.
        rng = random.Random(0)
        self.prompt = [rng.randrange(model.n_vocab) for _ in range(n_pp)]
        self.start = model.tokenize("", add_special=True)[:1] or [self.prompt[0]]
        self.fixed = model.tokenize(" the", add_special=False)[-1]
        self.ctx = native.Context.create(model, n_ctx=n_pp + n_tg + 16, n_batch=n_pp, n_ubatch=n_pp,
                                         n_seq_max=1, n_threads=n_threads)
        self.sampler = native.Sampler(model)

    def pp(self) -> float:
        """Prefill ``n_pp`` tokens in one step into the empty sequence 0."""
        ctx = self.ctx
        ctx.seq_clear(0)
        t0 = time.perf_counter()
        ctx.step([(0, self.prompt, True)])
        dt = time.perf_counter() - t0
        ctx.seq_clear(0)
        return self.n_pp / dt

    def tg(self) -> float:
        """Sample greedily and decode ``n_tg`` tokens, one per step."""
        ctx, sampler = self.ctx, self.sampler
        ctx.seq_clear(0)
        ctx.step([(0, self.start, True)])  # the first logits to sample from; not timed
        t0 = time.perf_counter()
        for _ in range(self.n_tg):
            tok = sampler.sample(ctx, 0)
            ctx.step([(0, [tok], True)])
        dt = time.perf_counter() - t0
        ctx.seq_clear(0)
        return self.n_tg / dt

    def tg_nosample(self) -> float:
        """Decode ``n_tg`` single-token steps of a fixed token (logits still computed)."""
        ctx, row = self.ctx, [(0, [self.fixed], True)]
        ctx.seq_clear(0)
        t0 = time.perf_counter()
        for _ in range(self.n_tg):
            ctx.step(row)
        dt = time.perf_counter() - t0
        ctx.seq_clear(0)
        return self.n_tg / dt

    def rep(self) -> dict:
        """One repetition of every measurement, recording the thread that ran it."""
        with LoadMeter() as load:
            out = {name: getattr(self, name)() for name in METRICS}
        out["other_cpu"] = load.other
        out["thread"] = threading.current_thread().name
        return out

    def free(self) -> None:
        """Free the sampler and the context (the model belongs to the caller)."""
        self.sampler.free()
        self.ctx.free()


def summary(values: list[float]) -> dict:
    """Median, min, max and every value (tokens/s, rounded)."""
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "runs": [round(v, 2) for v in values]}


def run(args: argparse.Namespace) -> dict:
    """Load the model, run the repetitions on the chosen thread, return the results."""
    if args.model:
        path = Path(args.model)
    else:
        from erllama.default_model import default_model_path
        path = default_model_path()
    info = native.system_info()
    t0 = time.perf_counter()
    model = native.Model.load(str(path))
    load_s = time.perf_counter() - t0
    model_desc = model.description

    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") if args.thread != "main" else None

    def on_worker(fn, *a):
        return worker.submit(fn, *a).result() if worker else fn(*a)

    try:
        bench = on_worker(Bench, model, args.pp, args.tg, args.threads)
        try:
            # Warm-up (page in weights, size the buffers). In "mixed" mode the main
            # thread decodes here and the worker afterwards.
            if args.thread == "mixed":
                bench.rep()
            else:
                on_worker(bench.rep)
            reps, dropped = [], []
            while len(reps) < args.reps:
                r = on_worker(bench.rep)
                disturbed = r["other_cpu"] is not None and r["other_cpu"] > args.max_other
                if disturbed and len(dropped) < args.max_dropped:
                    dropped.append(r)
                else:
                    reps.append(r)
        finally:
            on_worker(bench.free)
    finally:
        if worker:
            worker.shutdown()
        model.free()

    return {
        "bench": "native_speed",
        "label": args.label,
        "native": native.__file__,
        "openmp": "OPENMP = 1" in info,
        "system_info": info.strip(),
        "model": str(path),
        "model_desc": model_desc,
        "load_s": round(load_s, 3),
        "threads": args.threads,
        "thread": args.thread,
        "decode_thread": sorted({r["thread"] for r in reps}),
        "reps": args.reps,
        "max_other": args.max_other,
        "n_pp": args.pp,
        "n_tg": args.tg,
        "cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **{name: summary([r[name] for r in reps]) for name in METRICS},
        "other_cpu": [None if r["other_cpu"] is None else round(r["other_cpu"], 2) for r in reps],
        "dropped_other_cpu": [round(r["other_cpu"], 2) for r in dropped],
        "disturbed": any(r["other_cpu"] is not None and r["other_cpu"] > args.max_other for r in reps),
    }


def report(res: dict) -> None:
    """Print the table, then the JSON line."""
    names = {"pp": f"pp{res['n_pp']}", "tg": f"tg{res['n_tg']} (greedy sampling)",
             "tg_nosample": f"tg{res['n_tg']} (decode only)"}
    print(f"native       {res['native']}")
    print(f"system_info  {res['system_info']}")
    print(f"model        {res['model']} ({res['model_desc']}), loaded in {res['load_s']:.2f} s")
    print(f"setup        {res['threads']} llama.cpp threads, decodes on {res['thread']} "
          f"({', '.join(res['decode_thread'])}), {res['reps']} reps after 1 warm-up, "
          f"OpenMP {'ON' if res['openmp'] else 'OFF'}")
    print()
    print(f"{'test':<28} {'median t/s':>11} {'min':>9} {'max':>9}")
    for key in METRICS:
        s = res[key]
        print(f"{names[key]:<28} {s['median']:>11.2f} {s['min']:>9.2f} {s['max']:>9.2f}")
    busy = [x for x in res["other_cpu"] if x is not None]
    if busy:
        print(f"{'other load (cores)':<28} {statistics.median(busy):>11.2f} {min(busy):>9.2f} {max(busy):>9.2f}")
    if res["dropped_other_cpu"]:
        print(f"dropped      {len(res['dropped_other_cpu'])} repetitions disturbed by other processes "
              f"(cores: {', '.join(f'{x:.2f}' for x in res['dropped_other_cpu'])})")
    if res["disturbed"]:
        print(f"warning: other processes used more than {res['max_other']} cores during a kept "
              "repetition; the numbers are not comparable (see bench/README.md)")
    print()
    print(json.dumps({k: v for k, v in res.items() if k != "system_info"}, sort_keys=False))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
