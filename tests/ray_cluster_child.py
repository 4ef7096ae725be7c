"""Run in a network namespace with only loopback (``unshare -n``, see test_ray_cluster.py):
a real 2-node local Ray cluster (1 CPU each), erllama's Serve application with the prefix
router on the tiny ChatML model, driven by the real ``openai`` client on 127.0.0.1. Prints
one JSON report line (``REPORT {...}``); the test asserts on it. Every wait is bounded."""

from __future__ import annotations

import json
import sys
import time

import openai
import ray
from ray import serve
from ray.cluster_utils import Cluster

from erllama.ray.deployment import build_app
from erllama.server.app import ModelSpec, ServerConfig

PORT = 18431


def main(model_path: str, cache_root: str) -> None:
    report: dict = {"t": {}}
    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes(timeout=60)
    report["t"]["cluster_s"] = time.monotonic() - t0
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        cfg = ServerConfig(models=(ModelSpec(model_path, "tiny", {"n_ctx": 4096, "n_seq_max": 2}),),
                           app_config={"ram_quota": 64_000_000, "ram_file_quota": 0, "disk_quota": 200_000_000,
                                       "shared_dir": f"{cache_root}/shared"})
        serve.run(build_app(cfg, cache_root=cache_root, stats_period_s=0.5), blocking=False)
        report["t"]["serve_s"] = time.monotonic() - t0
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="unused", timeout=60, max_retries=0)
        report["nodes_of_replicas"] = replica_nodes()
        report["affinity"] = affinity(client)
        report["kill"] = kill_and_recover(client, report["affinity"])
        report["t"]["total_s"] = time.monotonic() - t0
    finally:
        for conv in report.get("affinity", {}).get("conversations", []):
            conv.pop("messages", None)
        print("REPORT " + json.dumps(report), flush=True)
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def replica_nodes() -> list[str]:
    """The node of each running engine replica."""
    actors = ray.util.list_named_actors(all_namespaces=True)
    nodes = []
    for a in actors:
        if "ErllamaEngine" in a["name"]:
            h = ray.get_actor(a["name"], namespace=a["namespace"])
            nodes.append(ray.get(h.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()),
                                 timeout=30))
    return nodes


def chat(client: openai.OpenAI, messages: list[dict], max_tokens: int = 8) -> tuple[str, str, dict]:
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=messages, max_tokens=max_tokens,
                                                           temperature=0)
    r = raw.parse()
    return raw.headers["x-erllama-replica"], r.choices[0].message.content or "", (r.model_extra or {})["erllama"]


def affinity(client: openai.OpenAI) -> dict:
    """Eight conversations with their own long system prompt, three turns each, one after
    the other: where each turn went and what it found in the cache."""
    convs = []
    for c in range(8):
        system = f"tenant {c}: " + " ".join(f"rule {c}-{i} holds." for i in range(40))
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": f"question {c}"}]
        turns = []
        for turn in range(3):
            replica, text, info = chat(client, msgs)
            turns.append({"replica": replica, "cache_hit": info["cache_hit"], "cached_tokens": info["cached_tokens"]})
            msgs = msgs + [{"role": "assistant", "content": text}, {"role": "user", "content": f"and {turn}?"}]
        convs.append({"turns": turns, "messages": msgs})
    return {"conversations": convs}


def engine_actor(replica_id: str):
    for a in ray.util.list_named_actors(all_namespaces=True):
        if "ErllamaEngine" in a["name"] and a["name"].endswith(replica_id):
            return ray.get_actor(a["name"], namespace=a["namespace"])
    raise LookupError(replica_id)


def kill_and_recover(client: openai.OpenAI, aff: dict) -> dict:
    """Kill the replica holding a conversation: a request that had sent nothing is retried
    on the other replica; a stream cut mid-answer ends with an error event; Serve starts a
    replacement; requests keep being answered throughout."""
    out: dict = {}
    conv = aff["conversations"][0]
    victim = conv["turns"][-1]["replica"]
    # a stream on the victim, cut after its first chunk
    stream = client.chat.completions.create(model="tiny", messages=conv["messages"], max_tokens=3000,
                                            temperature=0, stream=True)
    chunks, error = 0, None
    try:
        for _ch in stream:
            chunks += 1
            if chunks == 2:
                ray.kill(engine_actor(victim), no_restart=True)
    except Exception as exc:  # the error event becomes an exception in the openai client
        error = f"{type(exc).__name__}: {exc}"
    out["stream"] = {"chunks": chunks, "error": error}
    # the conversation again at once: routed to the dead replica or not, it is answered
    t = time.monotonic()
    replica, _, info = chat(client, conv["messages"])
    out["after"] = {"replica": replica, "victim": victim, "s": time.monotonic() - t, "cache_hit": info["cache_hit"],
                    "cached_tokens": info["cached_tokens"], "cache_tier": info["cache_tier"]}
    # more requests while Serve replaces the replica: every one is answered
    answered, seen = 0, set()
    deadline = time.monotonic() + 90
    replaced = False
    while time.monotonic() < deadline:
        r, _, _ = chat(client, [{"role": "user", "content": f"ping {answered}"}])
        answered += 1
        seen.add(r)
        if len(seen - {victim, replica}) >= 1:
            replaced = True
            if answered >= 10:
                break
        time.sleep(0.1)
    out["recovery"] = {"answered": answered, "replicas_seen": sorted(seen), "replaced": replaced,
                       "victim_seen": victim in seen}
    return out


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
