"""Cached prompts are private and cannot be planted (docs/internals/security.md).

The suite runs as root here, so erllama runs as an ordinary user (uid 54321) in a child
that drops its privileges after importing (``security_child.py``, umask 0), and the
"other local user" is uid 54322: the test (root) creates what that user would create.
Tests that need a second user are skipped, with that reason, when the suite is not root;
the refusals that need no second user run in-process either way.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import queue
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

import erllama
from erllama import errors, private
from erllama.cache.store import CacheConfig, CacheStore
from erllama.config import default_ram_file_dir

ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "security_child.py"
VICTIM, OTHER = 54321, 54322
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: erllama runs as an ordinary user "
                                "(setuid in a child) and another user's files are made with chown")


class Child:
    """A ``security_child.py`` process: JSON lines out, a line in to go on; every wait bounded."""

    def __init__(self, uid: int, scenario: str, **args) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, str(CHILD), str(uid), scenario, json.dumps(args)],
                                     cwd="/", env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def next(self, timeout: float = 120) -> dict:
        """The next JSON line (fails on a crash, EOF or timeout)."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.proc.kill()
            raise AssertionError(f"no answer in {timeout} s") from None
        if line is None:
            self.proc.wait(10)
            raise AssertionError(f"child ended (rc {self.proc.returncode}): {self.proc.stderr.read()[-3000:]}")
        got = json.loads(line)
        assert "crash" not in got, got.get("trace")
        return got

    def go_on(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 60) -> None:
        rc = self.proc.wait(timeout)
        assert rc == 0, self.proc.stderr.read()[-3000:]


def run(scenario: str, uid: int = VICTIM, **args) -> dict:
    child = Child(uid, scenario, **args)
    got = child.next()
    child.finish()
    return got


@pytest.fixture
def base(tiny_path):
    """A directory the ordinary user owns under /tmp, holding a readable copy of the tiny
    model; removed afterwards with the /dev/shm directories of both users."""
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="erllama-sec-"))
    shutil.copy(tiny_path, d / "tiny.gguf")
    os.chmod(d / "tiny.gguf", 0o644)
    os.chmod(d, 0o755)
    os.chown(d, VICTIM, VICTIM)
    yield d
    shutil.rmtree(d, ignore_errors=True)
    for uid in (VICTIM, OTHER):
        for p in glob.glob(f"/dev/shm/erllama-{uid}-*"):
            if os.path.islink(p):
                os.unlink(p)
            else:
                shutil.rmtree(p, ignore_errors=True)


def modes(listing: dict) -> dict[str, tuple[int, int]]:
    """``{path: (mode, uid)}`` for every directory and file of a child's listing."""
    out = {}
    for d, (mode, uid, files) in listing.items():
        out[d] = (mode, uid)
        for name, fmode, fuid in files:
            out[f"{d}/{name}"] = (fmode, fuid)
    return out


@needs_root
def test_directories_are_0700_and_files_0600_as_an_ordinary_user(base):
    """With umask 0, every directory the cache made is 0700 and every file (rows, the lock,
    the fingerprint record) 0600, all the user's; the default ram_file directory is derived
    from the cache directory; another user can read none of it."""
    got = run("save", cache_dir=str(base / "c"), model=str(base / "tiny.gguf"))
    assert got["first"]["hit"] == got["second"]["hit"] == "cold"
    cache_dir, ram_file_dir, disk_dir = got["dirs"]
    assert ram_file_dir == str(default_ram_file_dir(base / "c", VICTIM))
    assert ram_file_dir.startswith(f"/dev/shm/erllama-{VICTIM}-")
    seen = modes(got["listing"])
    rows = [p for p in seen if p.endswith(".kvc")]
    assert any(p.startswith(ram_file_dir) for p in rows) and any(p.startswith(disk_dir) for p in rows)
    assert {f"{ram_file_dir}/.lock", f"{disk_dir}/.lock", f"{cache_dir}/fingerprints.json"} <= set(seen)
    for path, (mode, uid) in seen.items():
        want = 0o700 if path in got["dirs"] else 0o600
        assert (mode, uid) == (want, VICTIM), f"{path}: mode {mode:#o} uid {uid}"
    # another user reads nothing: not a row, not a directory listing
    assert run("probe_read", OTHER, paths=list(seen))["results"] == {p: "PermissionError" for p in seen}




