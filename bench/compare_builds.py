"""Compare builds of the binding by alternating ``native_speed.py`` runs and taking ratios.

Each build is a directory to put on ``PYTHONPATH`` (a tree holding a built
``erllama/_native*.so``), named ``NAME=DIR``; the first is the baseline. Every round runs
each ``--thread`` mode for every build in a fresh process, reversing the build order on
odd rounds so that drift of the machine's speed does not favour one build. A ratio is
taken within a round (build / baseline, same mode) and the table reports the median over
rounds.

On a shared machine another process taking a core stalls ggml's spinning threads. Before
each run the driver waits for the other processes to go quiet; ``native_speed.py`` drops
and repeats a repetition that saw more than ``--max-other`` cores of other load, and the
driver repeats a run that still kept one.

    python bench/compare_builds.py --build off=/work/main --build on=/tmp/omp-tree \\
        --thread main --thread worker --rounds 3

The last output line is a JSON object with every run and the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cpuload import cpu_busy_s

METRICS = ("pp", "tg", "tg_nosample")  # the keys native_speed.py reports
SPEED = Path(__file__).with_name("native_speed.py")
LABELS = {"pp": "pp512", "tg": "tg128 sampled", "tg_nosample": "tg128 decode"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--build", action="append", required=True, metavar="NAME=DIR",
                   help="a build to compare (repeat; the first is the baseline)")
    p.add_argument("--thread", action="append", choices=("main", "worker", "mixed"),
                   help="decode thread modes to run (repeat; default: main and worker)")
    p.add_argument("--rounds", type=int, default=3, help="alternation rounds")
    p.add_argument("--reps", type=int, default=5, help="repetitions per run (native_speed --reps)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    p.add_argument("--model", help="GGUF file (default: the Gemma model)")
    p.add_argument("--max-other", type=float, default=0.2,
                   help="drop a repetition during which other processes used more cores than this")
    p.add_argument("--retries", type=int, default=4, help="repeats of a disturbed run before keeping it")
    p.add_argument("--idle-wait", type=float, default=120.0,
                   help="seconds to wait for other load to stop before each run")
    args = p.parse_args(argv)
    args.thread = args.thread or ["main", "worker"]
    builds = []
    for spec in args.build:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            p.error(f"--build wants NAME=DIR, got {spec!r}")
        if not list(Path(path).glob("erllama/_native*.so")):
            p.error(f"{path} holds no built erllama/_native*.so")
        builds.append((name, str(Path(path).resolve())))
    args.builds = builds
    return args


def wait_idle(limit: float, timeout: float) -> float:
    """Wait until the machine's busy cores over 2 s fall below ``limit``; return the last load."""
    deadline = time.monotonic() + timeout
    while True:
        b0, t0 = cpu_busy_s(), time.perf_counter()
        time.sleep(2.0)
        b1 = cpu_busy_s()
        if b0 is None or b1 is None:
            return 0.0
        load = (b1 - b0) / (time.perf_counter() - t0)
        if load < limit or time.monotonic() > deadline:
            return load


def run_once(args, name: str, path: str, mode: str) -> dict:
    """One native_speed process for ``path`` in ``mode``, repeated while it was disturbed."""
    cmd = [sys.executable, str(SPEED), "--reps", str(args.reps), "--threads", str(args.threads),
           "--thread", mode, "--label", name, "--max-other", str(args.max_other)]
    if args.model:
        cmd += ["--model", args.model]
    env = dict(os.environ, PYTHONPATH=path)
    res = None
    for attempt in range(args.retries + 1):
        wait_idle(args.max_other, args.idle_wait)
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} (PYTHONPATH={path}) failed:\n{out.stderr[-3000:]}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        if not res["native"].startswith(path + os.sep):
            raise SystemExit(f"PYTHONPATH={path} imported {res['native']}: not the build asked for")
        res["attempt"] = attempt
        if not res["disturbed"]:
            break
        print(f"  {name}/{mode}: disturbed by other processes, repeating", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs: list[dict] = []
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for rnd in range(args.rounds):
        order = args.builds if rnd % 2 == 0 else args.builds[::-1]
        for mode in args.thread:
            for name, path in order:
                r = run_once(args, name, path, mode)
                r["round"] = rnd
                runs.append(r)
                print(f"round {rnd} {name:<8} {mode:<7} openmp={r['openmp']!s:<5} "
                      + "  ".join(f"{LABELS[m]} {r[m]['median']:7.1f}" for m in METRICS)
                      + f"  dropped {len(r['dropped_other_cpu'])}"
                      + ("  DISTURBED" if r["disturbed"] else ""), flush=True)

    def pick(name, mode):
        return {r["round"]: r for r in runs if r["label"] == name and r["thread"] == mode}

    base = args.builds[0][0]
    summary = {}
    print()
    print(f"median over {args.rounds} rounds of each run's median (tokens/s); ratio = build / {base}, "
          "taken per round, median [min–max]")
    print(f"{'build':<8} {'thread':<7} " + " ".join(f"{LABELS[m]:>14} {'ratio':>18}" for m in METRICS))
    for mode in args.thread:
        ref = pick(base, mode)
        for name, _ in args.builds:
            mine = pick(name, mode)
            row = {}
            cells = []
            for m in METRICS:
                med = statistics.median(r[m]["median"] for r in mine.values())
                ratios = [mine[k][m]["median"] / ref[k][m]["median"] for k in mine if k in ref]
                row[m] = {"median": round(med, 2), "ratio": round(statistics.median(ratios), 3),
                          "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3)}
                cells.append(f"{med:14.1f} {row[m]['ratio']:6.3f} [{min(ratios):.2f}–{max(ratios):.2f}]")
            summary[f"{name}/{mode}"] = row
            print(f"{name:<8} {mode:<7} " + " ".join(cells))
    if len(args.thread) > 1:
        print()
        first = args.thread[0]
        print(f"thread-mode ratios (mode / {first}, same build, per round): median [min–max]")
        for name, _ in args.builds:
            ref = pick(name, first)
            for mode in args.thread[1:]:
                mine = pick(name, mode)
                cells = []
                for m in METRICS:
                    ratios = [mine[k][m]["median"] / ref[k][m]["median"] for k in mine if k in ref]
                    summary.setdefault(f"{name}/{mode}", {})[m]["vs_" + first] = round(statistics.median(ratios), 3)
                    cells.append(f"{LABELS[m]} {statistics.median(ratios):.3f} "
                                 f"[{min(ratios):.2f}–{max(ratios):.2f}]")
                print(f"{name:<8} {mode:<7} " + "   ".join(cells))
    print()
    print(json.dumps({"bench": "compare_builds", "started": started, "builds": dict(args.builds),
                      "threads": args.threads, "reps": args.reps, "rounds": args.rounds,
                      "summary": summary, "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
