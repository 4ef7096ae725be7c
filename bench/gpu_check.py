"""The device check of issue 16: cold, ram-tier and resident-tier TTFT, state copy times and
save stalls of a llama-shaped synthetic model with every layer on the GPU, in one run.

Writes the model itself (numpy only: no network on the device machine): by default the
3.6B F16 shape of ``../shared/GPU.md`` (28 layers, n_embd 3072, 8 KV heads of 128, n_ff
11264: 112 KiB of KV per token), random weights drawn from one pool. Per prompt length
(``--lengths``, default 1024,4096,16384,32768): a cold run, exact hits from the ram tier
(model ``ram``) and from the resident tier (model ``resident``, ``resident_seqs=2``), the
model actor's time to pack the cold save (``state_get``), the row's size and the ram hit's
effective host-to-device bandwidth; then a stream's tokens/s while another stream's large
state is saved every 16 tokens, split streams against the resident tier
(``bench/save_stall.py``). Exactness is checked: every warm run yields the cold run's tokens.
Writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out``.

``--small`` is the dry run for a machine without a GPU: 2 layers of n_embd 256, short
prompts, the same code path. Run by ``bench/gpu_check.sh`` on the device.
"""

# ruff: noqa: E402  (the path is fixed before the imports, see below)
from __future__ import annotations

import sys
from pathlib import Path

# bench/http.py shadows the standard library's ``http`` package: keep this folder behind it
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

import argparse
import json
import random
import statistics
import subprocess
import tempfile
import time

import numpy as np

try:
    import erllama
except ImportError:  # run from a checkout without an installed erllama
    sys.path.insert(0, str(HERE.parent))
    import erllama
from erllama.testing import ggufwrite as gw
from erllama.testing.tinymodel import tiny_vocab

FULL = {"n_layer": 28, "n_embd": 3072, "n_head": 24, "n_head_kv": 8, "n_ff": 11264}
SMALL = {"n_layer": 2, "n_embd": 256, "n_head": 4, "n_head_kv": 2, "n_ff": 512}


def write_model(path: Path, shape: dict, n_ctx_train: int) -> Path:
    """A llama GGUF of ``shape`` in F16 (norms F32), weights cut from one random pool."""
    tokens, scores, types = tiny_vocab()
    n_vocab, e, layers = len(tokens), shape["n_embd"], shape["n_layer"]
    head = e // shape["n_head"]
    kv = shape["n_head_kv"] * head
    pool = (np.random.default_rng(0).standard_normal(1 << 24) * 0.5).astype(np.float16)
    cursor = [0]

    def w(*np_shape: int) -> gw.TensorSpec:
        n = int(np.prod(np_shape))
        start = cursor[0] % (pool.size - 1)
        cursor[0] += 7919 * 1031
        a = np.resize(np.roll(pool, -start), n) / np.float16(np.sqrt(np_shape[-1]))
        return gw.TensorSpec("", tuple(reversed(np_shape)), a.astype(np.float16).tobytes(), gw.GGML_F16)

    def named(name: str, t: gw.TensorSpec) -> gw.TensorSpec:
        t.name = name
        return t

    def ones(name: str) -> gw.TensorSpec:
        return gw.TensorSpec(name, (e,), np.ones(e, np.float32).tobytes(), gw.GGML_F32)

    kvs = [
        gw.KV("general.architecture", gw.STR, "llama"), gw.KV("general.name", gw.STR, "erllama-gpu-check"),
        gw.KV("llama.context_length", gw.U32, n_ctx_train), gw.KV("llama.embedding_length", gw.U32, e),
        gw.KV("llama.block_count", gw.U32, layers), gw.KV("llama.feed_forward_length", gw.U32, shape["n_ff"]),
        gw.KV("llama.attention.head_count", gw.U32, shape["n_head"]),
        gw.KV("llama.attention.head_count_kv", gw.U32, shape["n_head_kv"]),
        gw.KV("llama.attention.layer_norm_rms_epsilon", gw.F32, 1e-5),
        gw.KV("llama.rope.dimension_count", gw.U32, head), gw.KV("general.file_type", gw.U32, 1),
        gw.KV("tokenizer.ggml.model", gw.STR, "llama"), gw.KV("tokenizer.ggml.tokens", gw.ARR, tokens, gw.STR),
        gw.KV("tokenizer.ggml.scores", gw.ARR, scores, gw.F32),
        gw.KV("tokenizer.ggml.token_type", gw.ARR, types, gw.I32),
        gw.KV("tokenizer.ggml.bos_token_id", gw.U32, 1), gw.KV("tokenizer.ggml.eos_token_id", gw.U32, 2),
        gw.KV("tokenizer.ggml.unknown_token_id", gw.U32, 0), gw.KV("tokenizer.ggml.add_bos_token", gw.BOOL, True),
    ]
    # the output matrix is not tied to the embeddings: tied, greedy output locks onto one token
    tensors = [named("token_embd.weight", w(n_vocab, e)), ones("output_norm.weight"),
               named("output.weight", w(n_vocab, e))]
    for i in range(layers):
        tensors += [ones(f"blk.{i}.attn_norm.weight"), named(f"blk.{i}.attn_q.weight", w(e, e)),
                    named(f"blk.{i}.attn_k.weight", w(kv, e)), named(f"blk.{i}.attn_v.weight", w(kv, e)),
                    named(f"blk.{i}.attn_output.weight", w(e, e)), ones(f"blk.{i}.ffn_norm.weight"),
                    named(f"blk.{i}.ffn_gate.weight", w(shape["n_ff"], e)),
                    named(f"blk.{i}.ffn_up.weight", w(shape["n_ff"], e)),
                    named(f"blk.{i}.ffn_down.weight", w(e, shape["n_ff"]))]
    return gw.write_spec(path, gw.Spec(kvs=kvs, tensors=tensors))