def _other_owns(path: Path, mode: int = 0o777) -> None:
    path.mkdir()
    os.chown(path, OTHER, OTHER)
    os.chmod(path, mode)


@needs_root
@pytest.mark.parametrize("case", ["cache_dir_of_another_user", "ram_file_dir_of_another_user",
                                  "default_ram_file_dir_planted", "default_ram_file_dir_symlink",
                                  "group_writable", "parent_of_another_user"])
def test_a_directory_that_is_not_private_is_refused(base, case):
    """Start raises NotPrivate (a ConfigError) naming the path and what is wrong, and
    leaves the other user's directory as it was."""
    cache_dir, ram_file_dir = base / "c", None
    if case == "cache_dir_of_another_user":
        bad, why = cache_dir, f"owned by uid {OTHER}"
        _other_owns(bad, 0o700)
    elif case == "ram_file_dir_of_another_user":
        bad, why = base / "shm", f"owned by uid {OTHER}"
        ram_file_dir = str(bad)
        _other_owns(bad)
    elif case == "default_ram_file_dir_planted":  # the predictable path in /dev/shm, made first
        bad, why = default_ram_file_dir(cache_dir, VICTIM), f"owned by uid {OTHER}"
        _other_owns(bad)
    elif case == "default_ram_file_dir_symlink":  # ... or a link to a directory the other user owns
        target = base / "elsewhere"
        _other_owns(target)
        bad, why = default_ram_file_dir(cache_dir, VICTIM), "is a symbolic link"
        os.symlink(target, bad)
        os.lchown(bad, OTHER, OTHER)
    elif case == "group_writable":
        bad, why = cache_dir, "writable by its group"
        bad.mkdir()
        os.chown(bad, VICTIM, VICTIM)
        os.chmod(bad, 0o770)
    else:  # the user's own directory inside another user's: that user could swap it
        parent = base / "theirs"
        _other_owns(parent, 0o755)
        cache_dir = parent / "c"
        cache_dir.mkdir()
        os.chown(cache_dir, VICTIM, VICTIM)
        os.chmod(cache_dir, 0o700)
        bad, why = cache_dir, f"its parent {parent} is owned by uid {OTHER}"
    before = os.lstat(bad)
    got = run("start", cache_dir=str(cache_dir), **({"ram_file_dir": ram_file_dir} if ram_file_dir else {}),
              model=str(base / "tiny.gguf"))
    assert got.get("error") == "NotPrivate" and "ConfigError" in got["mro"] and "PermissionError" in got["mro"], got
    assert str(bad) in got["message"] and why in got["message"], got["message"]
    after = os.lstat(bad)
    assert (after.st_mode, after.st_uid, after.st_ino) == (before.st_mode, before.st_uid, before.st_ino)
    if bad.is_dir() and not bad.is_symlink() and bad != cache_dir:
        assert os.listdir(bad) == []  # nothing written into it


@needs_root
def test_a_planted_row_is_never_served(base):
    """Rows replaced by another user's byte-identical copies, while the application runs
    and while it is stopped: each is refused (deleted, counted in foreign_files), the
    prompt is served cold, and the new rows are the user's own again."""
    child = Child(VICTIM, "plant", cache_dir=str(base / "c"), model=str(base / "tiny.gguf"),
                  ram_quota=0, ram_file_quota=0)
    saved = child.next()
    assert saved["result"]["hit"] == "cold"
    disk = base / "c" / "kv"
    rows = sorted(disk.glob("*.kvc"))
    assert rows

    def plant(mode: int) -> int:
        n = 0
        for row in disk.glob("*.kvc"):  # a valid row, bytes and CRCs intact, owned by the other user
            copy = row.with_suffix(".planted")
            shutil.copy2(row, copy)
            os.chown(copy, OTHER, OTHER)
            os.chmod(copy, mode)
            os.replace(copy, row)
            n += 1
        return n

    plant(0o644)  # readable: refused by its owner once opened
    child.go_on()
    live = child.next()
    assert live["result"]["hit"] == "cold" and live["result"]["text"] == saved["result"]["text"]
    assert live["result"]["foreign_files"] >= 1
    assert VICTIM in {os.lstat(p).st_uid for p in disk.glob("*.kvc")}  # the new saves are the user's
    child.next()  # stopped

    planted = plant(0o600)  # not even readable: refused by its owner before
    child.go_on()
    restart = child.next()
    child.finish()
    assert restart["result"]["hit"] == "cold" and restart["result"]["foreign_files"] == planted, (planted, restart)
    assert {os.lstat(p).st_uid for p in disk.glob("*.kvc")} == {VICTIM}


