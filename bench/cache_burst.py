"""The KV cache store under a burst of concurrent saves, with tight fast tiers (no model).

At the :class:`CacheStore` level, with opaque rows: ``--threads`` threads (4) each hand
``--saves-per-thread`` (20) saves of distinct token lists to one fresh store as fast as they
can, then the store is flushed. The ``ram`` and ``ram_file`` quotas hold ``--tier-rows``
rows (4) each, the ``disk`` quota everything, so almost every save demotes a row from
``ram`` to ``ram_file`` and one from ``ram_file`` to ``disk``. Two variants:

* ``nowait``: ``store.save(meta, logits, kv, tier="ram")``, the non-waiting submit the model
  actor uses; a ``None`` return is a dropped save (``saves_dropped``).
* ``wait``: the same with ``wait=True`` (evict/shutdown saves): every save should land.

Each repetition builds a new store on fresh temporary directories (``ram_file`` under
``--shm-root``, ``disk`` under ``--disk-root``) and runs both variants, in alternating
order; one warm-up repetition is shown apart and left out of the medians. Per run:

* wall time from the start of the burst until ``flush()`` returned; landed saves (futures
  whose result is ``"saved"``; ``saves_cold`` must agree) per second of it; dropped and
  failed saves; demotions (per second) and evictions, from ``erllama.cache.counters``;
* ``lost``: landed saves that are not available rows of the index after the flush (with
  the disk quota large enough for all, a landed row should never be lost);
* ``idx=files``: after the flush, the available rows of the index per tier against the
  ``*.kvc`` files in that tier's directory (same keys) and, for ``ram``, the rows the
  :class:`RamTier` holds; a mismatch is re-checked for up to 2 s (deletions may lag) and
  printed as ``MISMATCH`` if it stays; leftover ``*.tmp`` files are counted too;
* ``reopen``: after ``close()`` (which persists the ``ram`` rows), the ``*.kvc`` files
  against the rows available before the close and the rows a new store started on the
  same directories finds.

Only APIs that predate the cache's stats() are used, so the script runs on older trees
(``PYTHONPATH=<tree> python bench/cache_burst.py``); where ``CacheStore.stats()`` exists its
per-tier rows and charged bytes are printed too. Every temporary directory is removed at
the end, also on Ctrl-C or SIGTERM. The last output line is a JSON object for scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from cpuload import LoadMeter
from report import default_disk_root, fmt, med

try:
    import erllama
except ModuleNotFoundError:  # run from a checkout without an install: use the tree above
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import erllama

from erllama.cache import kvc
from erllama.cache.counters import counters
from erllama.cache.key import KeyMeta
from erllama.cache.store import CacheConfig, CacheStore
from erllama.cache.tiers import encode_row

KM = KeyMeta(b"f" * 32, 7, b"c" * 32)
TIERS = ("ram", "ram_file", "disk")
FILE_TIERS = ("ram_file", "disk")
VARIANTS = ("nowait", "wait")
ROW_SUFFIX = ".kvc"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--threads", type=int, default=4, help="threads saving at once")
    p.add_argument("--saves-per-thread", type=int, default=20, help="saves each thread submits")
    p.add_argument("--reps", type=int, default=5, help="measured repetitions (after one warm-up)")
    p.add_argument("--row-kb", type=float, default=300, help="KV payload per row, kB (10^3 bytes)")
    p.add_argument("--logits-bytes", type=int, default=256, help="float32 logits per row, bytes")
    p.add_argument("--tokens", type=int, default=32, help="tokens per row (all distinct rows)")
    p.add_argument("--tier-rows", type=int, default=4, help="rows the ram and ram_file quotas hold")
    p.add_argument("--writers", type=int, default=4, help="CacheConfig.writer_max_concurrent")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--shm-root", default="/dev/shm", help="where the ram_file tier's temp dir goes")
    p.add_argument("--disk-root", default=str(default_disk_root()),
                   help="where the disk tier's temp dir goes (the work filesystem)")
    p.add_argument("--label", default="", help="free text copied into the JSON line")
    args = p.parse_args(argv)
    if min(args.threads, args.saves_per_thread, args.reps, args.tier_rows, args.writers) < 1:
        p.error("--threads, --saves-per-thread, --reps, --tier-rows and --writers must be >= 1")
    if args.row_kb <= 0 or args.logits_bytes < 4 or args.logits_bytes % 4 or args.tokens < 4:
        p.error("--row-kb must be > 0, --logits-bytes a multiple of 4 (>= 4), --tokens >= 4")
    return args


def row_meta(tokens: list[int]) -> kvc.RowMeta:
    """The meta of one opaque row (as in tests/test_cache_store.py)."""
    return kvc.RowMeta(fingerprint=KM.fingerprint, quant=KM.quant, ctx_params_hash=KM.ctx_params_hash,
                       tokens=tokens, save_reason=kvc.SaveReason.COLD)


def source_digest() -> str:
    """sha256 (12 hex) of the measured tree's erllama/cache/*.py: which code ran, without git."""
    h = hashlib.sha256()
    for path in sorted((Path(erllama.__file__).parent / "cache").glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def store_stats(store: CacheStore) -> dict | None:
    """``store.stats()`` where it is a method (older trees: ``store.stats`` is the counters)."""
    fn = getattr(store, "stats", None)
    if not callable(fn):
        return None
    try:
        s = fn()
    except Exception as exc:  # the API is young: report, do not fail the bench
        return {"error": repr(exc)}
    return s if isinstance(s, dict) else None


def file_keys(directory: Path) -> tuple[set[str], int]:
    """Hex keys of the ``*.kvc`` row files in ``directory`` and the count of other ``*.tmp``
    files (not the FileTier's one-byte ctime probe)."""
    keys, tmps = set(), 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if entry.name.endswith(ROW_SUFFIX):
                keys.add(entry.name[: -len(ROW_SUFFIX)])
            elif entry.name.endswith(".tmp") and "probe" not in entry.name:
                tmps += 1
    return keys, tmps


def available(row) -> bool:
    status = getattr(row, "status", None)
    return status is None or getattr(status, "name", str(status)).upper() == "AVAILABLE"


def index_keys(store: CacheStore) -> tuple[dict[str, set[str]], int]:
    """Hex keys of the available index rows per tier, and the count of rows in another status."""
    out: dict[str, set[str]] = {t: set() for t in TIERS}
    other = 0
    for key, row in list(store.index.rows.items()):
        if available(row):
            out.setdefault(row.tier, set()).add(key.hex())
        else:
            other += 1
    return out, other


def check_index_files(store: CacheStore, dirs: dict[str, Path]) -> dict:
    """Available index rows per tier against the tier's files (ram: the RamTier's rows)."""
    idx, pending = index_keys(store)
    res: dict = {"rows": {t: len(idx.get(t, ())) for t in TIERS}, "files": {}, "tmp": 0,
                 "pending": pending, "diff": {}}
    for t in FILE_TIERS:
        keys, tmps = file_keys(dirs[t])
        res["files"][t] = len(keys)
        res["tmp"] += tmps
        only_idx, only_files = idx.get(t, set()) - keys, keys - idx.get(t, set())
        if only_idx or only_files:
            # a file without a row whose key is a row of another tier: a copy left behind by a move
            stale = {u: len(only_files & idx.get(u, set())) for u in TIERS if u != t}
            res["diff"][t] = {"index_only": len(only_idx), "files_only": len(only_files),
                              "files_only_in_other_tier": {u: n for u, n in stale.items() if n}}
    ram = getattr(store.tiers.get("ram"), "_rows", None)
    if ram is not None:
        ram_keys = {k.hex() for k in list(ram)}
        res["files"]["ram"] = len(ram_keys)
        only_idx, only_ram = len(idx.get("ram", set()) - ram_keys), len(ram_keys - idx.get("ram", set()))
        if only_idx or only_ram:
            res["diff"]["ram"] = {"index_only": only_idx, "files_only": only_ram}
    res["ok"] = not res["diff"] and not res["tmp"] and not pending
    return res


def burst(store: CacheStore, variant: str, args: argparse.Namespace, rep: int, kv: bytes,
          logits: np.ndarray) -> dict:
    """``threads`` threads submit their saves at once; then flush. Returns the raw numbers."""
    n_threads, per = args.threads, args.saves_per_thread
    filler = list(range(100, 100 + args.tokens - 4))
    metas = [[row_meta([VARIANTS.index(variant) + 1, rep + 1, th + 1, i + 1, *filler]) for i in range(per)]
             for th in range(n_threads)]
    futs: list[list] = [[] for _ in range(n_threads)]
    none_returns = [0] * n_threads
    submit_errors: list[str] = []
    wait = variant == "wait"
    start = threading.Barrier(n_threads + 1)
    done_at = [0.0] * n_threads

    def worker(th: int) -> None:
        start.wait()
        for meta in metas[th]:
            try:
                f = store.save(meta, logits, kv, tier="ram", wait=wait)
            except Exception as exc:
                submit_errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if f is None:
                none_returns[th] += 1
            else:
                futs[th].append(f)
        done_at[th] = time.perf_counter()

    threads = [threading.Thread(target=worker, args=(th,), name=f"burst-{th}", daemon=True)
               for th in range(n_threads)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    submitted = max(done_at) - t0
    flushed = store.flush(60.0)
    wall = time.perf_counter() - t0
    results: dict[str, int] = {}
    for f in (f for fs in futs for f in fs):
        try:
            r = f.result(timeout=30)
        except Exception as exc:
            r = f"error:{type(exc).__name__}"
        results[r] = results.get(r, 0) + 1
    return {"wall_s": wall, "submit_s": submitted, "flushed": flushed, "results": results,
            "none_returns": sum(none_returns), "submit_errors": submit_errors}


def one_run(variant: str, args: argparse.Namespace, rep: int, kv: bytes, logits: np.ndarray,
            row_size: int, tmp_dirs: list[Path], open_stores: list) -> dict:
    """A fresh store on fresh directories, one burst, the checks, close, reopen, clean up."""
    shm = Path(tempfile.mkdtemp(prefix="erllama-burst-", dir=args.shm_root))
    tmp_dirs.append(shm)
    disk_root = Path(args.disk_root)
    disk_root.mkdir(parents=True, exist_ok=True)
    disk = Path(tempfile.mkdtemp(prefix="erllama-burst-", dir=disk_root))
    tmp_dirs.append(disk)
    dirs = {"ram_file": shm / "rows", "disk": disk / "rows"}
    total = args.threads * args.saves_per_thread
    quota = args.tier_rows * row_size + row_size // 2  # room for tier_rows rows, not one more
    cfg = CacheConfig(ram_quota=quota, ram_file_dir=str(dirs["ram_file"]), ram_file_quota=quota,
                      disk_dir=str(dirs["disk"]), disk_quota=2 * total * row_size + (1 << 20),
                      writer_max_concurrent=args.writers)
    try:
        counters.reset()
        store = CacheStore.start(cfg)
        open_stores.append(store)
        with LoadMeter() as load:
            b = burst(store, variant, args, rep, kv, logits)
        c = counters.snapshot()
        check = check_index_files(store, dirs)
        settle_s = 0.0
        if not check["ok"]:  # file deletions may lag the index: look again for up to 2 s
            t_s = time.perf_counter()
            while not check["ok"] and time.perf_counter() - t_s < 2.0:
                time.sleep(0.05)
                check = check_index_files(store, dirs)
            settle_s = time.perf_counter() - t_s
        stats = store_stats(store)
        rows_before = sum(check["rows"].values())
        t_c = time.perf_counter()
        store.close()
        close_s = time.perf_counter() - t_c
        open_stores.remove(store)
        after_close = {t: len(file_keys(dirs[t])[0]) for t in FILE_TIERS}
        re_store = CacheStore.start(cfg)
        open_stores.append(re_store)
        re_idx, _ = index_keys(re_store)
        re_rows = {t: len(re_idx.get(t, ())) for t in TIERS}
        re_store.close(persist=False)
        open_stores.remove(re_store)
    finally:
        for s in list(open_stores):  # interrupted: stop the store before its directories go
            with contextlib.suppress(Exception):
                s.close(timeout=5.0, persist=False)
            open_stores.remove(s)
        for d in (shm, disk):
            shutil.rmtree(d, ignore_errors=True)
            tmp_dirs.remove(d)
    landed = b["results"].get("saved", 0)
    files_after = sum(after_close.values())
    reopen_ok = files_after == rows_before and sum(re_rows.values()) == files_after
    return {
        "variant": variant, "rep": rep, "wall_s": b["wall_s"], "submit_s": b["submit_s"],
        "flushed": b["flushed"], "landed": landed, "saves_per_s": landed / b["wall_s"],
        "results": b["results"], "none_returns": b["none_returns"], "submit_errors": len(b["submit_errors"]),
        "submit_error_kinds": sorted(set(b["submit_errors"]))[:3],
        "saves_cold": c["saves_cold"], "dropped": c["saves_dropped"], "failed": c["saves_failed"],
        "demotions": c["demotions"], "demotions_per_s": c["demotions"] / b["wall_s"],
        "evictions": c["evictions"], "duplicates": c["duplicate_dropped"],
        "spilled": c.get("saves_spilled"), "room_waits": c.get("room_waits"),
        "lost": landed - rows_before, "index_rows": check["rows"], "tier_files": check["files"],
        "tmp_files": check["tmp"], "pending_rows": check["pending"], "diff": check["diff"],
        "idx_files_ok": check["ok"], "settle_s": settle_s, "close_s": close_s,
        "files_after_close": after_close, "reopen_rows": re_rows, "reopen_ok": reopen_ok,
        "stats": stats, "other_cpu": None if load.other is None else round(load.other, 2),
    }


def check_cell(r: dict) -> str:
    if r["idx_files_ok"]:
        return "ok" if r["settle_s"] == 0 else f"ok+{r['settle_s'] * 1e3:.0f}ms"
    return "MISMATCH"


def run_line(r: dict, tag: str) -> str:
    other = "-" if r["other_cpu"] is None else f"{r['other_cpu']:.2f}"
    rows = "/".join(str(r["index_rows"][t]) for t in TIERS)
    return (f"{r['variant']:<7}{tag:>5} {r['wall_s']:>7.3f} {r['submit_s']:>7.3f} {r['landed']:>6} "
            f"{r['saves_per_s']:>8.1f} {r['dropped']:>7} {r['submit_errors']:>6} {r['failed']:>6} {r['demotions']:>6} "
            f"{r['demotions_per_s']:>8.1f} {r['evictions']:>6} {r['lost']:>5} {rows:>10} "
            f"{check_cell(r):>10} {'ok' if r['reopen_ok'] else 'MISMATCH':>8} {r['close_s']:>6.2f} {other:>6}")


HEADER = (f"{'variant':<7}{'rep':>5} {'wall s':>7} {'subm s':>7} {'landed':>6} {'saves/s':>8} {'dropped':>7} "
          f"{'raised':>6} {'failed':>6} {'demot':>6} {'demot/s':>8} {'evict':>6} {'lost':>5} {'rows r/f/d':>10} "
          f"{'idx=files':>10} {'reopen':>8} {'close':>6} {'other':>6}")


def describe_problems(r: dict) -> list[str]:
    """Lines explaining a run's oddities (mismatches, errors, disagreeing counters)."""
    out = []
    tag = f"  {r['variant']} rep {r['rep']}:"
    if not r["idx_files_ok"]:
        out.append(f"{tag} index != files: index rows {r['index_rows']}, files {r['tier_files']}, "
                   f"differences {r['diff']}, tmp files {r['tmp_files']}, rows not available {r['pending_rows']}")
    if not r["reopen_ok"]:
        out.append(f"{tag} after close: files {r['files_after_close']} (rows before close "
                   f"{sum(r['index_rows'].values())}), a new store finds {r['reopen_rows']}")
    if r["saves_cold"] != r["landed"]:
        out.append(f"{tag} saves_cold {r['saves_cold']} != futures 'saved' {r['landed']}")
    if r["dropped"] != r["none_returns"]:
        out.append(f"{tag} saves_dropped {r['dropped']} != None returns {r['none_returns']}")
    other = {k: v for k, v in r["results"].items() if k != "saved"}
    if other or r["submit_errors"]:
        out.append(f"{tag} future results besides 'saved': {other}; save() raised {r['submit_errors']} times "
                   f"{r['submit_error_kinds']}")
    if not r["flushed"]:
        out.append(f"{tag} flush() timed out")
    return out


def stats_lines(s: dict) -> list[str]:
    if "error" in s:
        return [f"  stats() raised {s['error']}"]
    out = []
    for t, e in (s.get("tiers") or {}).items():
        ident = None
        keys = ("adopted", "saves", "moves_in", "moves_out", "evictions", "removed")
        if all(k in e for k in keys) and "rows" in e:
            ident = e["rows"] == e["adopted"] + e["saves"] + e["moves_in"] - e["moves_out"] - e["evictions"] \
                - e["removed"]
        flows = " ".join(f"{k} {e[k]}" for k in ("saves", "moves_in", "moves_out", "evictions") if k in e)
        out.append(f"  {t:<9} rows {e.get('rows')}, bytes {e.get('bytes')}, charged {e.get('charged')} of "
                   f"quota {e.get('quota')}; {flows}"
                   + ("" if ident is None else f"; identity {'ok' if ident else 'BROKEN'}"))
    if "writer" in s:
        out.append(f"  writer {s['writer']}; reservations {s.get('reservations')}")
    return out


def summarize(runs: list[dict], variant: str) -> dict:
    rs = [r for r in runs if r["variant"] == variant]
    keys = ("wall_s", "submit_s", "landed", "saves_per_s", "dropped", "submit_errors", "failed", "demotions",
            "demotions_per_s",
            "evictions", "lost", "close_s")
    out = {k: dict(zip(("median", "min", "max"), med([r[k] for r in rs]))) for k in keys}
    out["idx_files_mismatch"] = sum(not r["idx_files_ok"] for r in rs)
    out["reopen_mismatch"] = sum(not r["reopen_ok"] for r in rs)
    out["runs"] = len(rs)
    return out


def run(args: argparse.Namespace, tmp_dirs: list[Path], open_stores: list) -> dict:
    kv = np.random.default_rng(0).bytes(int(args.row_kb * 1000))
    logits = np.arange(args.logits_bytes // 4, dtype=np.float32)
    row_size = encode_row(row_meta(list(range(args.tokens))), logits, kv).size
    print(f"cache_burst  erllama {erllama.__version__} from {Path(erllama.__file__).parent.parent} "
          f"(erllama/cache sha256 {source_digest()}), Python {platform.python_version()}, "
          f"{len(os.sched_getaffinity(0))} cpus, "
          f"stats() {'yes' if callable(getattr(CacheStore, 'stats', None)) else 'no'}")
    print(f"burst        {args.threads} threads x {args.saves_per_thread} saves, rows of {args.row_kb:g} kB KV + "
          f"{args.logits_bytes} B logits + {args.tokens} tokens = {row_size} B; ram and ram_file quotas "
          f"{args.tier_rows} rows each, disk everything; {args.writers} writers; {args.reps} reps after 1 warm-up",
          flush=True)
    print()
    print(HEADER)
    runs, warm = [], []
    t_start = time.perf_counter()
    for rep in range(-1, args.reps):
        order = args.variants if rep % 2 else args.variants[::-1]
        for v in order:
            r = one_run(v, args, rep, kv, logits, row_size, tmp_dirs, open_stores)
            (warm if rep < 0 else runs).append(r)
            print(run_line(r, "warm" if rep < 0 else str(rep + 1)), flush=True)
    bench_s = time.perf_counter() - t_start
    return {"bench": "cache_burst", "label": args.label, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "erllama_dir": str(Path(erllama.__file__).parent.parent), "cache_sha256": source_digest(),
            "has_stats": callable(getattr(CacheStore, "stats", None)),
            "cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "threads": args.threads, "saves_per_thread": args.saves_per_thread, "reps": args.reps,
            "row_bytes": row_size, "tier_rows": args.tier_rows, "writers": args.writers,
            "variants": {v: summarize(runs, v) for v in args.variants},
            "runs": runs, "warmup": warm, "seconds": round(bench_s, 1)}


def report(res: dict) -> None:
    print("(rows r/f/d: available index rows in ram/ram_file/disk after the flush; lost: landed - those rows;\n"
          " raised: save() raised instead of returning a future or None; close: s to close();"
          " other: cores used by other processes)")
    problems = [line for r in res["warmup"] + res["runs"] for line in describe_problems(r)]
    if problems:
        print()
        print("Oddities")
        for line in problems:
            print(line)
    print()
    print(f"Medians [min-max] over {res['reps']} reps")
    print(f"{'variant':<8}{'wall s':>22}{'saves/s':>22}{'dropped':>14}{'raised':>14}{'failed':>10}{'demot/s':>22}"
          f"{'evictions':>14}{'lost':>10}{'idx!=files':>11}{'reopen!=':>9}")
    for v in res["variants"]:
        rs = [r for r in res["runs"] if r["variant"] == v]
        print(f"{v:<8}{fmt([r['wall_s'] for r in rs], '.3f'):>22}{fmt([r['saves_per_s'] for r in rs]):>22}"
              f"{fmt([r['dropped'] for r in rs], '.0f'):>14}{fmt([r['submit_errors'] for r in rs], '.0f'):>14}"
              f"{fmt([r['failed'] for r in rs], '.0f'):>10}"
              f"{fmt([r['demotions_per_s'] for r in rs]):>22}{fmt([r['evictions'] for r in rs], '.0f'):>14}"
              f"{fmt([r['lost'] for r in rs], '.0f'):>10}"
              f"{res['variants'][v]['idx_files_mismatch']:>6}/{len(rs):<4}"
              f"{res['variants'][v]['reopen_mismatch']:>4}/{len(rs)}")
    last = [r for r in res["runs"] if r["stats"]]
    if last:
        print()
        print("CacheStore.stats() after the flush, last rep of each variant")
        for v in res["variants"]:
            rs = [r for r in last if r["variant"] == v]
            if rs:
                print(f" {v}:")
                for line in stats_lines(rs[-1]["stats"]):
                    print(line)
    for r in res["runs"] + res["warmup"]:  # keep the JSON line short: stats only in the table
        r.pop("stats", None)
    print(f"({res['seconds']} s)")
    print(json.dumps(res, separators=(",", ":")))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp_dirs: list[Path] = []
    open_stores: list = []

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        res = run(args, tmp_dirs, open_stores)
    finally:
        for s in list(open_stores):
            with contextlib.suppress(Exception):
                s.close(timeout=5.0, persist=False)
        for d in tmp_dirs:
            shutil.rmtree(d, ignore_errors=True)
        signal.signal(signal.SIGTERM, old)
    report(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
