"""Prefix-aware routing on a 2-node local Ray cluster, against Serve's default router.

A multi-tenant chat workload: ``--tenants`` tenants (default 16), each with a system prompt of
1-2k tokens and ``--users`` users (default 1) holding ``--turns``-turn conversations (default
3). ``--clients`` connections (default 4) serve a shared queue of ready turns, like a
front end's pool: the conversations' first turns in a shuffled but fixed order, and a
conversation's next turn joins the end of the queue when its previous answer is complete;
whichever connection is free sends it. (``--sticky-clients``: each connection owns its
conversations instead. With as many closed-loop connections as replicas, that pins each
connection to one replica under any least-loaded router, so Serve's default router gets
the affinity by accident.) The real ``openai`` client streams every answer. Three runs on
the same cluster (2 nodes of 1 CPU, the same model, fresh caches each):

- ``one node``: a single engine replica (the hit rate a cluster should keep);
- ``prefix router``: 2 replicas, erllama's ``PrefixRouter``;
- ``default router``: 2 replicas, Serve's power-of-two-choices router.

Printed per run: cache hit rate (requests served from a cached prefix), p50/p95 time to
first token, wall time; then the ratios. Goals (issue 15): hit rate within 10 % of one node,
p50 TTFT >= 5x better than the default router.

Ray binds to the machine's interface address; the run re-executes itself in a network
namespace with only loopback (``unshare -n``, root) so that everything stays on 127.0.0.1.
Usage: ``python bench/cluster.py [--model gemma|tiny|PATH] [--tenants 16] [--users 1] [--turns 3]
[--clients 4] [--sticky-clients] [--ram-mb 1024] [--seed 0]``.
"""

# ruff: noqa: E402  (the path is fixed before the imports, see below)
from __future__ import annotations

import sys
from pathlib import Path

# bench/http.py shadows the standard library's ``http`` package: keep this folder behind it
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

import argparse
import collections
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from typing import Any

