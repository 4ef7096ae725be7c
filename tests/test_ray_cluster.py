"""erllama on a real local Ray cluster: 2 nodes of 1 CPU, the Serve application with the
prefix router, the tiny model, the real ``openai`` client. The cluster runs in a child in a
network namespace with only loopback (``unshare -n``: Ray binds to the interface address
otherwise), once for the module; the tests read its report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install erllama[ray])")

CHILD = Path(__file__).with_name("ray_cluster_child.py")


def _can_unshare() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None and shutil.which("ip") is not None


@pytest.fixture(scope="module")
def report(tiny_chatml_path, tmp_path_factory):
    if not _can_unshare():
        pytest.skip("needs root with unshare and ip, to run the cluster in a loopback-only network namespace")
    cache_root = tmp_path_factory.mktemp("ray-cache")
    cmd = f"ip link set lo up && exec {sys.executable} {CHILD} {tiny_chatml_path} {cache_root}"
    proc = subprocess.run(["unshare", "-n", "sh", "-c", cmd], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, f"the cluster child failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("REPORT "):])


def test_one_replica_runs_on_each_node(report):
    nodes = report["nodes_of_replicas"]
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes


def test_a_conversations_later_turns_go_to_the_replica_holding_its_prefix(report):
    convs = report["affinity"]["conversations"]
    assert len(convs) == 8
    for conv in convs:
        first, *later = conv["turns"]
        assert first["cache_hit"] == "cold"
        for turn in later:
            assert turn["replica"] == first["replica"], conv["turns"]
            assert turn["cache_hit"] in ("partial", "exact", "resume") and turn["cached_tokens"] >= 256, turn


def test_a_stream_cut_by_a_replica_kill_ends_with_an_error_event(report):
    stream = report["kill"]["stream"]
    assert stream["chunks"] >= 2
    assert stream["error"] is not None and "the replica serving this stream failed" in stream["error"], stream


def test_the_conversation_is_answered_by_another_replica_right_after_the_kill(report):
    after = report["kill"]["after"]
    assert after["replica"] != after["victim"], after


def test_the_other_node_resumes_the_conversation_from_the_shared_tier(report):
    # the killed replica's rows were written to the shared directory too: the node that
    # takes the conversation over imports the longest one into its disk tier
    after = report["kill"]["after"]
    assert after["cache_hit"] in ("partial", "exact") and after["cached_tokens"] >= 256, after
    assert after["cache_tier"] == "disk", after


def test_serve_replaces_the_killed_replica_and_the_router_stops_choosing_it(report):
    rec = report["kill"]["recovery"]
    assert rec["replaced"] and rec["answered"] >= 10, rec
    assert not rec["victim_seen"], rec