def link_limit_gbs() -> float | None:
    """The host link's nominal bandwidth in GB/s per direction (PCIe gen and width from
    nvidia-smi), None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=pcie.link.gen.max,pcie.link.width.max",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20).stdout
        gen, width = (int(x) for x in out.splitlines()[0].split(","))
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None
    per_lane = {3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}.get(gen)
    return per_lane * width if per_lane else None


def hits(mid: str, prompt: list[int], reps: int, want: tuple[int, ...]) -> tuple[float, set[str]]:
    """Median TTFT of ``reps`` exact hits and the tiers that served them (tokens checked)."""
    ttfts, tiers = [], set()
    for _ in range(reps):
        w = erllama.complete(mid, prompt, max_tokens=4, temperature=0)
        if w.cache_hit != "exact" or w.tokens != want:
            raise AssertionError(f"warm run not exact: {w.cache_hit}, {w.tokens} != {want}")
        ttfts.append(w.stats.ttft_ms)
        tiers.add(str(w.cache_delta.tier))
    return statistics.median(ttfts), tiers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_check_out")
    ap.add_argument("--small", action="store_true", help="dry run without a GPU: a 2-layer model, short prompts")
    ap.add_argument("--lengths", default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--stall-context", type=int, default=None)
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    shape = SMALL if args.small else FULL
    lengths = [int(x) for x in (args.lengths or ("256,1024" if args.small else "1024,4096,16384,32768")).split(",")]
    n_ctx = max(lengths) + 256
    tmp = Path(tempfile.mkdtemp(prefix="erllama-gpu-check-"))
    t0 = time.perf_counter()
    path = write_model(tmp / "model.gguf", shape, n_ctx)
    report: dict = {"shape": shape, "model_bytes": path.stat().st_size, "write_s": time.perf_counter() - t0,
                    "system": erllama.system_info(check=False), "link_gbs": link_limit_gbs(), "rows": []}
    print(f"model {path.stat().st_size / 1e9:.2f} GB written in {report['write_s']:.1f} s; "
          f"link {report['link_gbs']} GB/s", flush=True)
    opts = {"n_ctx": n_ctx, "n_seq_max": 1, "n_batch": 2048, "n_ubatch": 512, "n_gpu_layers": -1,
            "flash_attn": "on", "isolation": "none"}
    rng = random.Random(0)
    with erllama.running(cache_dir=str(tmp / "c"), ram_file_dir=str(tmp / "shm"), ram_quota=96 << 30,
                         ram_file_quota=0, disk_quota=0, policy={"min_tokens": 16, "cold_min_tokens": 16}):
        ram = erllama.load_model(path, model_id="ram", **opts)
        res = erllama.load_model(path, model_id="resident", resident_seqs=2, **opts)
        for n in lengths:
            prompt = [rng.randrange(3, 300) for _ in range(n)]
            c0 = erllama.cache.counters()
            cold = erllama.complete(ram, prompt, max_tokens=4, temperature=0)
            erllama.cache.current().flush(300)
            c1 = erllama.cache.counters()
            saves = max(1, sum(c1[k] - c0[k] for k in ("saves_cold", "saves_finish")))
            ram_ms, ram_tiers = hits(ram, prompt, args.reps, cold.tokens)
            rcold = erllama.complete(res, prompt, max_tokens=4, temperature=0)
            erllama.cache.current().flush(300)
            res_ms, res_tiers = hits(res, prompt, args.reps, cold.tokens)
            row_bytes = max(r.size for r in erllama.cache.current().index.rows.values()
                            if r.n_tokens == n) if n >= 16 else 0
            row = {"tokens": n, "cold_ms": cold.stats.ttft_ms, "ram_hit_ms": ram_ms, "ram_tiers": sorted(ram_tiers),
                   "resident_hit_ms": res_ms, "resident_tiers": sorted(res_tiers),
                   "pack_ms_per_save": (c1["pack_total_ns"] - c0["pack_total_ns"]) / 1e6 / saves,
                   "row_bytes": row_bytes, "ram_hit_gbs": row_bytes / (ram_ms * 1e6) if ram_ms else None,
                   "resident_cold_same_tokens": rcold.tokens == cold.tokens}
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
        erllama.unload(ram)
        erllama.unload(res)
    import save_stall  # bench/save_stall.py: one stream's tokens/s while another's state is saved

    stall_ctx = args.stall_context or (512 if args.small else 16384)
    report["stall"] = save_stall.measure(str(path), {**opts, "n_seq_max": 2, "n_ctx": 2 * (stall_ctx + 1024)},
                                         stall_ctx, 16, 64, token_range=(3, 300))
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    lines = ["| prompt tokens | cold TTFT | warm ram | warm resident | state_get (pack) | row | ram hit GB/s |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['tokens']:,} | {r['cold_ms']:.0f} ms | {r['ram_hit_ms']:.1f} ms | "
                     f"{r['resident_hit_ms']:.1f} ms | {r['pack_ms_per_save']:.0f} ms | "
                     f"{r['row_bytes'] / 1e6:.0f} MB | {(r['ram_hit_gbs'] or 0):.1f} |")
    for layout, runs in report["stall"].items():
        lines.append(f"\n{layout}: A keeps {runs['ratio']:.2f} of its tokens/s while B's {stall_ctx}-token state is "
                     f"saved every 16 tokens ({runs['saves on']['pack_ms_in_window']:.0f} ms in the model actor)")
    lines.append(f"\nlink limit {report['link_gbs']} GB/s; model {report['model_bytes'] / 1e9:.2f} GB")
    (out_dir / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