PORT = 18533


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma", help="gemma (default model), tiny (synthetic) or a GGUF path")
    ap.add_argument("--tenants", type=int, default=16)
    ap.add_argument("--users", type=int, default=1, help="conversations per tenant (they share its system prompt)")
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4, help="concurrent connections")
    ap.add_argument("--sticky-clients", action="store_true",
                    help="each connection owns its conversations (the workload of the first measurements)")
    ap.add_argument("--tokens", type=int, default=16, help="tokens generated per answer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ram-mb", type=int, default=1024,
                    help="each replica's ram tier (MB; the only tier). 160 holds about 14 rows of the default "
                         "workload with Gemma 3 270M: less than one node's working set, more than half of it")
    ap.add_argument("--prompt-scale", type=float, default=None,
                    help="system prompt length factor (default 1; 0.12 for tiny, which spends a token per byte)")
    ap.add_argument("--in-namespace", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.in_namespace:
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            sys.exit("bench/cluster.py needs root and unshare (it runs the cluster in a loopback-only namespace)")
        cmd = " ".join([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--in-namespace"])
        sys.exit(subprocess.call(["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {cmd}"]))
    if args.prompt_scale is None:
        args.prompt_scale = 0.12 if args.model == "tiny" else 1.0
    run(args)


def model_path(name: str, tmp: Path) -> tuple[str, dict]:
    """The model file and its load options."""
    if name == "gemma":
        from erllama.default_model import default_model_path

        return str(default_model_path()), {"n_ctx": 8192, "n_seq_max": 2, "n_threads": 1, "chat_template": "gemma"}
    if name == "tiny":
        from erllama.testing.tinymodel import write_tiny_model

        return str(write_tiny_model(tmp / "tiny-chatml.gguf", chatml=True)), {"n_ctx": 8192, "n_seq_max": 2}
    return name, {"n_ctx": 8192, "n_seq_max": 2, "n_threads": 1}


def first_turns(args: argparse.Namespace) -> list[tuple[int, int]]:
    """Every conversation (tenant, user) once, in the run's fixed shuffled order."""
    rng = random.Random(args.seed)
    convs = [(t, u) for t in range(args.tenants) for u in range(args.users)]
    rng.shuffle(convs)
    return convs


def sticky_workload(args: argparse.Namespace) -> list[list[tuple[int, int]]]:
    """``--sticky-clients``: each connection's list of turns, in order; one connection holds
    each conversation and goes round its conversations ``--turns`` times."""
    per_client: list[list[tuple[int, int]]] = [[] for _ in range(args.clients)]
    for i, conv in enumerate(first_turns(args)):
        per_client[i % args.clients].append(conv)
    return [[c for _ in range(args.turns) for c in convs_c] for convs_c in per_client]


class TurnQueue:
    """The shared queue of ready turns: a conversation's next turn is queued when its
    previous one is complete, so its turns stay in order whichever connection sends them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.ready = collections.deque(first_turns(args))
        self.left = {conv: args.turns for conv in self.ready}
        self.busy = 0
        self.cond = threading.Condition()

    def take(self) -> tuple[int, int] | None:
        """The next ready turn; None when every turn is done (waits while turns run)."""
        with self.cond:
            while not self.ready and self.busy:
                self.cond.wait(5)
            if not self.ready:
                return None
            self.busy += 1
            return self.ready.popleft()

    def done(self, conv: tuple[int, int]) -> None:
        """``conv``'s turn is answered: queue its next one."""
        with self.cond:
            self.busy -= 1
            self.left[conv] -= 1
            if self.left[conv]:
                self.ready.append(conv)
            self.cond.notify_all()


def system_prompt(tenant: int, rng: random.Random, scale: float) -> str:
    """A system prompt of its own per tenant: 1-2k tokens of Gemma's vocabulary at scale 1."""
    n = max(4, int(rng.randint(60, 115) * scale))
    return f"You are the assistant of tenant {tenant}. " + " ".join(
        f"Policy {tenant}.{i}: answer questions about item {rng.randint(0, 10**6)} politely." for i in range(n))


def drive(base: str, model: str, args: argparse.Namespace) -> dict:
    """Run the workload through ``base``; per request: TTFT, cache hit, replica."""
    import openai

    rng = random.Random(args.seed)
    systems = {t: system_prompt(t, rng, args.prompt_scale) for t in range(args.tenants)}
    history: dict[tuple[int, int], list[dict]] = {}
    results: list[dict] = []
    lock = threading.Lock()

    errors: list[BaseException] = []

    def connection(work: TurnQueue | list[tuple[int, int]]) -> None:
        """One connection: its own turns (sticky) or the shared queue's."""
        client = openai.OpenAI(base_url=base, api_key="unused", timeout=600, max_retries=0)
        try:
            if isinstance(work, list):
                for conv in work:
                    one_turn(client, conv)
                return
            while (conv := work.take()) is not None:
                try:
                    one_turn(client, conv)
                finally:
                    work.done(conv)
        except BaseException as exc:
            errors.append(exc)
            raise

    def one_turn(client: Any, conv: tuple[int, int]) -> None:
        msgs = history.setdefault(conv, [{"role": "system", "content": systems[conv[0]]}])
        msgs.append({"role": "user", "content": f"User {conv[1]} asks question {len(msgs) // 2}."})
        t0 = time.perf_counter()
        ttft, text, info = None, [], {}
        stream = client.chat.completions.create(model=model, messages=msgs, max_tokens=args.tokens,
                                                temperature=0, stream=True)
        for ch in stream:
            if ttft is None and ch.choices and ch.choices[0].delta.content:
                ttft = time.perf_counter() - t0
            if ch.choices and ch.choices[0].delta.content:
                text.append(ch.choices[0].delta.content)
            info = (ch.model_extra or {}).get("erllama") or info
        msgs.append({"role": "assistant", "content": "".join(text)})
        with lock:
            results.append({"ttft": ttft if ttft is not None else time.perf_counter() - t0,
                            "hit": info.get("cache_hit"), "cached": info.get("cached_tokens", 0)})

    t0 = time.perf_counter()
    if args.sticky_clients:
        works: list[Any] = sticky_workload(args)
    else:
        queue = TurnQueue(args)
        works = [queue] * args.clients
    threads = [threading.Thread(target=connection, args=(w,)) for w in works]
    for th in threads:
        th.start()
    for th in threads:
        th.join(1800)
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"a client failed: {errors[0]!r}")
    ttfts = sorted(r["ttft"] for r in results)
    hits = sum(1 for r in results if r["hit"] not in (None, "cold"))
    return {"requests": len(results), "hit_rate": hits / max(1, len(results)), "cold": len(results) - hits,
            "cached_tokens": sum(r["cached"] for r in results),
            "p50_ttft_ms": 1000 * statistics.median(ttfts),
            "p95_ttft_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], "wall_s": wall}


def run(args: argparse.Namespace) -> None:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from erllama.ray.deployment import build_app
    from erllama.server.app import ModelSpec, ServerConfig

    tmp = Path(tempfile.mkdtemp(prefix="erllama-bench-cluster-"))
    path, options = model_path(args.model, tmp)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes(timeout=60)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    base = f"http://127.0.0.1:{PORT}/v1"
    print(f"model {path}; {args.tenants} tenants x {args.users} users x {args.turns} turns, "
          f"{args.clients} clients, {args.tokens} tokens per answer; 2 nodes of 1 CPU; "
          f"{args.ram_mb} MB of cache per replica")
    out = {}
    try:
        for name, replicas, router in (("one node", 1, True), ("prefix router", 2, True),
                                       ("default router", 2, False)):
            cfg = ServerConfig(models=(ModelSpec(path, "m", options),),
                               app_config={"ram_quota": args.ram_mb << 20, "ram_file_quota": 0, "disk_quota": 0})
            serve.run(build_app(cfg, num_replicas=replicas, router=router, cache_root=str(tmp / name),
                                stats_period_s=0.5), blocking=False)
            r = drive(base, "m", args)
            out[name] = r
            print(f"{name:15s} requests {r['requests']:3d}  hit rate {r['hit_rate']:.2f} ({r['cold']:2d} cold)  "
                  f"p50 TTFT {r['p50_ttft_ms']:8.1f} ms  p95 TTFT {r['p95_ttft_ms']:8.1f} ms  "
                  f"wall {r['wall_s']:6.1f} s",
                  flush=True)
            serve.delete("default")
        ours, base_r, one = out["prefix router"], out["default router"], out["one node"]
        rel = f"{ours['hit_rate'] / one['hit_rate']:.2f}x" if one["hit_rate"] else "one node had no hit"
        print(f"hit rate: prefix router {ours['hit_rate']:.2f} vs one node {one['hit_rate']:.2f} "
              f"({rel}; goal >= 0.90x); default router {base_r['hit_rate']:.2f}")
        print(f"p50 TTFT: default router / prefix router = {base_r['p50_ttft_ms'] / ours['p50_ttft_ms']:.1f}x "
              f"(goal >= 5x); p95 {base_r['p95_ttft_ms'] / ours['p95_ttft_ms']:.1f}x")
        print("JSON " + json.dumps(out))
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
