"""Generation throughput through the public API against the binding's raw loop, and with
1, 2 and 4 concurrent streams (issue #5, acceptance 7).

Part 1, one stream (default model Gemma 3 270M, 2 threads): the same prompt, greedy, the
same number of generated tokens, on contexts with the same parameters (``n_ctx``, ``n_batch``
= ``n_ubatch`` 512, one sequence, flash attention ``auto``, ``swa_full=False``: the
``ModelConfig`` defaults) through

* ``raw``: the binding's loop on one dedicated thread (``Context.step`` of the prompt, then
  ``Sampler.sample`` + a one-token ``step`` per token, stopping at EOG as the actor does),
* ``complete``: ``erllama.complete(model, prompt, max_tokens=N)``,
* ``infer``: ``erllama.infer(...)``, the ``Token`` events iterated as they arrive.

Generation tokens/s = (n - 1) / (time of the last token - time of the first token): the
first token's prefill is left out. For ``raw`` the times are taken right after each sample;
for ``infer`` when the caller's loop receives each ``Token``; for ``complete`` the first
token's time is the request's own ``stats.ttft_ms`` after the call and the last is when
``complete`` returns (so it also pays the ``Done`` delivery). The ratios to ``raw`` are
taken within each round (goal: >= 95 %).

Part 2, concurrency: one model loaded with ``n_seq_max=4`` (``n_ctx`` 4 x the single
model's, so each sequence has the same room); k = 1, 2, 4 streams started together, each
with a different prompt (nothing is served from the cache: the prompts differ, and prompt +
generation stay under the save policy's 256-token minimum, so no row is written either).
Aggregate tokens/s = all generated tokens / (last ``Done`` - submission), prefill included;
also the generation-only rate (tokens after each stream's first / (last token - first
first token)). Events are timed by a callable sink in the model's thread, and the caller
waits on an Event (a polling caller would take CPU from ggml's spinning threads). Goal: 4
streams >= 2 x one stream (aggregate, ratio within each round). Next to it, ``raw``: the
binding decoding the same k sequences together on a context like the model's (one step of
all prompts, then one step per token with a row per sequence, rows in sequence order): the
ceiling of batching on this model and machine, and the tokens erllama's streams must
reproduce exactly (checked; a difference is printed as a MISMATCH).

After the rounds: the time of one decode step of k one-token rows with and without logits
(why batching gains little on Gemma 3 270M: the 262,144 x 640 output matrix is most of a
step and its cost grows with every row that wants logits), and whether k sequences decoded
together give the same greedy tokens as each decoded alone.

Every round runs each measurement once, in an order rotated from round to round, after
waiting for the machine to be idle; a round during which other processes used more than
``--max-other`` cores is repeated (at most ``--max-dropped`` times). The tables give the
median and [min-max] over the rounds after one warm-up round; ``other load`` is the CPU
(cores) other processes used during a measurement (``cpuload.LoadMeter``). Run
``python bench/throughput.py`` (see ``--help``); the last line is a JSON object with every
value.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from compare_builds import wait_idle
from cpuload import LoadMeter
from report import fmt, git_rev, med
from streams import timed_stream, timed_streams

try:
    import erllama
except ImportError:  # run from a checkout without an installed erllama
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import erllama

from erllama.backend.llama import native
from erllama.default_model import default_model_path

# Continuation prompts the model does not end early (checked: > 256 greedy tokens each).
PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived",
    "The history of the printing press begins",
    "Here is a detailed explanation of how a steam engine works:",
    "Chapter 1\n\nThe rain had not stopped for three days when",
    "The following essay discusses the causes of the French Revolution.",
    "In computer science, a hash table is",
    "Dear diary, today was",
    "A recipe for bread: first,",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="GGUF file (default: Gemma 3 270M, erllama.default_model.default_model_path())")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    p.add_argument("--tokens", type=int, default=128, help="tokens generated per request (max_tokens)")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds (after one warm-up round)")
    p.add_argument("--n-ctx", type=int, default=1024, help="context per sequence")
    p.add_argument("--streams", type=int, nargs="*", default=[1, 2, 4], help="concurrency levels")
    p.add_argument("--max-other", type=float, default=0.3,
                   help="repeat a round during which other processes used more cores than this")
    p.add_argument("--max-dropped", type=int, default=6, help="disturbed rounds repeated at most")
    p.add_argument("--idle-wait", type=float, default=60.0,
                   help="seconds to wait for other load to stop before each round")
    p.add_argument("--skip-single", action="store_true", help="skip part 1 (raw / complete / infer)")
    p.add_argument("--skip-concurrent", action="store_true", help="skip part 2 (concurrent streams)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.tokens < 2 or max(args.streams, default=1) > len(PROMPTS):
        p.error(f"--rounds >= 1, --tokens >= 2 and at most {len(PROMPTS)} streams")
    return args


class Raw:
    """The binding's greedy loops on contexts like the actors' (one with a single sequence,
    one with ``n_multi``), on one dedicated thread."""

    def __init__(self, path: str, n_ctx: int, n_threads: int, n_multi: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raw-decode")
        self.pool.submit(self._open, path, n_ctx, n_threads, n_multi).result()

    def _open(self, path: str, n_ctx: int, n_threads: int, n_multi: int) -> None:
        self.model = native.Model.load(path)
        common = dict(n_batch=512, n_ubatch=512, n_threads=n_threads, flash_attn="auto", swa_full=False)
        self.ctx = native.Context.create(self.model, n_ctx=n_ctx, n_seq_max=1, **common)
        self.multi = native.Context.create(self.model, n_ctx=n_ctx * n_multi, n_seq_max=n_multi, **common)
        self.sampler = native.Sampler(self.model, temperature=0.0)
        self.samplers = [native.Sampler(self.model, temperature=0.0) for _ in range(n_multi)]

    def streams(self, prompts: list[list[int]], n: int) -> dict:
        return self.pool.submit(self._streams, prompts, n).result()

    def _streams(self, prompts: list[list[int]], n: int) -> dict:
        """k sequences decoded together: one step of all prompts, then one step per token
        holding one row per live sequence (what the actor's ticks do, without the actor)."""
        ctx, model, k = self.multi, self.model, len(prompts)
        stamps: list[list[float]] = [[] for _ in range(k)]
        ids: list[list[int]] = [[] for _ in range(k)]
        for q in range(k):
            ctx.seq_clear(q)
        t0 = time.perf_counter()
        ctx.step([(q, p, True) for q, p in enumerate(prompts)])
        live = list(range(k))
        while live:
            rows = []
            for q in live:
                tok = self.samplers[q].sample(ctx, q)
                if model.is_eog(tok):
                    continue
                stamps[q].append(time.perf_counter())
                ids[q].append(tok)
                if len(stamps[q]) < n:
                    rows.append((q, [tok], True))
            live = [q for q, _, _ in rows]
            if rows:
                ctx.step(rows)
        for q in range(k):
            ctx.seq_clear(q)
        return {**_stream_stats(stamps, t0, max(s[-1] for s in stamps)), "ids": ids}

    def step_costs(self, ks: list[int], reps: int = 20) -> dict:
        return self.pool.submit(self._step_costs, ks, reps).result()

    def _step_costs(self, ks: list[int], reps: int) -> dict:
        """Median time of one decode step of k one-token rows (k sequences), with and
        without logits: how the cost of a step grows with the rows batched."""
        ctx = self.multi
        prompt = self.model.tokenize(PROMPTS[0])
        out = {}
        for k in ks:
            for want in (True, False):
                for q in range(k):
                    ctx.seq_clear(q)
                ctx.step([(q, prompt, False) for q in range(k)])
                times = []
                for _ in range(reps):
                    t = time.perf_counter()
                    ctx.step([(q, [prompt[-1]], want) for q in range(k)])
                    times.append(time.perf_counter() - t)
                    for q in range(k):
                        ctx.seq_rm(q, len(prompt), -1)
                out[f"{k}{'_logits' if want else ''}"] = statistics.median(times) * 1e3
        for q in range(max(ks)):
            ctx.seq_clear(q)
        return out

    def generate(self, prompt: list[int], n: int) -> dict:
        return self.pool.submit(self._generate, prompt, n).result()

    def _generate(self, prompt: list[int], n: int) -> dict:
        ctx, sampler, model = self.ctx, self.sampler, self.model
        ctx.seq_clear(0)
        t0 = time.perf_counter()
        ctx.step([(0, prompt, True)])
        out: list[int] = []
        stamps: list[float] = []
        while True:
            tok = sampler.sample(ctx, 0)
            if model.is_eog(tok):
                break
            out.append(tok)
            stamps.append(time.perf_counter())
            if len(out) >= n:
                break
            ctx.step([(0, [tok], True)])
        ctx.seq_clear(0)
        return {"tokens": out, "t0": t0, "first": stamps[0], "last": stamps[-1]}

    def close(self) -> None:
        def _free() -> None:
            for sm in [self.sampler, *self.samplers]:
                sm.free()
            self.ctx.free()
            self.multi.free()
            self.model.free()
        self.pool.submit(_free).result()
        self.pool.shutdown()


def gen_rate(n: int, first: float, last: float) -> float:
    return (n - 1) / (last - first) if n > 1 and last > first else float("nan")


def run_raw(raw: Raw, prompt: list[int], n: int) -> dict:
    with LoadMeter() as load:
        r = raw.generate(prompt, n)
    return {"ids": r["tokens"], "tps": gen_rate(len(r["tokens"]), r["first"], r["last"]),
            "ttft_ms": (r["first"] - r["t0"]) * 1e3, "other": load.other}


def run_complete(mid: str, prompt: list[int], n: int) -> dict:
    with LoadMeter() as load:
        t0 = time.perf_counter()
        c = erllama.complete(mid, prompt, max_tokens=n)
        t1 = time.perf_counter()
    first = t0 + c.stats.ttft_ms / 1e3
    return {"ids": list(c.tokens), "tps": gen_rate(len(c.tokens), first, t1), "ttft_ms": c.stats.ttft_ms,
            "stats_tps": c.stats.tokens_per_s, "hit": c.cache_hit, "other": load.other}


def run_infer(mid: str, prompt: list[int], n: int) -> dict:
    run, other = timed_stream(mid, prompt, n)
    return {"ids": run.ids, "tps": gen_rate(len(run.ids), run.stamps[0], run.stamps[-1]), "ttft_ms": run.ttft_ms,
            "hit": run.hit or None, "other": other}


def _stream_stats(stamps: list[list[float]], t0: float, t_end: float) -> dict:
    total = sum(len(s) for s in stamps)
    first = min(s[0] for s in stamps if s)
    last = max(s[-1] for s in stamps if s)
    after_first = sum(max(len(s) - 1, 0) for s in stamps)
    return {"k": len(stamps), "tokens": [len(s) for s in stamps], "wall_s": t_end - t0,
            "agg_tps": total / (t_end - t0), "gen_tps": after_first / (last - first) if last > first else float("nan"),
            "ttft_ms": [(s[0] - t0) * 1e3 for s in stamps if s]}


def run_raw_streams(raw: Raw, prompts: list[list[int]], n: int) -> dict:
    with LoadMeter() as load:
        r = raw.streams(prompts, n)
    return {**r, "hits": ["cold"] * len(prompts), "other": load.other}


def run_streams(mid: str, prompts: list[list[int]], n: int) -> dict:
    """Start one stream per prompt at once; time every event in the model's thread."""
    runs, other = timed_streams(mid, prompts, n)
    return {**_stream_stats([r.stamps for r in runs], runs[0].t0, max(r.end for r in runs)),
            "ids": [r.ids for r in runs], "hits": [r.hit for r in runs], "other": other}


def single_round(raw: Raw, mid: str, prompt: list[int], n: int, rnd: int) -> dict:
    """raw, complete and infer once each, the order rotated by round."""
    runs = {"raw": lambda: run_raw(raw, prompt, n), "complete": lambda: run_complete(mid, prompt, n),
            "infer": lambda: run_infer(mid, prompt, n)}
    order = list(runs)[rnd % 3:] + list(runs)[:rnd % 3]
    res = {name: runs[name]() for name in order}
    res["ratio_complete"] = res["complete"]["tps"] / res["raw"]["tps"]
    res["ratio_infer"] = res["infer"]["tps"] / res["raw"]["tps"]
    return res


def concurrent_round(raw: Raw | None, mid: str, prompts: list[list[int]], levels: list[int], n: int,
                     rnd: int) -> dict:
    """Every level through erllama (and the raw batched loop), order rotated by round."""
    levels = levels[rnd % len(levels):] + levels[:rnd % len(levels)]
    res: dict = {"erllama": {}, "raw": {}}
    for k in levels:
        ps = [prompts[(rnd + i) % len(prompts)] for i in range(k)]  # different prompts, rotating
        pair = [("erllama", lambda: run_streams(mid, ps, n))]
        if raw is not None:
            pair.append(("raw", lambda: run_raw_streams(raw, ps, n)))
        for who, fn in (pair if rnd % 2 else pair[::-1]):
            res[who][k] = fn()
    return res


def other_of(res: dict) -> float:
    """The largest other-process load seen by any measurement in a round's results."""
    vals = []
    def walk(x):
        if isinstance(x, dict):
            if "other" in x:
                vals.append(x["other"] or 0.0)
            for v in x.values():
                walk(v)
    walk(res)
    return max(vals, default=0.0)


def strip_tokens(x):
    """The results without the generated token ids, keys as strings (for the JSON line)."""
    if isinstance(x, dict):
        return {str(k): strip_tokens(v) for k, v in x.items() if k != "ids"}
    return x


def first_diff(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (the shorter length if one is a prefix), or None."""
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return i if i is not None else (None if len(a) == len(b) else min(len(a), len(b)))



def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = str(Path(args.model) if args.model else default_model_path())
    n = args.tokens
    kmax = max(args.streams)
    root = Path(tempfile.mkdtemp(prefix="erllama-throughput-"))
    single_rounds: list[dict] = []
    conc_rounds: list[dict] = []
    mismatches: list[str] = []
    dropped: list[float] = []
    costs = None
    batch_diffs: dict[int, list[int | None]] = {}
    raw = None
    try:
        with erllama.running(cache_dir=str(root), ram_file_dir=str(root / "shm")):
            opts = dict(n_batch=512, n_ubatch=512, n_threads=args.threads, isolation="none")
            mid1 = erllama.load_model(path, model_id="tp-single", n_ctx=args.n_ctx, n_seq_max=1, **opts) \
                if not args.skip_single else None
            mid4 = erllama.load_model(path, model_id="tp-multi", n_ctx=args.n_ctx * kmax,
                                      n_seq_max=kmax, **opts) if not args.skip_concurrent else None
            prompts = [erllama.tokenize(mid1 or mid4, p) for p in PROMPTS]
            raw = Raw(path, args.n_ctx, args.threads, kmax)
            print(f"model {path}, {args.threads} threads, {n} tokens per request, {args.rounds} rounds + 1 warm-up, "
                  f"native {native.__file__}, erllama {git_rev()}", flush=True)
            rnd = 0
            while rnd <= args.rounds:
                label = "warm-up" if rnd == 0 else f"round {rnd}"
                idle = wait_idle(args.max_other, args.idle_wait)
                single = concurrent = None
                if not args.skip_single:
                    single = single_round(raw, mid1, prompts[0], n, rnd)
                    print(f"{label:8} raw {single['raw']['tps']:6.2f} t/s  complete {single['complete']['tps']:6.2f} "
                          f"({single['ratio_complete']:.3f})  infer {single['infer']['tps']:6.2f} "
                          f"({single['ratio_infer']:.3f})  other load {other_of(single):.2f} cores", flush=True)
                if not args.skip_concurrent:
                    concurrent = concurrent_round(raw, mid4, prompts, list(args.streams), n, rnd)
                    e, r = concurrent["erllama"], concurrent["raw"]
                    k1 = min(e)
                    print(f"{label:8} " + "  ".join(
                        f"{k}: {e[k]['agg_tps']:6.2f} t/s (raw {r[k]['agg_tps']:6.2f})" for k in sorted(e))
                        + f"  {kmax}/{k1} = {e[kmax]['agg_tps'] / e[k1]['agg_tps']:.2f} "
                          f"(raw {r[kmax]['agg_tps'] / r[k1]['agg_tps']:.2f})"
                          f"  other load {other_of(concurrent):.2f} cores", flush=True)
                    for k, x in e.items():
                        if any(h != "cold" for h in x["hits"]):
                            print(f"  note: {k} streams: cache hits {x['hits']}")
                other = max(other_of(single or {}), other_of(concurrent or {}))
                if rnd and other > args.max_other and len(dropped) < args.max_dropped:
                    dropped.append(other)
                    print(f"  round disturbed by {other:.2f} cores of other load (idle wait saw {idle:.2f}): "
                          "repeated", flush=True)
                    continue
                if single is not None:
                    for name in ("complete", "infer"):
                        d = first_diff(single[name]["ids"], single["raw"]["ids"])
                        if d is not None:
                            mismatches.append(f"{label}: {name} differs from raw from token {d}")
                if concurrent is not None:
                    for k, x in concurrent["erllama"].items():
                        for i, (a, b) in enumerate(zip(x["ids"], concurrent["raw"][k]["ids"])):
                            d = first_diff(a, b)
                            if d is not None:
                                mismatches.append(f"{label}: {k} streams, stream {i}: erllama differs from the "
                                                  f"raw batched loop from token {d}")
                if rnd:
                    if single is not None:
                        single_rounds.append(strip_tokens(single))
                    if concurrent is not None:
                        conc_rounds.append(strip_tokens(concurrent))
                rnd += 1
            if not args.skip_concurrent:
                wait_idle(args.max_other, args.idle_wait)
                costs = raw.step_costs(sorted(args.streams))
                # is decoding k sequences together bit-identical to decoding each alone?
                for k in sorted(args.streams)[1:]:
                    together = raw.streams(prompts[:k], n)["ids"]
                    alone = [raw.generate(p, n)["tokens"] for p in prompts[:k]]
                    batch_diffs[k] = [first_diff(a, b) for a, b in zip(alone, together)]
    finally:
        if raw is not None:
            raw.close()
        shutil.rmtree(root, ignore_errors=True)

    print()
    verdicts = []
    if single_rounds:
        print(f"Generation, one stream, {n} tokens, median [min-max] over {len(single_rounds)} rounds:")
        print("| path | generation t/s | / raw (per round) | TTFT ms | other load (cores) |")
        print("|---|---|---|---|---|")
        for name in ("raw", "complete", "infer"):
            ratio = "1" if name == "raw" else fmt([r[f"ratio_{name}"] for r in single_rounds], ".3f")
            print(f"| {name} | {fmt([r[name]['tps'] for r in single_rounds], '.2f')} | {ratio} | "
                  f"{fmt([r[name]['ttft_ms'] for r in single_rounds])} | "
                  f"{fmt([r[name]['other'] or 0 for r in single_rounds], '.2f')} |")
        print(f"(complete, the actor's own stats.tokens_per_s: "
              f"{fmt([r['complete']['stats_tps'] for r in single_rounds], '.2f')})")
        for name in ("complete", "infer"):
            m = med([r[f"ratio_{name}"] for r in single_rounds])[0]
            verdicts.append(f"{name} / raw = {m:.1%} (goal >= 95 %): {'MET' if m >= 0.95 else 'MISSED'}")
    if conc_rounds:
        ks = sorted(int(k) for k in conc_rounds[0]["erllama"])
        k1 = str(ks[0])
        print()
        print(f"Concurrent streams on one model (n_seq_max={kmax}), {n} tokens each, median [min-max] "
              f"over {len(conc_rounds)} rounds; raw = the binding's loop decoding the same sequences together:")
        print(f"| streams | erllama aggregate t/s | x {k1} stream | raw aggregate t/s | x {k1} stream | "
              f"erllama / raw | erllama generation-only t/s | wall s | TTFT ms (each stream) | other load |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for k in map(str, ks):
            es = [r["erllama"][k] for r in conc_rounds]
            rs = [r["raw"][k] for r in conc_rounds]
            print(f"| {k} | {fmt([x['agg_tps'] for x in es], '.2f')} | "
                  f"{fmt([r['erllama'][k]['agg_tps'] / r['erllama'][k1]['agg_tps'] for r in conc_rounds], '.2f')} | "
                  f"{fmt([x['agg_tps'] for x in rs], '.2f')} | "
                  f"{fmt([r['raw'][k]['agg_tps'] / r['raw'][k1]['agg_tps'] for r in conc_rounds], '.2f')} | "
                  f"{fmt([r['erllama'][k]['agg_tps'] / r['raw'][k]['agg_tps'] for r in conc_rounds], '.3f')} | "
                  f"{fmt([x['gen_tps'] for x in es], '.2f')} | {fmt([x['wall_s'] for x in es], '.2f')} | "
                  f"{fmt([t for x in es for t in x['ttft_ms']], '.0f')} | "
                  f"{fmt([max(x['other'] or 0, y['other'] or 0) for x, y in zip(es, rs)], '.2f')} |")
        if kmax >= 4 and ks[0] == 1:
            m = med([r["erllama"]["4"]["agg_tps"] / r["erllama"]["1"]["agg_tps"] for r in conc_rounds])[0]
            mr = med([r["raw"]["4"]["agg_tps"] / r["raw"]["1"]["agg_tps"] for r in conc_rounds])[0]
            verdicts.append(f"4 streams / 1 stream = {m:.2f}x (goal >= 2x): {'MET' if m >= 2 else 'MISSED'} "
                            f"(the raw binding's batched loop reaches {mr:.2f}x)")
    if costs:
        print()
        print("One decode step of k one-token rows (k sequences), median ms, raw binding:")
        print("| rows | with logits | without logits | logits share | ms per row with logits |")
        print("|---|---|---|---|---|")
        for k in sorted(args.streams):
            w, wo = costs[f"{k}_logits"], costs[f"{k}"]
            print(f"| {k} | {w:.2f} | {wo:.2f} | {(w - wo) / w:.0%} | {w / k:.2f} |")
    if batch_diffs:
        print()
        print(f"Greedy tokens of k sequences decoded together vs each decoded alone (raw binding, {n} tokens): "
              "first differing token per sequence (None = identical)")
        for k, d in batch_diffs.items():
            print(f"  {k} together: {d}")
    print()
    for v in verdicts:
        print("goal: " + v)
    if dropped:
        print(f"dropped {len(dropped)} disturbed rounds (other load {', '.join(f'{x:.2f}' for x in dropped)} cores)")
    for mm in mismatches:
        print("MISMATCH: " + mm)
    if not mismatches:
        print("outputs: complete and infer generated the same tokens as the raw loop, and the concurrent "
              "streams the same as the raw batched loop, in every round")
    print(json.dumps({"bench": "throughput", "model": path, "threads": args.threads, "tokens": n,
                      "n_ctx": args.n_ctx, "rounds": args.rounds, "cpus": len(os.sched_getaffinity(0)),
                      "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      "single": single_rounds, "concurrent": conc_rounds, "step_costs_ms": costs,
                      "batch_vs_alone_first_diff": {str(k): v for k, v in batch_diffs.items()}, "git": git_rev(),
                      "dropped_other": dropped, "mismatches": mismatches, "verdicts": verdicts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
