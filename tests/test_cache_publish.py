"""The publish protocol's file steps, crashed for real: a child process is SIGKILLed at each
stage, then the directory is checked the way a restarted cache sees it."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from erllama.cache import publish as P

ROOT = Path(__file__).resolve().parent.parent


def body_for(i: int, size: int = 300_000) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (size // 32)


def make_parts(i: int) -> list[bytes]:
    body = body_for(i)
    return [hashlib.sha256(body).digest(), body[: len(body) // 2], body[len(body) // 2:]]


def is_valid(path: Path) -> bool:
    data = path.read_bytes()
    return len(data) > 32 and hashlib.sha256(data[32:]).digest() == data[:32]


def key_for(i: int) -> bytes:
    return hashlib.sha256(f"key-{i}".encode()).digest()


CHILD = textwrap.dedent("""
    import hashlib, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_cache_publish import key_for, make_parts, is_valid
    from erllama.cache import publish as P
    d = Path(sys.argv[1])
    for i in range(int(sys.argv[2])):
        tmp = P.write_tmp(d, key_for(i), make_parts(i))
        P.publish(tmp, P.row_path(d, key_for(i)), is_valid)
        print(i, flush=True)
""")


def run_child(directory: Path, n: int, stage: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("ERLLAMA_FAULT_STAGE", None)
    if stage:
        env["ERLLAMA_FAULT_STAGE"] = stage
    code = CHILD.format(tests=str(ROOT / "tests"))
    return subprocess.run([sys.executable, "-c", code, str(directory), str(n)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def check_after_restart(directory: Path, published: list[int]) -> None:
    """What a restarted cache does: sweep temporaries, then every final row must be valid
    and hold exactly what its writer wrote."""
    P.sweep_tmp(directory)
    assert not list(directory.glob("*.tmp"))
    finals = {p.name: p for p in directory.glob("*.kvc")}
    for i in published:
        p = P.row_path(directory, key_for(i))
        assert p.name in finals, f"row {i} was published but is missing"
    for name, p in finals.items():
        assert is_valid(p), f"{name} is visible but invalid"
        i = next(j for j in range(64) if P.row_path(directory, key_for(j)).name == name)
        assert p.read_bytes() == b"".join(make_parts(i))


@pytest.mark.parametrize("stage", P.STAGES)
def test_sigkill_at_each_stage(tmp_path, stage):
    res = run_child(tmp_path, 3, stage)
    assert res.returncode == -signal.SIGKILL, res.stderr
    published = [int(x.split()[0]) for x in res.stdout.split("\n") if x.strip()]
    assert published == []  # killed during the first row
    final = P.row_path(tmp_path, key_for(0))
    # before the link nothing is visible; from the link on, the row is complete
    assert final.exists() == (P.STAGES.index(stage) >= P.STAGES.index("linked"))
    check_after_restart(tmp_path, published)
    # a restarted writer saves the same rows again: the crashed row is adopted or written
    res = run_child(tmp_path, 3, None)
    assert res.returncode == 0, res.stderr
    check_after_restart(tmp_path, [0, 1, 2])


def test_sigkill_at_random_moments(tmp_path):
    import random

    rng = random.Random(7)
    published: set[int] = set()
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", CHILD.format(tests=str(ROOT / "tests")),
                                 str(tmp_path), "40"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        import time

        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
        published |= {int(x) for x in out.split()}
        check_after_restart(tmp_path, sorted(published))
    assert published  # the child got somewhere before being killed


def test_existing_invalid_file_is_replaced_and_valid_one_adopted(tmp_path):
    final = P.row_path(tmp_path, key_for(1))
    final.write_bytes(b"\0" * 100)  # a corrupt leftover under the final name
    tmp = P.write_tmp(tmp_path, key_for(1), make_parts(1))
    assert P.publish(tmp, final, is_valid) == "linked"
    assert is_valid(final) and not tmp.exists()
    tmp2 = P.write_tmp(tmp_path, key_for(1), make_parts(1))
    assert P.publish(tmp2, final, is_valid) == "adopted"
    assert not tmp2.exists()


def test_write_errors_leave_nothing(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    with pytest.raises(P.PublishError) as info:
        P.write_tmp(not_a_dir, key_for(1), make_parts(1))
    assert info.value.errno == 20  # ENOTDIR
    missing = tmp_path / "gone"
    with pytest.raises(P.PublishError, match="cannot create"):
        P.write_tmp(missing, key_for(1), make_parts(1))
    assert list(tmp_path.iterdir()) == [not_a_dir]


def test_enospc_on_a_full_filesystem_leaves_nothing(tmp_path):
    """A 1 MiB tmpfs cannot take a 3 MB row: the write fails cleanly and no file remains."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        parts = [b"x" * 3_000_000]
        with pytest.raises(P.PublishError) as info:
            P.write_tmp(mnt, key_for(2), parts)
        assert info.value.errno == 28  # ENOSPC
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
