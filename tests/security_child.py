"""Run one erllama scenario as an ordinary user, for ``tests/test_cache_security.py``.

``python security_child.py UID SCENARIO JSON``, started as root: everything erllama needs
is imported first (the checkout may not be readable by UID), then the process drops to
UID (groups, gid and uid; umask 0, so nothing is private by accident) and runs SCENARIO
with the JSON arguments. It prints one JSON line per step; a step that waits for the test
reads a line from stdin first.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import stat
import sys
import traceback
from pathlib import Path

import psutil

import erllama
import erllama.app
import erllama.cache
import erllama.cache.store
import erllama.model.actor
from erllama.backend.llama import LlamaBackend  # noqa: F401  loads the compiled module
from erllama.cache.counters import counters

POLICY = {"min_tokens": 16, "cold_min_tokens": 16}
PROMPT = "the cat and the dog " * 10


def say(**what) -> None:
    print(json.dumps(what), flush=True)


def wait_for_test() -> None:
    sys.stdin.readline()


def listing(*dirs: str) -> dict[str, list]:
    """``{dir: [mode, uid, [[name, mode, uid], ...]]}`` without following links."""
    out = {}
    for d in dirs:
        st = os.lstat(d)
        files = []
        for name in sorted(os.listdir(d)):
            fst = os.lstat(os.path.join(d, name))
            files.append([name, stat.S_IMODE(fst.st_mode), fst.st_uid])
        out[d] = [stat.S_IMODE(st.st_mode), st.st_uid, files]
    return out


def complete(mid: str, text: str = PROMPT) -> dict:
    prompt = erllama.tokenize(mid, text)
    done = erllama.complete(mid, prompt, max_tokens=8)
    assert erllama.cache.current().flush(30), "saves did not land"
    return {"hit": done.cache_hit, "text": done.text, "foreign_files": counters.get("foreign_files")}


def start(a: dict) -> erllama.app.Application:
    opts = {k: a[k] for k in ("cache_dir", "ram_file_dir", "ram_quota", "ram_file_quota", "disk_quota") if k in a}
    return erllama.start(policy=POLICY, **opts)


def load(a: dict, tier: str, model_id: str | None = None) -> str:
    return erllama.load_model(a["model"], model_id=model_id, tier=tier, n_ctx=512, n_threads=1,
                              isolation=a.get("isolation", "none"))


def scenario_start(a: dict) -> None:
    """Start an application on the given directories; say whether it started or why not."""
    try:
        app = start(a)
    except Exception as exc:
        say(error=type(exc).__name__, message=str(exc), mro=[c.__name__ for c in type(exc).__mro__])
        return
    say(ok=True, ram_file_dir=str(app.cache.tiers["ram_file"].directory) if "ram_file" in app.cache.tiers else None)
    erllama.stop()


def scenario_save(a: dict) -> None:
    """Save rows in the ``ram_file`` and the ``disk`` tier; list every directory and file."""
    app = start(a)
    first = complete(load(a, "ram_file"))
    second = complete(load(a, "disk"), "a bird and a fish " * 10)
    dirs = [app.config.cache_dir, str(app.cache.tiers["ram_file"].directory), str(app.cache.tiers["disk"].directory)]
    say(first=first, second=second, dirs=dirs, listing=listing(*dirs))
    erllama.stop()


def scenario_plant(a: dict) -> None:
    """Rows saved on disk; the test plants (makes them another user's) while the app runs,
    then while it is stopped; each time the prompt is asked again."""
    app = start(a)
    mid = load(a, "disk", "m")
    disk = str(app.cache.tiers["disk"].directory)
    say(step="saved", result=complete(mid), listing=listing(disk))
    wait_for_test()  # rows replaced by another user's copies while running
    say(step="live", result=complete(mid), listing=listing(disk))
    erllama.stop()
    say(step="stopped", listing=listing(disk))
    wait_for_test()  # rows made another user's while stopped
    counters.reset()
    app = start(a)
    mid = load(a, "disk", "m")
    say(step="restart", result=complete(mid), listing=listing(disk))
    erllama.stop()


def scenario_hold(a: dict) -> None:
    """Hold an application (with ``isolation`` of the model) until stdin says stop."""
    app = start(a)
    mid = load(a, a.get("tier", "disk"), "m")
    say(step="running", result=complete(mid), pid=os.getpid(),
        workers=[p.pid for p in psutil.Process().children()],
        disk=str(app.cache.tiers["disk"].directory) if "disk" in app.cache.tiers else None)
    wait_for_test()
    erllama.stop()
    say(step="stopped")


def scenario_probe_read(a: dict) -> None:
    """Try to read each path (a directory: list it); say what happened to each."""
    out = {}
    for p in a["paths"]:
        try:
            if os.path.isdir(p):
                os.listdir(p)
            else:
                with open(p, "rb") as f:
                    f.read(1)
            out[p] = "read"
        except OSError as exc:
            out[p] = type(exc).__name__
    say(results=out)


def import_everything() -> None:
    """Every erllama module, while the checkout is still readable (as root)."""
    for m in pkgutil.walk_packages(erllama.__path__, "erllama."):
        if not m.name.endswith("__main__"):
            importlib.import_module(m.name)


def main() -> None:
    import_everything()
    uid, scenario, args = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    os.umask(0)
    os.environ["HOME"] = args.get("home", "/nonexistent")
    try:
        globals()[f"scenario_{scenario}"](args)
    except Exception as exc:
        say(crash=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
        raise


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