@needs_root
def test_a_symlinked_row_is_refused(base):
    """A row name that is a symbolic link (to a valid row elsewhere) is not followed."""
    child = Child(VICTIM, "plant", cache_dir=str(base / "c"), model=str(base / "tiny.gguf"),
                  ram_quota=0, ram_file_quota=0)
    assert child.next()["result"]["hit"] == "cold"
    disk = base / "c" / "kv"
    away = base / "away"
    away.mkdir()
    for row in disk.glob("*.kvc"):
        shutil.copy2(row, away / row.name)
        os.chown(away / row.name, VICTIM, VICTIM)
        row.unlink()
        os.symlink(away / row.name, row)
        os.lchown(row, VICTIM, VICTIM)
    child.go_on()
    live = child.next()
    assert live["result"]["hit"] == "cold" and live["result"]["foreign_files"] >= 1, live
    child.next()  # stopped
    child.go_on()
    restart = child.next()  # the scan at the restart refuses the links left
    child.finish()
    assert restart["result"]["text"] == live["result"]["text"]
    assert not any(p.is_symlink() for p in disk.iterdir())
    assert all(os.lstat(p).st_uid == VICTIM for p in disk.glob("*.kvc"))


def test_two_applications_on_different_cache_dirs_never_share_rows(tmp_path, tiny_path):
    """The default ram_file directory follows the cache directory: an application on
    another cache directory gets a cold miss, not the first one's row."""
    dirs = []
    try:
        for name in ("a", "b"):
            with erllama.running(cache_dir=str(tmp_path / name), policy={"min_tokens": 16, "cold_min_tokens": 16}):
                erllama.cache.reset_counters()
                store = erllama.cache.current()
                dirs.append(store.tiers["ram_file"].directory)
                mid = erllama.load_model(tiny_path, tier="ram_file", n_ctx=512, n_threads=1, isolation="none")
                done = erllama.complete(mid, erllama.tokenize(mid, "the cat and the dog " * 10), max_tokens=4)
                assert done.cache_hit == "cold", name
                assert store.flush(30) and any(dirs[-1].glob("*.kvc"))
        assert dirs[0] != dirs[1] and dirs[0].parent == dirs[1].parent == Path("/dev/shm")
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def test_a_second_application_on_the_same_cache_dir_is_refused(tmp_path):
    """Two applications on one cache directory: the second refuses (CacheInUse, naming the
    holder's pid) while the first runs, in another process or in this one; the lock goes
    with the first application's stop, and with its process when it is SIGKILLed."""
    cfg = {"cache_dir": str(tmp_path / "c"), "ram_file_dir": str(tmp_path / "shm")}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, erllama; erllama.start(cache_dir=sys.argv[1], ram_file_dir=sys.argv[2]);"
         "print('up', flush=True); sys.stdin.readline()", cfg["cache_dir"], cfg["ram_file_dir"]],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "up"
        with pytest.raises(errors.CacheInUse, match=f"pid {holder.pid}") as info:
            erllama.start(**cfg)
        assert isinstance(info.value, errors.ConfigError)
        with pytest.raises(errors.CacheInUse, match="disk tier directory"):
            CacheStore.start(CacheConfig(ram_quota=0, ram_file_quota=0, disk_dir=str(tmp_path / "c" / "kv")))
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            holder.kill()
        holder.wait(30)
    with erllama.running(**cfg):  # the kernel dropped the dead holder's lock
        with pytest.raises(errors.CacheInUse):
            CacheStore.start(CacheConfig(ram_quota=0, ram_file_quota=0, disk_dir=str(tmp_path / "c" / "kv")))
    store = CacheStore.start(CacheConfig(ram_quota=0, ram_file_quota=0, disk_dir=str(tmp_path / "c" / "kv")))
    store.close()  # and a stopped application let go of it


