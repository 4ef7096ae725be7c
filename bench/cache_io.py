"""Save/restore speed of the KV-state cache tiers, against raw copy/read/CRC baselines.

Measures, in one process, with every measurement of a repetition taken back to back (the
order reversed every other repetition) so that the machine's drift hits them alike:

* **save** per tier (``ram`` = :class:`RamTier`, ``ram_file`` = :class:`FileTier` on
  ``/dev/shm``, ``disk`` = :class:`FileTier` on the work filesystem): ``encode_row`` (payload
  CRC32C + prefix) then ``tier.put``. For the file tiers ``put`` is the whole crash-safe
  publish: write a temporary file, ``fdatasync``, ``link`` onto the final name, fsync the
  directory, then read the file back and validate it completely (header, CRCs, key),
  into a buffer ``read_row`` allocates. The ``ram`` tier keeps the parts without copying.
* **restore** per tier: ``tier.load`` (file tiers: ``readinto`` a reused buffer, then a full
  parse with both CRCs and the key; ram: header parse only, no CRC), then copying the KV
  and the logits into reused destination buffers (what handing them to llama costs), then
  ``row.release()``. The page cache is warm for ``disk``; ``disk_cold`` is the same restore
  after ``posix_fadvise(DONTNEED)`` of the row file.
* **baselines**: ``memoryview`` slice copy into a reused buffer (``memcpy``); the same copy
  into a fresh ``bytearray`` each time (``fresh``: pays the first touch of new pages, slow
  on these VMs, see ``/work/shared/BUILD.md``); ``readinto`` a reused buffer from a plain
  file on the same filesystem as each file tier (page cache warm; for ``disk`` also with
  the file's pages evicted); ``crc32c`` over the payload.
* the **warm-up** repetition is reported apart (``1st ms``): first touch of every buffer,
  tmpfs page and page-cache page in this process.
* **save breakdown** of one size (``--breakdown``, default 40 MB) on both file tiers: the
  steps of ``encode_row`` + ``FileTier.put`` timed one by one (replicated here, same calls).
* **after idle** (``--idle`` s of sleep before each, 0 skips): memcpy into a reused buffer,
  a fresh copy, and the ``disk`` save breakdown, each against the same right after.
* **longest-prefix lookup**: an :class:`Index` with 10,000 available rows of one group,
  distinct token lengths in 1..32768, and a 32,768-token prompt of which a few real prefixes
  are stored: ``candidate_lengths`` + ``prefix_keys`` + ``lookup_exact`` probes, longest
  first, until the first hit; and the exact full-prompt key alone.

Rows hold a 1 MiB float32 logits array (Gemma's n_vocab 262,144) and a KV payload of
``--sizes`` MB (10^6 bytes). Every temporary directory is removed at the end, also on
Ctrl-C or SIGTERM. The last output line is a JSON object for scripts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cpuload import LoadMeter
from report import default_disk_root

try:
    import erllama
except ModuleNotFoundError:  # run from a checkout without an install: use the tree above
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import erllama

from erllama.backend.llama import crc32c
from erllama.cache import kvc, publish
from erllama.cache.index import Index
from erllama.cache.key import KeyMeta, cache_key, key_from_parts, prefix_keys
from erllama.cache.tiers import FileTier, RamTier, encode_row

MB = 1_000_000
N_VOCAB = 262_144
BYTES_PER_TOKEN = 18_457  # Gemma 3 270M KV state per token with swa_full=true (BUILD.md)
META = KeyMeta(b"F" * 32, 7, b"C" * 32)
TIERS = ("ram", "ram_file", "disk")
RESTORES = (*TIERS, "disk_cold")  # disk_cold: the row file's pages evicted first (fadvise)
READ_OF = {"ram_file": "read_ram_file", "disk": "read_disk", "disk_cold": "read_disk_cold"}
BASELINES = ("memcpy", "fresh", "read_ram_file", "read_disk", "read_disk_cold", "crc32c")
BASELINE_NAMES = {
    "memcpy": "memcpy into a reused buffer",
    "fresh": "copy into a fresh bytearray",
    "read_ram_file": "readinto reused buf, /dev/shm",
    "read_disk": "readinto reused buf, disk fs",
    "read_disk_cold": "  same, pages evicted (fadvise)",
    "crc32c": "crc32c of the payload",
}
STEPS = ("crc", "prefix", "open_write", "fdatasync", "close_link_fsync_dir", "validate", "unlink_tmp")
STEP_NAMES = {
    "crc": "encode_row: payload crc32c",
    "prefix": "encode_row: build_prefix",
    "open_write": "open + write tmp file",
    "fdatasync": "fdatasync",
    "close_link_fsync_dir": "close + link + fsync dir",
    "validate": "read-back validation (fresh buf)",
    "unlink_tmp": "unlink tmp",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=float, nargs="+", default=[10, 40, 160],
                   help="KV payload sizes in MB (10^6 bytes); each row also holds 1 MiB of logits")
    p.add_argument("--reps", type=int, default=3, help="measured repetitions (after one warm-up)")
    p.add_argument("--breakdown", type=float, default=40,
                   help="KV size (MB) of the per-step save breakdown on the file tiers; 0 skips it")
    p.add_argument("--idle", type=float, default=10,
                   help="seconds of sleep before each after-idle measurement (fresh copy, memcpy, "
                        "disk save); 0 skips that phase (it takes 3 x reps x IDLE s)")
    p.add_argument("--lookup-reps", type=int, default=20, help="repetitions of the prefix lookup")
    p.add_argument("--lookup-rows", type=int, default=10_000, help="rows in the lookup index")
    p.add_argument("--prompt-tokens", type=int, default=32_768, help="prompt length of the lookup")
    p.add_argument("--shm-root", default="/dev/shm", help="where the ram_file tier's temp dir goes")
    p.add_argument("--disk-root", default=str(default_disk_root()),
                   help="where the disk tier's temp dir goes (the work filesystem)")
    p.add_argument("--label", default="", help="free text copied into the JSON line")
    args = p.parse_args(argv)
    if args.reps < 1 or args.lookup_reps < 1 or any(s <= 0 for s in args.sizes):
        p.error("--reps, --lookup-reps and --sizes must be positive")
    if args.lookup_rows < 1 or args.lookup_rows > 32_768 or args.prompt_tokens < 32_768:
        p.error("--lookup-rows must be in 1..32768 and --prompt-tokens at least 32768")
    return args


def fs_type(path: Path) -> str:
    """The filesystem type of the mount holding ``path`` (from /proc/mounts)."""
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1].replace("\\040", " ")
                if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


def evict(path: Path) -> None:
    """Drop ``path``'s (clean) pages from the page cache; only this file is affected. The
    VM's host may still cache the disk image, so "cold" means cold for this guest only."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class Case:
    """One payload size: the source KV and logits, the row meta and key, the raw files."""

    def __init__(self, mb: float, src: memoryview, logits: np.ndarray, rng: random.Random):
        self.mb = mb
        self.kv_len = int(mb * MB)
        self.kv = src[: self.kv_len]
        self.logits = logits
        n_tokens = max(1, round(self.kv_len / BYTES_PER_TOKEN))
        self.tokens = [rng.randrange(N_VOCAB) for _ in range(n_tokens)]
        self.meta = kvc.RowMeta(fingerprint=META.fingerprint, quant=META.quant,
                                ctx_params_hash=META.ctx_params_hash, tokens=self.tokens,
                                save_reason=kvc.SaveReason.COLD, context_size=32_768)
        self.key = cache_key(META, self.tokens)
        self.row_size = encode_row(self.meta, logits, self.kv).size
        self.payload = self.kv_len + logits.nbytes
        self.raw: dict[str, Path] = {}

    @property
    def label(self) -> str:
        return f"{self.mb:g} MB"


