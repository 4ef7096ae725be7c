"""Build erllama: fetch the pinned llama.cpp, build it static + PIC, link one Cython module.

Environment:
  ERLLAMA_LLAMA_CPP_DIR  use this llama.cpp tree instead of fetching the pinned sdist
  ERLLAMA_CMAKE_ARGS     extra CMake arguments (shell-quoted), e.g. "-DGGML_CUDA=ON"
  ERLLAMA_LINK_ARGS      extra linker arguments for the extension (e.g. "-lcuda -lcudart")
  ERLLAMA_BUILD_CACHE    where built llama.cpp libraries are cached
                         (default: $XDG_CACHE_HOME/erllama-build or ~/.cache/erllama-build)
  ERLLAMA_AMX            "1" compiles ggml's Intel AMX kernels (off by default: they crash
                         on Q4_K models on some AMX CPUs, llama.cpp#20824)
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEPS = ROOT / "deps"
LLAMA_DIR = DEPS / "llama.cpp"

SDIST_PACKAGE = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_FILE = f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_PREFIX = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/"
SKIP_DIRS = ("models/", "docs/", "tools/ui/", "media/", ".github/", ".devops/")

# ggml's AMX kernels crash (SIGSEGV in ggml_backend_amx_mul_mat) on the first prefill of
# Q4_K_M models on some AMX CPUs (llama.cpp#20824). GGML_NATIVE's -march=native turns them on
# wherever the CPU has AMX, so the default build turns the AMX ISA off again; GCC and Clang
# keep an explicit -mno-* over what -march implies. Every other native feature stays.
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"

BASE_CMAKE_ARGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DCMAKE_POSITION_INDEPENDENT_CODE=ON",
    "-DLLAMA_BUILD_COMMON=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_CURL=OFF",
    "-DGGML_NATIVE=ON",
    # Measured (bench/native_speed.py): ggml's own thread pool decodes from a
    # dedicated non-main thread without the libgomp team penalty.
    "-DGGML_OPENMP=OFF",
]


def log(msg: str) -> None:
    print(f"[erllama-build] {msg}", file=sys.stderr, flush=True)


class BuildError(RuntimeError):
    """A step of the llama.cpp build failed; the message says which and why."""


def cache_root() -> Path:
    env = os.environ.get("ERLLAMA_BUILD_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "erllama-build"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_sdist() -> Path:
    """Return the verified pinned sdist, downloading it into the cache when absent."""
    src_dir = cache_root() / "src"
    src_dir.mkdir(parents=True, exist_ok=True)
    path = src_dir / SDIST_FILE
    if not path.exists():
        log(f"downloading {SDIST_PACKAGE}=={SDIST_VERSION} sdist (llama.cpp source)")
        problems = []
        for how in (_download_with_urllib, _download_with_pip):
            try:
                how(src_dir)
            except Exception as exc:  # noqa: BLE001 - the next way is tried, then all are reported
                problems.append(f"{how.__name__[10:]}: {exc}")
            if path.exists():
                break
        else:
            raise BuildError(
                f"could not download {SDIST_PACKAGE}=={SDIST_VERSION}: " + "; ".join(problems)[-2000:] + "\n"
                "Set ERLLAMA_LLAMA_CPP_DIR to an existing llama.cpp tree to build without it.")
    got = sha256_file(path)
    if got != SDIST_SHA256:
        bad = path.with_suffix(".mismatch")
        path.replace(bad)
        raise BuildError(
            f"sha256 mismatch for {path.name}: expected {SDIST_SHA256}, got {got}; "
            f"the file was moved to {bad}. Refusing to build from an unverified source.")
    return path


def _download_with_pip(dest: Path) -> None:
    """``pip download`` (honours the user's pip configuration: index, proxy, certificates).
    pip is a build requirement, so it is importable inside an isolated build environment too."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", SDIST_PACKAGE,
           f"{SDIST_PACKAGE}=={SDIST_VERSION}", "-d", str(dest)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise BuildError(res.stderr.strip()[-1000:] or f"exit {res.returncode}")


def _download_with_urllib(dest: Path) -> None:
    """The sdist's link from the package index's simple page (PEP 503, which every mirror
    serves; ``$PIP_INDEX_URL`` or PyPI), fetched with the standard library: no pip, and no
    metadata build of the sdist."""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    page = f"{index}/{SDIST_PACKAGE}/"
    with urllib.request.urlopen(page, timeout=60) as r:
        html = r.read().decode("utf-8", "replace")
    links = [urllib.parse.urljoin(page, h.split("#", 1)[0]) for h in re.findall(r'href="([^"]+)"', html)]
    url = next((u for u in links if u.rsplit("/", 1)[-1] == SDIST_FILE), None)
    if url is None:
        raise BuildError(f"{page} lists no {SDIST_FILE}")
    tmp = dest / f".{SDIST_FILE}.{os.getpid()}.part"
    try:
        with urllib.request.urlopen(url, timeout=300) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
        tmp.replace(dest / SDIST_FILE)
    finally:
        tmp.unlink(missing_ok=True)


def extract_llama(sdist: Path) -> None:
    """Extract only vendor/llama.cpp from the sdist into deps/llama.cpp."""
    tmp = DEPS / "llama.cpp.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(sdist) as tf:
        members = []
        for m in tf.getmembers():
            if not m.name.startswith(SDIST_PREFIX):
                continue
            rel = m.name[len(SDIST_PREFIX):]
            if not rel or rel.startswith(SKIP_DIRS):
                continue
            m.name = rel
            members.append(m)
        tf.extractall(tmp, members=members, filter="data")
    (tmp / ".erllama-source").write_text(SDIST_SHA256 + "\n")
    shutil.rmtree(LLAMA_DIR, ignore_errors=True)
    tmp.rename(LLAMA_DIR)


def tree_hash(src: Path) -> str:
    """Hash the parts of a user-supplied llama.cpp tree that affect the build."""
    h = hashlib.sha256()
    roots = ["CMakeLists.txt", "cmake", "include", "src", "ggml"]
    for r in roots:
        p = src / r
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
        for f in files:
            h.update(str(f.relative_to(src)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def llama_source() -> tuple[Path, str]:
    """Return (llama.cpp tree, source id) from ERLLAMA_LLAMA_CPP_DIR or the pinned sdist."""
    env = os.environ.get("ERLLAMA_LLAMA_CPP_DIR")
    if env:
        src = Path(env).expanduser().resolve()
        if not (src / "include" / "llama.h").is_file():
            raise BuildError(f"ERLLAMA_LLAMA_CPP_DIR={env!r} has no include/llama.h")
        return src, "tree-" + tree_hash(src)
    marker = LLAMA_DIR / ".erllama-source"
    if not (marker.exists() and marker.read_text().strip() == SDIST_SHA256):
        extract_llama(fetch_sdist())
    return LLAMA_DIR, "sdist-" + SDIST_SHA256


def amx_requested() -> bool:
    """True when ``ERLLAMA_AMX`` asks for ggml's AMX kernels (``1``/``on``/``true``/``yes``);
    unset, empty, ``0``/``off``/``false``/``no`` leave them out; anything else is refused."""
    value = os.environ.get("ERLLAMA_AMX", "").strip().lower()
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("", "0", "off", "false", "no"):
        return False
    raise BuildError(f"ERLLAMA_AMX={os.environ['ERLLAMA_AMX']!r} is neither on (1/on/true/yes) "
                     "nor off (0/off/false/no)")


def cpu_flag_args() -> list[str]:
    """Compiler flags that keep the native build away from known-broken kernels (AMX, unless
    opted in). Only on x86-64, and only where the compiler knows the flags."""
    if amx_requested() or platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    if not _compiler_accepts(NO_AMX_FLAGS.split()):
        return []  # a compiler that cannot turn AMX off cannot emit it either
    return [f"-DCMAKE_C_FLAGS={NO_AMX_FLAGS}", f"-DCMAKE_CXX_FLAGS={NO_AMX_FLAGS}"]


def _compiler_accepts(flags: list[str]) -> bool:
    cc = _cc()
    if not cc:
        return True
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "t.c"
        src.write_text("int main(void) { return 0; }\n")
        res = subprocess.run([*shlex.split(cc), *flags, "-c", str(src), "-o", str(Path(d) / "t.o")],
                             capture_output=True)
    return res.returncode == 0


def cmake_args() -> list[str]:
    """The CMake arguments of the llama.cpp build: the fixed ones, the CPU flags, then the user's."""
    return BASE_CMAKE_ARGS + cpu_flag_args() + shlex.split(os.environ.get("ERLLAMA_CMAKE_ARGS", ""))


def machine_id() -> str:
    """Identify the compiler and CPU: GGML_NATIVE builds are only valid on the same kind."""
    return "\n".join([platform.machine(), platform.system(), *([_compiler_version()] if _cc() else []),
                      *_cpuinfo_lines()])


def _cc() -> str | None:
    """The C compiler CMake will pick: ``$CC``, else ``cc``/``gcc`` on the PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _compiler_version() -> str:
    cc = _cc()
    out = subprocess.run([*shlex.split(cc), "--version"], capture_output=True, text=True).stdout if cc else ""
    return out.splitlines()[0] if out else "unknown"


def _cpuinfo_lines() -> list[str]:
    """The first CPU's ``model name`` and ``flags``/``Features`` lines of /proc/cpuinfo."""
    lines = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features")):
                lines.append(line)
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        pass
    return lines


def _cpu_model() -> str:
    model = next((ln.split(":", 1)[1].strip() for ln in _cpuinfo_lines() if ln.startswith("model name")), None)
    return model or platform.processor() or "unknown"


def build_llama() -> dict:
    """Build (or reuse from the cache) the static llama.cpp libraries; return link info."""
    src, source_id = llama_source()
    args = cmake_args()
    key = hashlib.sha256(json.dumps([source_id, args, machine_id()]).encode()).hexdigest()[:20]
    out = cache_root() / f"llama-{key}"
    info_file = out / "build.json"
    if info_file.exists():
        info = json.loads(info_file.read_text())
        if all(Path(p).exists() for p in info["libs"]):
            log(f"reusing cached llama.cpp build {out}")
            info["key"] = key
            info["src"] = str(src)
            info["openmp"] = uses_openmp(info["libs"])
            return info
    cmake = shutil.which("cmake")
    if not cmake:
        raise BuildError("cmake not found: pip install cmake ninja")
    work = cache_root() / f"work-{key}"
    shutil.rmtree(work, ignore_errors=True)
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    jobs = str(os.cpu_count() or 2)
    log(f"building llama.cpp ({source_id[:20]}…) with {' '.join(args)}")
    for cmd in ([cmake, "-S", str(src), "-B", str(work), *gen, *args],
                [cmake, "--build", str(work), "-j", jobs, "--target", "llama"]):
        res = subprocess.run(cmd)
        if res.returncode != 0:
            raise BuildError(f"command failed with exit {res.returncode}: {' '.join(cmd)}")
    staging = cache_root() / f"staging-{key}"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "lib").mkdir(parents=True)
    libs = []
    for a in sorted(work.rglob("lib*.a")):
        dst = staging / "lib" / a.name
        shutil.copy2(a, dst)
        libs.append(str(out / "lib" / a.name))
    info = {"libs": libs, "cmake_args": args, "source": source_id, "key": key}
    (staging / "build.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    info["src"] = str(src)
    info["openmp"] = uses_openmp(info["libs"])
    return info


def uses_openmp(libs: list[str]) -> bool:
    """True when the static libraries call into libgomp (then the extension links -fopenmp)."""
    return any(b"GOMP_" in Path(p).read_bytes() for p in libs if "ggml" in Path(p).name)


def link_order(libs: list[str]) -> list[str]:
    """llama first, ggml backends next, ggml-base last (static link order)."""
    def rank(p: str) -> int:
        name = Path(p).name
        if name == "libllama.a":
            return 0
        if name == "libggml-base.a":
            return 3
        if name == "libggml.a":
            return 1
        return 2
    return sorted(libs, key=rank)


def write_build_info(info: dict, gen_dir: Path) -> Path:
    """Write ``erl_buildinfo.h``: the build's facts as a JSON string the extension returns from
    ``_native.build_info()`` (``erllama doctor`` shows it). Rewritten only when it changes, so
    an unchanged build does not recompile the extension."""
    facts = {
        "source": info["source"],
        "cache_key": info["key"],
        "cache_dir": str(cache_root() / f"llama-{info['key']}"),
        "cmake_args": info["cmake_args"],
        "amx_requested": amx_requested(),
        "no_amx_flags": any(NO_AMX_FLAGS in a for a in info["cmake_args"]),
        "openmp": info["openmp"],
        "machine": platform.machine(),
        "compiler": _compiler_version(),
        "built_for_cpu": _cpu_model(),
    }
    data = json.dumps(facts, sort_keys=True).encode()
    body = ", ".join(str(b) for b in data)
    text = ("/* generated by setup.py: the facts of this build (do not edit) */\n"
            f"static const char ERL_BUILD_INFO[] = {{{body}, 0}};\n")
    gen_dir.mkdir(parents=True, exist_ok=True)
    header = gen_dir / "erl_buildinfo.h"
    if not header.exists() or header.read_text() != text:
        header.write_text(text)
    return header


GRAMMAR_MEMBER = f"llama_cpp_python-{SDIST_VERSION}/llama_cpp/llama_grammar.py"
GRAMMAR_VENDORED = Path("erllama") / "_vendor" / "llama_grammar.py"


def vendor_grammar(targets: list[Path]) -> None:
    """Copy llama-cpp-python's JSON-schema-to-GBNF converter (``llama_cpp/llama_grammar.py``,
    MIT, a port of llama.cpp's ``json_schema_to_grammar.py``) out of the verified pinned sdist
    into ``erllama/_vendor/`` under each of ``targets`` (the source tree, the build tree). It is
    never committed; the server's ``response_format`` uses it."""
    with tarfile.open(fetch_sdist()) as tf:
        f = tf.extractfile(GRAMMAR_MEMBER)
        if f is None:
            raise BuildError(f"{GRAMMAR_MEMBER} is missing from the sdist")
        text = f.read()
    for root in targets:
        dest = root / GRAMMAR_VENDORED
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists() or dest.read_bytes() != text:
            dest.write_bytes(text)


class BuildExt(build_ext):
    """Build llama.cpp first, then compile the Cython module against it."""

    def run(self):
        vendor_grammar([ROOT] + ([] if self.inplace else [Path(self.build_lib)]))
        info = build_llama()
        src = Path(info["src"])
        header = write_build_info(info, Path(self.build_temp) / "erllama-gen")
        link = ["-Wl,--start-group", *link_order(info["libs"]), "-Wl,--end-group", "-lstdc++", "-lm", "-pthread"]
        if info["openmp"]:
            link.append("-fopenmp")
        link += shlex.split(os.environ.get("ERLLAMA_LINK_ARGS", ""))
        for ext in self.extensions:
            ext.include_dirs += [str(header.parent), str(src / "include"), str(src / "ggml" / "include")]
            ext.extra_link_args += link
            ext.depends += [*info["libs"], str(header)]
        super().run()


def extensions():
    from Cython.Build import cythonize

    ext = Extension(
        "erllama._native",
        ["erllama/_native.pyx"],
        language="c++",
        include_dirs=[str(ROOT / "erllama" / "includes")],
        extra_compile_args=["-O2", "-std=c++17"],
        depends=[str(p) for p in (ROOT / "erllama").glob("**/*") if p.suffix in (".pyx", ".pxd", ".pxi", ".h")],
    )
    return cythonize(
        [ext],
        compiler_directives={"language_level": "3", "embedsignature": True, "binding": True},
        include_path=[str(ROOT)],
    )


if __name__ == "__main__":
    setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
