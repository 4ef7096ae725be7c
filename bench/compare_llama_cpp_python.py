"""erllama against llama-cpp-python 0.3.36 (the same llama.cpp commit) on the same prompts
(issue #5, acceptance 7).

llama-cpp-python is installed by this script into its own virtual environment outside the
repository (default ``~/.cache/erllama-bench/llcp-venv``, override with ``--venv`` or
``$ERLLAMA_BENCH_VENV``), built from source with ``CMAKE_ARGS="-DGGML_OPENMP=OFF
-DGGML_NATIVE=ON"`` like our binding (``setup.py``); the first run compiles llama.cpp for
several minutes, later runs reuse the venv. The sdist comes from erllama's build cache when
it is there (sha256-checked), else from PyPI. It runs in a subprocess (a small driver,
``DRIVER`` below, talking JSON lines over stdin/stdout), so both libraries never share a
process; every measurement alternates between the two, llama-cpp-python first in odd
rounds, erllama first in even ones.

Both get the same token ids, greedy sampling (``temperature=0``), 2 threads, and the same
context parameters: ``n_batch`` = ``n_ubatch`` = 512, flash attention on (erllama's
``"auto"`` enables it on this CPU; llama-cpp-python defaults it off, so it is set),
``swa_full=False`` (erllama's default), f16 KV. Measured:

* ``cold TTFT``: a fresh ~2k-token prompt (unique per round), time from the call to the
  first streamed token. erllama: ``infer(..., max_tokens=1)`` on a model with ``n_ctx``
  4096, one sequence; llama-cpp-python: ``create_completion(..., stream=True)`` on a
  ``Llama`` with ``n_ctx`` 4096 and a ``LlamaRAMCache`` set with ``llm.set_cache``.
* ``warm TTFT``: the same prompt again. llama-cpp-python: ``llm.reset()`` first, so that
  it cannot reuse the prompt still in its context, and its RAM cache restores the whole
  context state saved after the cold call, then re-decodes the last prompt token;
  erllama: its KV cache (an ``exact`` hit: the row's KV plus its stored logits, no
  decode). Also reported: llama-cpp-python's reuse of the prompt still in its context
  (no ``reset``: it samples from the logits it still has).
* ``warm TTFT after an answer``: a fresh prompt first completed with 32 tokens, then sent
  again with ``max_tokens=1`` (the usual case: the first request generated something).
  llama-cpp-python restores the state of prompt + answer and truncates it; erllama has the
  prompt's own row (a cold prefill saves the trimmed prefix and then the whole prompt with
  its logits), the hit kind and restored length are printed. llama-cpp-python's
  ``LlamaState`` also carries a copy of its ``scores`` array (``n_batch`` x ``n_vocab``
  float32 = 512 MiB for Gemma's 262,144-token vocabulary) that ``save_state`` and
  ``load_state`` copy: that, not the KV, is most of its warm time here.
* ``generation``: a short prompt, 128 tokens streamed; (n - 1) / (last token - first token).
  llama-cpp-python without a cache here.
* ``4 clients``: four different short prompts, 128 tokens each, submitted together.
  llama-cpp-python has no batching: four threads share one ``Llama`` behind a lock, as its
  server does; erllama: a model with ``n_seq_max=4`` (1024 tokens per sequence) decoding
  the four in one batch. Wall time from the start to the last token, aggregate tokens/s,
  each client's TTFT.

Greedy outputs are compared wherever both ran the same token ids (first tokens, the
128-token texts, the four clients' texts) and every difference is printed. Run
``python bench/compare_llama_cpp_python.py`` (``--help`` for options); the last line is a
JSON object with every value.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cpuload
from compare_builds import wait_idle
from report import fmt, git_rev
from streams import timed_stream, timed_streams

try:
    import erllama
except ImportError:  # run from a checkout without an installed erllama
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import erllama

from erllama.default_model import default_model_path

LLCP_VERSION = "0.3.36"
LLCP_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"  # BUILD.md
LLCP_CMAKE_ARGS = "-DGGML_OPENMP=OFF -DGGML_NATIVE=ON -DLLAMA_CURL=OFF"
DEFAULT_VENV = Path(os.environ.get("ERLLAMA_BENCH_VENV", Path.home() / ".cache" / "erllama-bench" / "llcp-venv"))

SHORT_PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived",
    "The history of the printing press begins",
    "Here is a detailed explanation of how a steam engine works:",
    "Chapter 1\n\nThe rain had not stopped for three days when",
    "The following essay discusses the causes of the French Revolution.",
]
NOTES = (
    "The supervision tree restarts a failed worker without disturbing its siblings. "
    "Each model lives in its own actor, and the cache keeps the prompt state of every "
    "conversation so that a repeated system prompt costs milliseconds instead of seconds. "
)

# The llama-cpp-python side: JSON commands on stdin, one JSON result per line on stdout.
DRIVER = r'''
import json, os, sys, threading, time
import llama_cpp
from llama_cpp import Llama, LlamaRAMCache

llm = None

def stream(prompt, max_tokens, t0=None):
    t0 = time.perf_counter() if t0 is None else t0
    stamps, parts, finish = [], [], None
    for ch in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, stream=True):
        c = ch["choices"][0]
        if c["text"]:
            stamps.append(time.perf_counter()); parts.append(c["text"])
        finish = c.get("finish_reason") or finish
    t1 = time.perf_counter()
    return {"ttft_ms": (stamps[0] - t0) * 1e3 if stamps else None, "text": "".join(parts), "chunks": len(stamps),
            "gen_tps": (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None,
            "first": stamps[0] if stamps else None, "last": stamps[-1] if stamps else None,
            "t0": t0, "t1": t1, "finish": finish}

for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd["op"]
    with LoadMeter() as load:
        if op == "load":
            t = time.perf_counter()
            llm = Llama(cmd["path"], n_ctx=cmd["n_ctx"], n_batch=512, n_ubatch=512, n_threads=cmd["threads"],
                        n_threads_batch=cmd["threads"], flash_attn=True, swa_full=False, verbose=False)
            out = {"version": llama_cpp.__version__, "load_s": time.perf_counter() - t,
                   "system_info": llama_cpp.llama_print_system_info().decode()}
        elif op == "cache":
            llm.set_cache(LlamaRAMCache(capacity_bytes=4 << 30) if cmd["on"] else None)
            out = {}
        elif op == "complete":
            if cmd.get("reset"):
                llm.reset()
            out = stream(cmd["prompt"], cmd["max_tokens"])
        elif op == "clients":
            lock = threading.Lock()
            res = [None] * len(cmd["prompts"])
            t0 = time.perf_counter()
            def client(i, p):
                with lock:
                    res[i] = stream(p, cmd["max_tokens"], t0)
            ths = [threading.Thread(target=client, args=(i, p)) for i, p in enumerate(cmd["prompts"])]
            for th in ths: th.start()
            for th in ths: th.join()
            out = {"clients": res, "wall_s": max(r["last"] for r in res) - t0}
        elif op == "quit":
            break
        else:
            out = {"error": f"unknown op {op}"}
    out["other"] = load.other
    print(json.dumps(out), flush=True)
'''


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="GGUF file (default: Gemma 3 270M, erllama.default_model.default_model_path())")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads (both)")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds (after one warm-up round)")
    p.add_argument("--prompt-tokens", type=int, default=2048, help="length of the TTFT prompts")
    p.add_argument("--tokens", type=int, default=128, help="tokens generated in the generation and client tests")
    p.add_argument("--answer-tokens", type=int, default=32, help="answer length before the 'warm after an answer' test")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients")
    p.add_argument("--max-other", type=float, default=0.3,
                   help="repeat a round during which other processes used more cores than this")
    p.add_argument("--max-dropped", type=int, default=4, help="disturbed rounds repeated at most")
    p.add_argument("--idle-wait", type=float, default=60.0,
                   help="seconds to wait for other load to stop before each round")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="llama-cpp-python's virtual environment")
    p.add_argument("--install-only", action="store_true", help="create the venv and exit")
    args = p.parse_args(argv)
    if args.clients > len(SHORT_PROMPTS) or args.rounds < 1:
        p.error(f"--rounds >= 1 and --clients <= {len(SHORT_PROMPTS)}")
    return args


# ---- the llama-cpp-python environment ------------------------------------------------------------

def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def venv_ok(venv: Path) -> bool:
    py = venv_python(venv)
    if not py.exists():
        return False
    r = subprocess.run([str(py), "-c", f"import llama_cpp, sys; sys.exit(llama_cpp.__version__ != {LLCP_VERSION!r})"],
                       capture_output=True)
    return r.returncode == 0


def ensure_venv(venv: Path) -> Path:
    """Create the venv and build llama-cpp-python into it once; reuse it afterwards."""
    if venv_ok(venv):
        return venv_python(venv)
    print(f"installing llama-cpp-python=={LLCP_VERSION} into {venv} (compiles llama.cpp: several minutes "
          f"on 2 cores; log in {venv.parent / 'install.log'})", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    if not venv_python(venv).exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv_python(venv))
    spec = f"llama-cpp-python=={LLCP_VERSION}"
    cached = Path.home() / ".cache" / "erllama-build" / "src" / f"llama_cpp_python-{LLCP_VERSION}.tar.gz"
    if cached.exists() and hashlib.sha256(cached.read_bytes()).hexdigest() == LLCP_SDIST_SHA256:
        spec = str(cached)  # erllama's build cache already holds the sdist
    env = dict(os.environ, CMAKE_ARGS=LLCP_CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    with open(venv.parent / "install.log", "w") as log:
        r = subprocess.run([py, "-m", "pip", "install", "-v", "--no-binary", "llama-cpp-python", spec],
                           env=env, stdout=log, stderr=subprocess.STDOUT)
    if r.returncode != 0 or not venv_ok(venv):
        raise SystemExit(f"llama-cpp-python install failed; see {venv.parent / 'install.log'}")
    return venv_python(venv)


class Driver:
    """The llama-cpp-python subprocess."""

    def __init__(self, python: Path) -> None:
        self.dir = tempfile.mkdtemp(prefix="erllama-llcp-")
        script = Path(self.dir) / "driver.py"
        script.write_text(Path(cpuload.__file__).read_text() + DRIVER)  # LoadMeter, then the driver
        self.err = open(Path(self.dir) / "stderr.log", "w+")
        self.proc = subprocess.Popen([str(python), str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True, bufsize=1)

    def __call__(self, op: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.err.seek(0)
            raise RuntimeError("llama-cpp-python driver died:\n" + self.err.read()[-3000:])
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(out["error"])
        return out

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
        self.err.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---- the erllama side -------------------------------------------------------------------------------

def er_stream(mid: str, prompt: list[int], max_tokens: int) -> dict:
    run, other = timed_stream(mid, prompt, max_tokens)
    done = run.completion
    return {"ttft_ms": run.ttft_ms, "text": run.text, "tokens": len(run.ids),
            "gen_tps": (len(run.stamps) - 1) / (run.stamps[-1] - run.stamps[0]) if len(run.stamps) > 1 else None,
            "hit": done.cache_hit, "read": done.cache_delta.read, "other": other}


def er_clients(mid: str, prompts: list[list[int]], max_tokens: int) -> dict:
    runs, other = timed_streams(mid, prompts, max_tokens)
    t0 = runs[0].t0
    return {"clients": [{"ttft_ms": r.ttft_ms, "tokens": len(r.stamps), "text": r.text} for r in runs],
            "wall_s": max(r.stamps[-1] for r in runs) - t0, "other": other}


# ---- the run -----------------------------------------------------------------------------------------

def long_prompt(mid: str, tag: str, n: int) -> list[int]:
    text = f"{tag}. Summarise the following notes.\n" + NOTES * (n // 40 + 2)
    return erllama.tokenize(mid, text)[:n]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    python = ensure_venv(args.venv)
    if args.install_only:
        print(f"llama-cpp-python {LLCP_VERSION} ready: {python}")
        return 0
    path = str(Path(args.model) if args.model else default_model_path())
    n_ctx = max(4096, args.prompt_tokens + args.answer_tokens + 64)
    root = Path(tempfile.mkdtemp(prefix="erllama-vs-llcp-"))
    rounds: list[dict] = []
    mismatches: list[str] = []
    dropped: list[float] = []
    drv = Driver(python)
    info: dict = {}
    try:
        info = drv("load", path=path, n_ctx=n_ctx, threads=args.threads)
        print(f"llama-cpp-python {info['version']} loaded in {info['load_s']:.2f} s ({python})")
        print(f"model {path}, {args.threads} threads, n_ctx {n_ctx}, {args.rounds} rounds + 1 warm-up, "
              f"erllama {git_rev()}", flush=True)
        with erllama.running(cache_dir=str(root), ram_file_dir=str(root / "shm")):
            opts = dict(n_batch=512, n_ubatch=512, n_threads=args.threads, flash_attn="auto", isolation="none")
            m1 = erllama.load_model(path, model_id="cmp-1", n_ctx=n_ctx, n_seq_max=1, **opts)
            m4 = erllama.load_model(path, model_id="cmp-4", n_ctx=1024 * args.clients, n_seq_max=args.clients, **opts)
            flush = erllama.cache.current().flush
            short = [erllama.tokenize(m1, p) for p in SHORT_PROMPTS]
            rnd = attempt = 0
            while rnd <= args.rounds:
                attempt += 1
                label = "warm-up" if rnd == 0 else f"round {rnd}"
                idle = wait_idle(args.max_other, args.idle_wait)
                llcp_first = rnd % 2 == 1
                # fresh long prompts on every attempt: nothing of them may be cached anywhere
                p_ttft = long_prompt(m1, f"Run {attempt} A", args.prompt_tokens)
                p_ans = long_prompt(m1, f"Run {attempt} B", args.prompt_tokens)
                gen_prompt = short[rnd % len(short)]
                client_prompts = [short[(rnd + i) % len(short)] for i in range(args.clients)]

                def llcp_ttft() -> dict:
                    drv("cache", on=True)  # a fresh RAM cache each round
                    cold = drv("complete", prompt=p_ttft, max_tokens=1, reset=True)
                    warm = drv("complete", prompt=p_ttft, max_tokens=1, reset=True)
                    ctx = drv("complete", prompt=p_ttft, max_tokens=1, reset=False)
                    ans = drv("complete", prompt=p_ans, max_tokens=args.answer_tokens, reset=True)
                    after = drv("complete", prompt=p_ans, max_tokens=1, reset=True)
                    drv("cache", on=False)
                    return {"cold": cold, "warm": warm, "in_context": ctx, "answer": ans, "after_answer": after}

                def er_ttft() -> dict:
                    cold = er_stream(m1, p_ttft, 1)
                    flush()
                    warm = er_stream(m1, p_ttft, 1)
                    ans = er_stream(m1, p_ans, args.answer_tokens)
                    flush()
                    after = er_stream(m1, p_ans, 1)
                    return {"cold": cold, "warm": warm, "answer": ans, "after_answer": after}

                res: dict = {"llcp": {}, "erllama": {}}
                steps = [("ttft", llcp_ttft, er_ttft),
                         ("gen", lambda: drv("complete", prompt=gen_prompt, max_tokens=args.tokens, reset=True),
                          lambda: er_stream(m1, gen_prompt, args.tokens)),
                         ("clients", lambda: drv("clients", prompts=client_prompts, max_tokens=args.tokens),
                          lambda: er_clients(m4, client_prompts, args.tokens))]
                for name, lfn, efn in steps:
                    pair = [("llcp", lfn), ("erllama", efn)]
                    for who, fn in (pair if llcp_first else pair[::-1]):
                        res[who][name] = fn()

                L, E = res["llcp"], res["erllama"]
                # greedy outputs that must agree (same token ids in, temperature 0)
                checks = [("cold first token", L["ttft"]["cold"]["text"], E["ttft"]["cold"]["text"]),
                          ("warm first token", L["ttft"]["warm"]["text"], E["ttft"]["warm"]["text"]),
                          ("after-answer first token", L["ttft"]["after_answer"]["text"],
                           E["ttft"]["after_answer"]["text"]),
                          (f"{args.answer_tokens}-token answer", L["ttft"]["answer"]["text"],
                           E["ttft"]["answer"]["text"]),
                          (f"{args.tokens}-token generation", L["gen"]["text"], E["gen"]["text"])]
                checks += [(f"client {i}", lc["text"], ec["text"]) for i, (lc, ec) in
                           enumerate(zip(L["clients"]["clients"], E["clients"]["clients"]))]
                checks += [("erllama cold vs warm first token", E["ttft"]["cold"]["text"], E["ttft"]["warm"]["text"]),
                           ("llcp cold vs warm first token", L["ttft"]["cold"]["text"], L["ttft"]["warm"]["text"])]
                round_mismatches = []
                for what, a, b in checks:
                    if a != b:
                        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                        round_mismatches.append(f"{label}: {what}: llcp/first {a[max(0, k - 20):k + 40]!r} vs "
                                                f"erllama/second {b[max(0, k - 20):k + 40]!r} (char {k})")
                row = {
                    "cold_ttft_ms": (L["ttft"]["cold"]["ttft_ms"], E["ttft"]["cold"]["ttft_ms"]),
                    "warm_ttft_ms": (L["ttft"]["warm"]["ttft_ms"], E["ttft"]["warm"]["ttft_ms"]),
                    "after_answer_ttft_ms": (L["ttft"]["after_answer"]["ttft_ms"],
                                             E["ttft"]["after_answer"]["ttft_ms"]),
                    "in_context_ttft_ms": (L["ttft"]["in_context"]["ttft_ms"], None),
                    "gen_tps": (L["gen"]["gen_tps"], E["gen"]["gen_tps"]),
                    "clients_wall_s": (L["clients"]["wall_s"], E["clients"]["wall_s"]),
                    "clients_agg_tps": (sum(c["chunks"] for c in L["clients"]["clients"]) / L["clients"]["wall_s"],
                                        sum(c["tokens"] for c in E["clients"]["clients"]) / E["clients"]["wall_s"]),
                    "clients_max_ttft_ms": (max(c["ttft_ms"] for c in L["clients"]["clients"]),
                                            max(c["ttft_ms"] for c in E["clients"]["clients"])),
                    "hits": [E["ttft"][k]["hit"] for k in ("cold", "warm", "after_answer")],
                    "after_answer_read": E["ttft"]["after_answer"]["read"],
                    "gen_tokens": (L["gen"]["chunks"], E["gen"]["tokens"]),
                    "other_max": max(x["other"] or 0 for d in (L["ttft"], E["ttft"]) for x in d.values()),
                    "other_gen": (L["gen"]["other"], E["gen"]["other"]),
                    "other_clients": (L["clients"]["other"], E["clients"]["other"]),
                }
                print(f"{label:8} cold {row['cold_ttft_ms'][0]:7.0f} / {row['cold_ttft_ms'][1]:7.0f} ms  "
                      f"warm {row['warm_ttft_ms'][0]:6.1f} / {row['warm_ttft_ms'][1]:6.1f} ms ({row['hits'][1]})  "
                      f"after answer {row['after_answer_ttft_ms'][0]:6.1f} / {row['after_answer_ttft_ms'][1]:6.1f} ms "
                      f"({row['hits'][2]} {row['after_answer_read']})  gen {row['gen_tps'][0]:5.1f} / "
                      f"{row['gen_tps'][1]:5.1f} t/s  {args.clients} clients {row['clients_wall_s'][0]:5.2f} / "
                      f"{row['clients_wall_s'][1]:5.2f} s   (llcp / erllama; other load <= "
                      f"{max(row['other_max'], *(x or 0 for x in row['other_gen'] + row['other_clients'])):.2f})",
                      flush=True)
                disturbed = max(row["other_max"], *(x or 0 for x in row["other_gen"] + row["other_clients"]))
                if rnd and disturbed > args.max_other and len(dropped) < args.max_dropped:
                    dropped.append(disturbed)
                    print(f"  round disturbed by {disturbed:.2f} cores of other load (idle wait saw {idle:.2f}): "
                          "repeated", flush=True)
                    continue
                mismatches.extend(round_mismatches)
                if rnd:
                    rounds.append(row)
                rnd += 1
    finally:
        drv.close()
        shutil.rmtree(root, ignore_errors=True)

    print()
    print(f"llama-cpp-python {LLCP_VERSION} vs erllama, Gemma, {args.threads} threads; median [min-max] over "
          f"{len(rounds)} rounds; ratio = llama-cpp-python / erllama taken per round (> 1: erllama better for "
          f"times, < 1 for rates)")
    print("| measure | llama-cpp-python | erllama | ratio llcp/erllama |")
    print("|---|---|---|---|")
    lines = [(f"cold TTFT, {args.prompt_tokens}-token prompt (ms)", "cold_ttft_ms", ".0f"),
             ("warm TTFT, same prompt (ms)", "warm_ttft_ms", ".1f"),
             (f"warm TTFT after a {args.answer_tokens}-token answer (ms)", "after_answer_ttft_ms", ".1f"),
             (f"generation, {args.tokens} tokens (tokens/s)", "gen_tps", ".2f"),
             (f"{args.clients} clients x {args.tokens} tokens: wall (s)", "clients_wall_s", ".2f"),
             (f"{args.clients} clients: aggregate tokens/s", "clients_agg_tps", ".2f"),
             (f"{args.clients} clients: slowest client's TTFT (ms)", "clients_max_ttft_ms", ".0f")]
    for title, key, spec in lines:
        print(f"| {title} | {fmt([r[key][0] for r in rounds], spec)} | {fmt([r[key][1] for r in rounds], spec)} | "
              f"{fmt([r[key][0] / r[key][1] for r in rounds], '.2f')} |")
    print(f"| llcp: same prompt still in its context, no cache (ms) | "
          f"{fmt([r['in_context_ttft_ms'][0] for r in rounds], '.1f')} | – | – |")
    print(f"erllama cache hits (cold, warm, after answer): {sorted({tuple(r['hits']) for r in rounds})}; "
          f"restored after the answer: {sorted({r['after_answer_read'] for r in rounds})} tokens")
    print(f"generated tokens (llcp chunks, erllama tokens): {sorted({tuple(r['gen_tokens']) for r in rounds})}")
    print(f"other load: max over TTFT steps {fmt([r['other_max'] for r in rounds], '.2f')} cores")
    if dropped:
        print(f"dropped {len(dropped)} disturbed rounds (other load {', '.join(f'{x:.2f}' for x in dropped)} cores)")
    if mismatches:
        for m in mismatches:
            print("MISMATCH: " + m)
        if any(": client " in m for m in mismatches):
            print("(client texts: erllama decodes the clients' sequences together, llama-cpp-python one at a "
                  "time; llama.cpp's decode of 4 one-token rows is not bit-identical to 4 single-row decodes, "
                  "see bench/throughput.py's batching check)")
    else:
        print("outputs: every greedy output compared was identical")
    print(json.dumps({"bench": "compare_llama_cpp_python", "llcp": LLCP_VERSION, "model": path,
                      "threads": args.threads, "n_ctx": n_ctx, "rounds": rounds, "mismatches": mismatches,
                      "dropped_other": dropped, "git": git_rev(),
                      "llcp_system_info": info.get("system_info"), "python": platform.python_version(),
                      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
