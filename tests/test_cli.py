"""The console script, run for real in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "erllama.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_help_for_every_command():
    for cmd in ([], ["demo"], ["complete"], ["cache"], ["bench"]):
        res = run(*cmd, "--help")
        assert res.returncode == 0 and "usage" in res.stdout


def test_complete_and_cache_stats(tiny_path, tmp_path):
    res = run("complete", str(tiny_path), "hello world", "--max-tokens", "5", "--cache-dir", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "tokens; cache cold" in res.stdout
    res = run("cache", "stats", "--cache-dir", str(tmp_path))
    assert res.returncode == 0 and "disk" in res.stdout
    res = run("cache", "stats", "--json", "--cache-dir", str(tmp_path))
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)
    for t in st["tiers"].values():
        assert t["rows"] == t["adopted"] + t["saves"] + t["moves_in"] - t["moves_out"] - t["evictions"] - t["removed"]
        assert t["bytes"] <= t["charged"] <= t["quota"]
    res = run("cache", "gc", "--cache-dir", str(tmp_path))
    assert res.returncode == 0 and "evicted" in res.stdout
    res = run("complete", str(tmp_path / "missing.gguf"), "x")
    assert res.returncode == 2 and "erllama: error: FileNotFoundError" in res.stderr
    assert "Traceback" not in res.stderr