def test_refusals_that_need_no_second_user(tmp_path):
    """As whoever runs the suite: a symlinked directory, a group- or world-writable one, a
    parent writable by others without the sticky bit, a file in place of a directory; an
    own directory readable by others is tightened to 0700; an own row readable by others
    to 0600."""
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(errors.NotPrivate, match="is a symbolic link"):
        private.private_dir(tmp_path / "link")
    for mode, who in ((0o770, "its group"), (0o707, "every user")):
        d = tmp_path / f"w{mode:o}"
        d.mkdir()
        d.chmod(mode)
        with pytest.raises(errors.NotPrivate, match=who):
            private.private_dir(d)
    open_parent = tmp_path / "open"
    open_parent.mkdir()
    open_parent.chmod(0o777)
    with pytest.raises(errors.NotPrivate, match="without the sticky bit"):
        private.private_dir(open_parent / "c")
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    assert stat.S_IMODE(private.private_dir(sticky / "c").stat().st_mode) == 0o700
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(errors.NotPrivate, match="not a directory"):
        private.private_dir(tmp_path / "file")
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o755)
    row = loose / "x.kvc"
    row.write_bytes(b"x")
    row.chmod(0o644)
    private.private_dir(loose)
    os.close(private.open_private(row))
    assert (stat.S_IMODE(loose.stat().st_mode), stat.S_IMODE(row.stat().st_mode)) == (0o700, 0o600)
    os.mkfifo(loose / "fifo.kvc")  # never blocks on a planted FIFO
    with pytest.raises(errors.NotPrivate, match="not a regular file"):
        private.open_private(loose / "fifo.kvc")


@needs_root
def test_the_process_boundary_is_closed_to_other_users(tmp_path, tiny_path):
    """isolation="process": another user can list or open none of the host's or the
    worker's descriptors (the memfds, the socketpairs, the model file) nor read their
    memory, maps or environment; the worker's sockets are unnamed (nothing to connect to),
    it listens on no network socket, and holds no file but the model. The host runs in
    this process (root): the interpreter here lives under /root, which an ordinary user
    cannot execute, so a worker cannot be started as one."""
    with erllama.running(cache_dir=str(tmp_path / "c"), ram_file_dir=str(tmp_path / "shm")):
        mid = erllama.load_model(tiny_path, n_ctx=512, n_threads=1, isolation="process")
        assert erllama.complete(mid, erllama.tokenize(mid, "the cat and the dog " * 10), max_tokens=4).text
        workers = [p for p in psutil.Process().children() if "erllama.backend.worker" in " ".join(p.cmdline())]
        assert len(workers) == 1
        paths = []
        for pid in (os.getpid(), workers[0].pid):
            paths += [f"/proc/{pid}/{what}" for what in ("fd", "environ", "mem", "maps")]
            paths += [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
        got = run("probe_read", OTHER, paths=paths)["results"]
        assert set(got.values()) == {"PermissionError"}, {p: r for p, r in got.items() if r != "PermissionError"}
        fds = [os.readlink(f"/proc/{workers[0].pid}/fd/{fd}") for fd in os.listdir(f"/proc/{workers[0].pid}/fd")]
        assert any(f.startswith("/memfd:") for f in fds), fds
        unix = workers[0].net_connections(kind="unix")
        assert unix and all(not c.laddr and not c.raddr for c in unix), unix
        assert not workers[0].net_connections(kind="inet")
        assert {f.path for f in workers[0].open_files()} <= {os.path.realpath(tiny_path)}


def test_a_model_rewritten_in_place_with_its_mtime_set_back_is_hashed_again(tmp_path):
    """The remembered fingerprint follows the file's ctime, which nobody but root can set:
    rows of the old weights are not restored on new ones written in place."""
    from erllama.cache.fingerprint import file_fingerprint

    model = tmp_path / "m.gguf"
    model.write_bytes(b"a" * 4096)
    before = os.stat(model)
    first = file_fingerprint(str(model), "file", tmp_path / "c")
    assert file_fingerprint(str(model), "file", tmp_path / "c") == first  # remembered
    time.sleep(0.05)  # past a coarse timestamp tick (older kernels stamp ctime per jiffy)
    with open(model, "r+b") as f:  # same size, same inode
        f.write(b"b")
    os.utime(model, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(model)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    assert file_fingerprint(str(model), "file", tmp_path / "c") != first
    assert stat.S_IMODE((tmp_path / "c" / "fingerprints.json").stat().st_mode) == 0o600