class Bench:
    """The tiers, the reused buffers and one method per measurement (each returns seconds)."""

    def __init__(self, cases: list[Case], shm_dir: Path, disk_dir: Path, src: memoryview):
        self.tiers = {"ram": RamTier(), "ram_file": FileTier("ram_file", shm_dir / "rows"),
                      "disk": FileTier("disk", disk_dir / "rows")}
        self.raw_dirs = {"read_ram_file": shm_dir, "read_disk": disk_dir}
        biggest = max(c.row_size for c in cases)
        # Reused buffers, touched once here (bytearray(n) writes zeros into every page).
        self.read_buf = bytearray(-(-biggest // (1 << 20)) * (1 << 20))
        self.dst = bytearray(max(c.kv_len for c in cases))
        self.dst_logits = bytearray(N_VOCAB * 4)
        self.read_view = memoryview(self.read_buf)  # also pins its size: read_row never grows it
        self.dst_view = memoryview(self.dst)
        self.src_payload = src  # baselines copy/CRC the first `payload` bytes of this
        for c in cases:
            for name, d in self.raw_dirs.items():
                path = d / f"raw-{c.kv_len}.bin"
                with open(path, "wb") as f:
                    f.write(src[: c.row_size])
                c.raw[name] = path

    # ---- baselines ---------------------------------------------------------------------

    def memcpy(self, c: Case) -> float:
        n = c.payload
        t0 = time.perf_counter()
        self.dst_view[: c.kv_len] = self.src_payload[: c.kv_len]
        self.dst_logits[:] = self.src_payload[c.kv_len: n]
        return time.perf_counter() - t0

    def fresh(self, c: Case) -> float:
        t0 = time.perf_counter()
        b = bytearray(self.src_payload[: c.payload])
        dt = time.perf_counter() - t0
        del b
        return dt

    def _read(self, path: Path) -> float:
        view = self.read_view
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            got = 0
            while got < size:
                n = f.readinto(view[got:size])
                if not n:
                    break
                got += n
        return time.perf_counter() - t0

    def read_ram_file(self, c: Case) -> float:
        return self._read(c.raw["read_ram_file"])

    def read_disk(self, c: Case) -> float:
        return self._read(c.raw["read_disk"])

    def read_disk_cold(self, c: Case) -> float:
        evict(c.raw["read_disk"])
        return self._read(c.raw["read_disk"])

    def crc32c(self, c: Case) -> float:
        t0 = time.perf_counter()
        crc32c(self.src_payload[: c.payload])
        return time.perf_counter() - t0

    # ---- tiers ---------------------------------------------------------------------------

    def save(self, tier_name: str, c: Case) -> float:
        tier = self.tiers[tier_name]
        t0 = time.perf_counter()
        parts = encode_row(c.meta, c.logits, c.kv)
        tier.put(c.key, parts)
        return time.perf_counter() - t0

    def restore(self, tier_name: str, c: Case) -> float:
        tier = self.tiers[tier_name]
        t0 = time.perf_counter()
        row = tier.load(c.key) if tier_name == "ram" else tier.load(c.key, self.read_buf)
        n = len(row.kv)
        self.dst_view[:n] = row.kv
        self.dst_logits[:] = row.logits.cast("B")
        row.release()
        dt = time.perf_counter() - t0
        if n != c.kv_len:
            raise AssertionError(f"restored {n} KV bytes, saved {c.kv_len}")
        return dt

    def restore_cold(self, c: Case) -> float:
        """A ``disk`` restore after evicting the row file's pages from the page cache."""
        evict(self.tiers["disk"].path(c.key))
        return self.restore("disk", c)

    def delete(self, tier_name: str, c: Case) -> None:
        self.tiers[tier_name].delete(c.key)

    # ---- save breakdown ------------------------------------------------------------------

    def breakdown(self, tier_name: str, c: Case) -> dict[str, float]:
        """``encode_row`` + ``FileTier.put`` step by step (the same calls as
        ``publish.write_tmp`` and ``publish.publish``, without the fault hooks), plus the
        read-back validation repeated into the reused buffer for comparison."""
        tier: FileTier = self.tiers[tier_name]  # type: ignore[assignment]
        key = c.key
        final = tier.path(key)
        out: dict[str, float] = {}
        t = time.perf_counter
        t0 = t()
        lview = memoryview(np.ascontiguousarray(c.logits, dtype="<f4")).cast("B")
        crc = kvc.payload_crc32c(lview, c.kv)
        t1 = t()
        prefix = kvc.build_prefix(c.meta, len(c.kv), lview, crc)
        t2 = t()
        out["crc"], out["prefix"] = t1 - t0, t2 - t1
        tmp = tier.directory / f"{key.hex()}{publish.ROW_SUFFIX}.{os.getpid()}.bench{publish.TMP_SUFFIX}"
        t0 = t()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            for part in (prefix, lview, c.kv):
                view = memoryview(part).cast("B")
                while view:
                    view = view[os.write(fd, view):]
            t1 = t()
            os.fdatasync(fd)
            t2 = t()
        finally:
            os.close(fd)
        os.link(tmp, final)
        publish.fsync_dir(tier.directory)
        t3 = t()
        out["open_write"], out["fdatasync"], out["close_link_fsync_dir"] = t1 - t0, t2 - t1, t3 - t2
        t0 = t()
        with kvc.read_row(final, expected_key=key, key_fn=key_from_parts):
            pass
        t1 = t()
        tmp.unlink()
        t2 = t()
        out["validate"], out["unlink_tmp"] = t1 - t0, t2 - t1
        out["total"] = sum(out[s] for s in STEPS)
        # Not part of put: the same validation into the reused read buffer.
        t0 = t()
        with kvc.read_row(final, buffer=self.read_buf, expected_key=key, key_fn=key_from_parts):
            pass
        out["validate_reused_buf"] = t() - t0
        final.unlink()
        return out


def units(bench: Bench, cases: list[Case], bd_case: Case | None) -> list[tuple[str, object]]:
    """The measurements of one repetition, in order; a tier's save and restore stay
    together (the row is deleted, untimed, after its restore)."""
    out: list[tuple[str, object]] = []
    for c in cases:
        for b in BASELINES:
            out.append((b, c))
        for tier in TIERS:
            out.append(("tier:" + tier, c))
    if bd_case is not None:
        for tier in ("ram_file", "disk"):
            out.append(("breakdown:" + tier, bd_case))
    return out


def run_rep(bench: Bench, order: list[tuple[str, object]], rec: dict | None) -> None:
    """Run every unit once; record seconds into ``rec`` (None: warm-up)."""
    for name, c in order:
        assert isinstance(c, Case)
        if name.startswith("tier:"):
            tier = name[5:]
            s = bench.save(tier, c)
            r = bench.restore(tier, c)
            rc = bench.restore_cold(c) if tier == "disk" else None
            bench.delete(tier, c)
            if rec is not None:
                rec["save"][tier][c.label] = s
                rec["restore"][tier][c.label] = r
                if rc is not None:
                    rec["restore"]["disk_cold"][c.label] = rc
        elif name.startswith("breakdown:"):
            tier = name[10:]
            d = bench.breakdown(tier, c)
            if rec is not None:
                rec["breakdown"][tier] = d
        else:
            dt = getattr(bench, name)(c)
            if rec is not None:
                rec["baseline"][name][c.label] = dt


def idle_phase(bench: Bench, big: Case, mid: Case, pause: float, reps: int) -> dict:
    """After ``pause`` s of sleep, each of: memcpy into the reused buffer and a copy into
    a fresh bytearray (``big``), a ``disk`` save step by step (:meth:`Bench.breakdown`,
    ``mid``); against the same measurement taken right after without a pause. Shows what
    idle time does to first-touch costs (pages freed for a while go back to the host)."""
    def disk_save(c: Case) -> dict[str, float]:
        return bench.breakdown("disk", c)

    measures = (("memcpy", bench.memcpy, big), ("fresh", bench.fresh, big), ("disk_save", disk_save, mid))
    out: dict = {"pause_s": pause}
    for name, fn, c in measures:
        idle_t: list = []
        busy_t: list = []
        for _ in range(reps):
            bench.delete("disk", c)
            time.sleep(pause)
            idle_t.append(fn(c))
            bench.delete("disk", c)
            busy_t.append(fn(c))
        bench.delete("disk", c)
        if name == "disk_save":
            steps = {k: {"after_idle_ms": ms_summary([d[k] for d in idle_t]),
                         "no_idle_ms": ms_summary([d[k] for d in busy_t])}
                     for k in (*STEPS, "total", "validate_reused_buf")}
            idle_t = [d["total"] for d in idle_t]
            busy_t = [d["total"] for d in busy_t]
        else:
            steps = None
        out[name] = {"size": c.label, "after_idle_ms": ms_summary(idle_t), "no_idle_ms": ms_summary(busy_t),
                     "ratio": round(statistics.median([i / b for i, b in zip(idle_t, busy_t)]), 2)}
        if steps:
            out[name]["steps"] = steps
    return out


def lookup_bench(reps: int, n_rows: int, n_prompt: int, seed: int = 1) -> dict:
    """Longest-prefix lookup over ``n_rows`` rows of one group (see the module docstring)."""
    rng = random.Random(seed)
    group = hashlib.sha256(META.header()).digest()  # as erllama.cache.meta.group_of
    prompt = [rng.randrange(N_VOCAB) for _ in range(n_prompt)]
    lengths = sorted(rng.sample(range(1, 32_769), n_rows), reverse=True)
    # Real prefixes of the prompt: the stored lengths nearest 3/4, 1/2, 1/8 and 1/64 of 32k.
    real = sorted({min(lengths, key=lambda n, f=f: abs(n - int(32_768 * f))) for f in (0.75, 0.5, 0.125, 1 / 64)},
                  reverse=True)
    index = Index({"ram": 1 << 62})
    now = time.time()
    for n in lengths:
        key = cache_key(META, prompt[:n]) if n in real else rng.randbytes(32)
        index.insert_available(key, group, n, "ram", 1, now=now)
    expected = real[0]
    expected_probes = sum(1 for n in lengths if n >= expected)

    t_cand, t_keys, t_probe, t_total, probes_seen, hashes_seen = [], [], [], [], set(), set()
    t_full, t_full_key = [], []
    prompt_np = np.asarray(prompt, dtype=np.uint32)
    t_keys_np = []
    for _ in range(reps):
        t0 = time.perf_counter()
        cand = index.candidate_lengths(group, len(prompt))
        t1 = time.perf_counter()
        keys = prefix_keys(META, prompt, cand)
        t2 = time.perf_counter()
        probes, hit = 0, None
        for n, key in keys:
            probes += 1
            row = index.lookup_exact(key)
            if row is not None:
                hit = n
                break
        t3 = time.perf_counter()
        if hit != expected:
            raise AssertionError(f"longest hit {hit}, expected {expected}")
        t_cand.append(t1 - t0)
        t_keys.append(t2 - t1)
        t_probe.append(t3 - t2)
        t_total.append(t3 - t0)
        probes_seen.add(probes)
        hashes_seen.add(len(keys))
        # the same key computation with the prompt already a uint32 array
        t0 = time.perf_counter()
        prefix_keys(META, prompt_np, cand)
        t_keys_np.append(time.perf_counter() - t0)
        # exact full-prompt key alone: hash + one probe (a miss: no stored row is 32768 long
        # unless the random lengths drew it)
        t0 = time.perf_counter()
        k = cache_key(META, prompt)
        t1 = time.perf_counter()
        index.lookup_exact(k)
        t2 = time.perf_counter()
        t_full_key.append(t1 - t0)
        t_full.append(t2 - t0)
    if expected_probes not in probes_seen or len(probes_seen) != 1:
        raise AssertionError(f"probes {probes_seen}, expected {expected_probes}")
    return {
        "rows": n_rows, "prompt_tokens": n_prompt, "real_prefixes": real, "longest_hit": expected,
        "hashes": hashes_seen.pop(), "probes": probes_seen.pop(),
        "candidate_lengths_ms": ms_summary(t_cand), "prefix_keys_ms": ms_summary(t_keys),
        "probe_ms": ms_summary(t_probe), "total_ms": ms_summary(t_total),
        "prefix_keys_numpy_prompt_ms": ms_summary(t_keys_np),
        "full_key_ms": ms_summary(t_full_key), "full_key_and_probe_ms": ms_summary(t_full),
    }


def ms_summary(values: list[float]) -> dict:
    """Median and min in ms (3 decimals), plus every value."""
    return {"median": round(statistics.median(values) * 1e3, 3), "min": round(min(values) * 1e3, 3),
            "runs": [round(v * 1e3, 3) for v in values]}


def run(args: argparse.Namespace, tmp_dirs: list[Path]) -> dict:
    """Set up (into ``tmp_dirs``, removed by the caller), run the repetitions, summarise."""
    shm_dir = Path(tempfile.mkdtemp(prefix="erllama-bench-", dir=args.shm_root))
    tmp_dirs.append(shm_dir)
    disk_root = Path(args.disk_root)
    disk_root.mkdir(parents=True, exist_ok=True)
    disk_dir = Path(tempfile.mkdtemp(prefix="erllama-bench-", dir=disk_root))
    tmp_dirs.append(disk_dir)

    sizes = list(dict.fromkeys(args.sizes))
    if args.breakdown and args.breakdown not in sizes:
        sizes_all = sizes + [args.breakdown]
    else:
        sizes_all = sizes
    max_payload = int(max(sizes_all) * MB) + N_VOCAB * 4 + (1 << 20)
    nrng = np.random.default_rng(0)
    src = memoryview(bytearray(nrng.bytes(max_payload)))
    logits = nrng.standard_normal(N_VOCAB).astype(np.float32)
    rng = random.Random(0)
    cases = {mb: Case(mb, src, logits, rng) for mb in sizes_all}
    main_cases = [cases[mb] for mb in sizes]
    bd_case = cases[args.breakdown] if args.breakdown else None
    bench = Bench(list(cases.values()), shm_dir, disk_dir, src)

    order = units(bench, main_cases, bd_case)
    t_start = time.perf_counter()
    def new_rec() -> dict:
        return {"save": {t: {} for t in TIERS}, "restore": {t: {} for t in RESTORES},
                "baseline": {b: {} for b in BASELINES}, "breakdown": {}}

    first = new_rec()
    run_rep(bench, order, first)  # warm-up (first touch of every buffer, page cache): kept apart
    reps, other = [], []
    for i in range(args.reps):
        rec = new_rec()
        with LoadMeter() as load:
            run_rep(bench, order if i % 2 else order[::-1], rec)
        reps.append(rec)
        other.append(None if load.other is None else round(load.other, 2))
    io_s = time.perf_counter() - t_start
    idle = idle_phase(bench, cases[max(sizes)], bd_case or main_cases[0], args.idle, args.reps) \
        if args.idle > 0 else None

    res: dict = {
        "bench": "cache_io", "label": args.label, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
        "erllama": erllama.__version__, "reps": args.reps,
        "dirs": {"ram_file": str(shm_dir), "disk": str(disk_dir)},
        "fs": {"ram_file": fs_type(shm_dir), "disk": fs_type(disk_dir)},
        "sizes_mb": sizes, "logits_bytes": N_VOCAB * 4,
        "row_bytes": {c.label: c.row_size for c in main_cases},
        "tokens": {c.label: len(c.tokens) for c in main_cases},
        "other_cpu": other, "io_seconds": round(io_s, 1),
    }
    base: dict = {}
    for b in BASELINES:
        base[b] = {}
        for c in main_cases:
            vals = [r["baseline"][b][c.label] for r in reps]
            nbytes = c.row_size if b.startswith("read") else c.payload
            base[b][c.label] = {**ms_summary(vals), "mb_s": round(nbytes / statistics.median(vals) / MB, 1)}
    res["baseline"] = base
    res["first"] = {
        "baseline": {b: {c.label: round(first["baseline"][b][c.label] * 1e3, 3) for c in main_cases}
                     for b in BASELINES},
        **{what: {t: {c.label: round(first[what][t][c.label] * 1e3, 3) for c in main_cases}
                  for t in (TIERS if what == "save" else RESTORES)}
           for what in ("save", "restore")},
    }
    if idle is not None:
        res["idle"] = idle
    for what in ("save", "restore"):
        out: dict = {}
        for tier in (TIERS if what == "save" else RESTORES):
            out[tier] = {}
            for c in main_cases:
                vals = [r[what][tier][c.label] for r in reps]
                entry = {**ms_summary(vals), "mb_s": round(c.row_size / statistics.median(vals) / MB, 1)}
                ratios = {"memcpy": [r[what][tier][c.label] / r["baseline"]["memcpy"][c.label] for r in reps],
                          "crc32c": [r[what][tier][c.label] / r["baseline"]["crc32c"][c.label] for r in reps]}
                if tier != "ram":
                    rb = READ_OF[tier]
                    ratios["read"] = [r[what][tier][c.label] / r["baseline"][rb][c.label] for r in reps]
                    ratios["read_crc_memcpy"] = [
                        r[what][tier][c.label] / (r["baseline"][rb][c.label] + r["baseline"]["crc32c"][c.label]
                                                  + r["baseline"]["memcpy"][c.label]) for r in reps]
                else:
                    ratios["crc_memcpy"] = [
                        r[what][tier][c.label] / (r["baseline"]["crc32c"][c.label]
                                                  + r["baseline"]["memcpy"][c.label]) for r in reps]
                entry["ratio"] = {k: round(statistics.median(v), 2) for k, v in ratios.items()}
                out[tier][c.label] = entry
        res[what] = out
    if bd_case is not None:
        bd: dict = {"size": bd_case.label, "row_bytes": bd_case.row_size}
        for tier in ("ram_file", "disk"):
            keys = (*STEPS, "total", "validate_reused_buf")
            bd[tier] = {k: ms_summary([r["breakdown"][tier][k] for r in reps]) for k in keys}
        res["breakdown"] = bd
    t0 = time.perf_counter()
    res["lookup"] = lookup_bench(args.lookup_reps, args.lookup_rows, args.prompt_tokens)
    res["lookup_seconds"] = round(time.perf_counter() - t0, 1)
    return res


def report(res: dict) -> None:
    """Print the tables, then the JSON line."""
    sizes = list(res["row_bytes"])
    print(f"cache_io     erllama {res['erllama']}, Python {res['python']}, {res['cpus']} cpus, "
          f"{res['reps']} reps after 1 warm-up, order reversed every other rep")
    print(f"rows         1 MiB float32 logits + KV of {', '.join(sizes)} (MB = 10^6 B); row file "
          f"{', '.join(f'{b / MB:.2f}' for b in res['row_bytes'].values())} MB; tokens "
          f"{', '.join(str(t) for t in res['tokens'].values())}")
    print(f"dirs         ram_file {res['dirs']['ram_file']} ({res['fs']['ram_file']}), "
          f"disk {res['dirs']['disk']} ({res['fs']['disk']})")
    busy = [x for x in res["other_cpu"] if x is not None]
    if busy:
        print(f"other load   {', '.join(f'{x:.2f}' for x in busy)} cores per rep (other processes + steal)")
    print()
    print("Baselines (ms median / min, MB/s from the median)")
    print(f"{'':<32}" + "".join(f"{s:>26}" for s in sizes))
    for b in BASELINES:
        cells = "".join(f"{e['median']:>9.2f} /{e['min']:>7.2f} {e['mb_s']:>7.0f}"
                        for e in (res["baseline"][b][s] for s in sizes))
        print(f"{BASELINE_NAMES[b]:<32}{cells}")
    cells = "".join(f"{res['first']['baseline']['fresh'][s]:>9.2f}{'':>17}" for s in sizes)
    print(f"{'  same, 1st time (warm-up rep)':<32}{cells}")
    for what, title in (("save", "Save = encode_row + tier.put (files: write, fdatasync, link, fsync dir, "
                                 "read-back validation)"),
                        ("restore", "Restore = tier.load (files: readinto reused buf + full validation) "
                                    "+ copy KV/logits to reused dst + release")):
        print()
        print(title)
        if what == "save":
            print(f"{'tier':<10}{'size':>8} {'ms med':>9} {'ms min':>9} {'MB/s':>8} {'1st ms':>9} {'x memcpy':>9} "
                  f"{'x crc32c':>9}")
        else:
            print(f"{'tier':<10}{'size':>8} {'ms med':>9} {'ms min':>9} {'MB/s':>8} {'1st ms':>9} {'x memcpy':>9} "
                  f"{'x read':>8} {'x floor':>8}")
        for tier in (TIERS if what == "save" else RESTORES):
            for s in sizes:
                e = res[what][tier][s]
                r = e["ratio"]
                line = (f"{tier:<10}{s:>8} {e['median']:>9.2f} {e['min']:>9.2f} {e['mb_s']:>8.0f} "
                        f"{res['first'][what][tier][s]:>9.2f} {r['memcpy']:>9.2f}")
                if what == "save":
                    line += f" {r['crc32c']:>9.2f}"
                else:
                    floor = r.get("read_crc_memcpy", r.get("crc_memcpy"))
                    line += f" {r['read']:>8.2f}" if "read" in r else f" {'-':>8}"
                    line += f" {floor:>8.2f}" if tier != "ram" else f" {'-':>8}"
                print(line)
    print("1st ms: the warm-up repetition (first touch of buffers and pages). x memcpy / x crc32c / x read: "
          "time over that baseline's time in the same rep,\nmedian of the per-rep ratios; x floor: over "
          "read + crc32c + memcpy (file tiers: what a verified restore must do) or crc32c + memcpy (ram)")
    if "breakdown" in res:
        bd = res["breakdown"]
        print()
        print(f"Save breakdown, {bd['size']} KV ({bd['row_bytes'] / MB:.2f} MB row), ms median / min")
        print(f"{'step':<36}{'ram_file':>20}{'disk':>20}")
        for k in (*STEPS, "total", "validate_reused_buf"):
            name = STEP_NAMES.get(k, {"total": "sum of the steps",
                                      "validate_reused_buf": "(validation into a reused buf)"}.get(k, k))
            cells = "".join(f"{bd[t][k]['median']:>11.2f} /{bd[t][k]['min']:>7.2f}" for t in ("ram_file", "disk"))
            print(f"{name:<36}{cells}")
    if "idle" in res:
        idle = res["idle"]
        print()
        print(f"After {idle['pause_s']:g} s idle (sleep before each), against the same right after "
              "without a pause; ms median / min")
        print(f"{'':<36}{'size':>8}{'after idle':>20}{'no pause':>20}{'ratio':>8}")
        rows = [("memcpy", "memcpy into a reused buffer", idle["memcpy"]),
                ("fresh", "copy into a fresh bytearray", idle["fresh"]),
                ("disk_save", "disk save (encode_row + put steps)", idle["disk_save"])]
        for k in (*STEPS, "validate_reused_buf"):
            e = idle["disk_save"]["steps"][k]
            rows.append((k, "  " + STEP_NAMES.get(k, "(validation into a reused buf)"), {
                "size": "", **e, "ratio": None}))
        for _, name, e in rows:
            ratio = f"{e['ratio']:>8.2f}" if e["ratio"] is not None else ""
            print(f"{name:<36}{e['size']:>8}{e['after_idle_ms']['median']:>11.2f} /{e['after_idle_ms']['min']:>7.2f}"
                  f"{e['no_idle_ms']['median']:>11.2f} /{e['no_idle_ms']['min']:>7.2f}{ratio}")
    lk = res["lookup"]
    print()
    print(f"Longest-prefix lookup: {lk['rows']} rows of one group, {lk['prompt_tokens']}-token prompt (list of "
          f"ints), stored real prefixes {lk['real_prefixes']}")
    print(f"  {lk['hashes']} prefix keys hashed, {lk['probes']} lookup_exact probes until the hit at "
          f"{lk['longest_hit']} tokens")
    print(f"{'step':<44}{'ms median':>10}{'min':>9}")
    for k, name in (("candidate_lengths_ms", "candidate_lengths (sort)"),
                    ("prefix_keys_ms", "prefix_keys"),
                    ("probe_ms", "lookup_exact probes until the hit"),
                    ("total_ms", "total per lookup"),
                    ("prefix_keys_numpy_prompt_ms", "(prefix_keys, prompt as a uint32 array)"),
                    ("full_key_ms", "cache_key of the full prompt"),
                    ("full_key_and_probe_ms", "cache_key of the full prompt + lookup_exact")):
        print(f"{name:<44}{lk[k]['median']:>10.3f}{lk[k]['min']:>9.3f}")
    print()
    print(json.dumps(res, sort_keys=False))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp_dirs: list[Path] = []

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        res = run(args, tmp_dirs)
    finally:
        for d in tmp_dirs:
            shutil.rmtree(d, ignore_errors=True)
        signal.signal(signal.SIGTERM, old)
    report(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
