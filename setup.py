"""Build erllama: fetch the pinned llama.cpp, build it static + PIC, link one Cython module.

Environment:
  ERLLAMA_LLAMA_CPP_DIR  use this llama.cpp tree instead of fetching the pinned sdist
  ERLLAMA_CMAKE_ARGS     extra CMake arguments (shell-quoted), e.g. "-DGGML_CUDA=ON"
  ERLLAMA_LINK_ARGS      extra linker arguments for the extension (e.g. "-lcuda -lcudart")
  ERLLAMA_BUILD_CACHE    where built llama.cpp libraries are cached
                         (default: $XDG_CACHE_HOME/erllama-build or ~/.cache/erllama-build)
  ERLLAMA_AMX            "1" compiles ggml's Intel AMX kernels (off by default: they crash
                         on Q4_K models on some AMX CPUs, llama.cpp#20824)
  ERLLAMA_CUDA           "1" builds ggml's CUDA backend and links the CUDA runtime into the
                         extension; "auto" does so when a complete toolkit is found;
                         "0"/unset: the CPU build
  ERLLAMA_CUDA_ARCHS     CUDA architectures (CMake list, e.g. "90" or "80;90"); default: the
                         local GPUs' (nvidia-smi), else CMake's "native"
  CUDACXX, CUDA_HOME, CUDA_PATH  where nvcc and the toolkit are looked for (then PATH)

After linking, the extension must need the shared libstdc++.so.6: a module that carries its
own static copy is refused (two libstdc++ copies in one process crash, see check_libstdcxx).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import NamedTuple

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
    """The CMake arguments of the llama.cpp build: the fixed ones, the CPU flags, the CUDA ones
    (only when ``ERLLAMA_CUDA`` asks for them), then the user's."""
    toolkit = cuda_toolkit() if cuda_requested() else None
    cuda = cuda_cmake_args(toolkit, cuda_archs()) if toolkit else []
    user = shlex.split(os.environ.get("ERLLAMA_CMAKE_ARGS", ""))
    if not toolkit and "-DGGML_CUDA=ON" in user:
        log("warning: ERLLAMA_CMAKE_ARGS turns GGML_CUDA on but ERLLAMA_CUDA is off: the extension "
            "will not be linked against the CUDA libraries; set ERLLAMA_CUDA=1 instead")
    return BASE_CMAKE_ARGS + cpu_flag_args() + cuda + user


# ---- CUDA -------------------------------------------------------------------------------------

CUDA_RUNTIME_LIBS = ("cudart", "cublas", "cublasLt")  # from the toolkit; libcuda comes from the driver
CUDA_DEFAULT_HOMES = ("/usr/local/cuda",)


class CudaToolkit(NamedTuple):
    """Where the CUDA toolkit's pieces are: ``nvcc``, the toolkit root, its library directory
    (libcudart, libcublas, libcublasLt), the directory whose ``libcuda.so`` the link uses (the
    toolkit's stubs, or the driver's), and the driver's directory (for the rpath; None when
    the dynamic loader's cache does not list libcuda.so.1)."""

    nvcc: Path
    home: Path
    lib_dir: Path
    link_driver_dir: Path
    driver_dir: Path | None


def cuda_mode() -> str:
    """``ERLLAMA_CUDA`` as ``"off"`` (unset, empty, 0/off/false/no), ``"on"`` (1/on/true/yes)
    or ``"auto"`` (on when a complete toolkit is found); anything else is refused."""
    value = os.environ.get("ERLLAMA_CUDA", "").strip().lower()
    if value in ("", "0", "off", "false", "no"):
        return "off"
    if value in ("1", "on", "true", "yes"):
        return "on"
    if value == "auto":
        return "auto"
    raise BuildError(f"ERLLAMA_CUDA={os.environ['ERLLAMA_CUDA']!r} is neither on (1/on/true/yes), "
                     "off (0/off/false/no) nor auto")


def cuda_requested() -> bool:
    """True when this build is a CUDA build: ``ERLLAMA_CUDA=1``, or ``auto`` and a complete
    toolkit is found (``auto`` with none, or an incomplete one, is the CPU build, logged)."""
    mode = cuda_mode()
    if mode != "auto":
        return mode == "on"
    try:
        cuda_toolkit()
    except BuildError as exc:
        log(f"ERLLAMA_CUDA=auto: building for the CPU ({exc})")
        return False
    return True


def _nvcc_candidates() -> list[tuple[str, Path | None]]:
    """(where, path) for each place nvcc is looked for, in order."""
    out: list[tuple[str, Path | None]] = []
    if os.environ.get("CUDACXX"):
        out.append(("$CUDACXX", Path(os.environ["CUDACXX"])))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            out.append((f"${var}/bin/nvcc", Path(os.environ[var]) / "bin" / "nvcc"))
    found = shutil.which("nvcc")
    out.append(("nvcc on $PATH", Path(found) if found else None))
    out += [(f"{home}/bin/nvcc", Path(home) / "bin" / "nvcc") for home in CUDA_DEFAULT_HOMES]
    return out


def find_nvcc() -> Path | None:
    """The CUDA compiler: ``$CUDACXX``, ``$CUDA_HOME/bin/nvcc``, ``$CUDA_PATH/bin/nvcc``, nvcc
    on the PATH, then the default install location; None when none is an executable file."""
    for _, path in _nvcc_candidates():
        if path is not None and path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def _missing_nvcc_error() -> BuildError:
    looked = ", ".join(where + (f" ({path})" if path and not where.endswith(str(path)) else "")
                       for where, path in _nvcc_candidates())
    return BuildError(
        f"ERLLAMA_CUDA={os.environ.get('ERLLAMA_CUDA', '')} asks for a CUDA build, but nvcc (the CUDA "
        f"compiler) was not found; looked at: {looked}. Install the CUDA toolkit and set CUDA_HOME "
        "to it (or CUDACXX to its nvcc), or unset ERLLAMA_CUDA for a CPU build.")


def cuda_home(nvcc: Path) -> Path:
    """The toolkit root: ``$CUDA_HOME``/``$CUDA_PATH`` when set, else the directory above nvcc's
    (symbolic links resolved), else the ``TOP`` nvcc itself reports (nvcc as a wrapper script)."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return Path(env)
    home = nvcc.resolve().parent.parent
    if find_shared_lib(_cuda_lib_dirs(home), "cudart") is None:
        try:
            res = subprocess.run([str(nvcc), "-v", "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
            m = re.search(r"^#\$ TOP=(.+)$", res.stdout + res.stderr, re.MULTILINE)
        except (OSError, subprocess.TimeoutExpired):
            m = None
        if m:
            home = Path(m.group(1).strip()).resolve()
    return home


def _cuda_lib_dirs(home: Path) -> list[Path]:
    """The toolkit's library directories, in the order they are searched."""
    return [home / "lib64", home / "lib", *sorted(home.glob("targets/*/lib")),
            *sorted(home.glob("lib/*-linux-gnu"))]


def find_shared_lib(dirs: list[Path], name: str) -> Path | None:
    """``lib<name>.so`` (or a versioned ``lib<name>.so.N``) in the first of ``dirs`` that has it."""
    for d in dirs:
        for cand in [d / f"lib{name}.so", *sorted(d.glob(f"lib{name}.so.*"))]:
            if cand.is_file():
                return cand
    return None


def parse_ldconfig(text: str, soname: str) -> Path | None:
    """The directory ``ldconfig -p`` output lists ``soname`` in (the first 64-bit entry)."""
    hits = [ln for ln in text.splitlines() if ln.strip().startswith(soname + " ") and "=>" in ln]
    hits.sort(key=lambda ln: "x86-64" not in ln and "64" not in ln)
    return Path(hits[0].split("=>", 1)[1].strip()).parent if hits else None


def driver_lib_dir() -> Path | None:
    """The directory of the driver's ``libcuda.so.1``, from the dynamic loader's cache."""
    ldconfig = shutil.which("ldconfig") or next((p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig")
                                                 if Path(p).exists()), None)
    if not ldconfig:
        return None
    res = subprocess.run([ldconfig, "-p"], capture_output=True, text=True)
    return parse_ldconfig(res.stdout, "libcuda.so.1") if res.returncode == 0 else None


def cuda_toolkit() -> CudaToolkit:
    """Find nvcc, the toolkit's runtime libraries and a libcuda to link; a clear BuildError
    names what is missing."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise _missing_nvcc_error()
    home = cuda_home(nvcc)
    dirs = _cuda_lib_dirs(home)
    found = {name: find_shared_lib(dirs, name) for name in CUDA_RUNTIME_LIBS}
    missing = [f"lib{n}.so" for n, p in found.items() if p is None]
    if missing:
        raise BuildError(f"the CUDA toolkit at {home} (nvcc {nvcc}) lacks {', '.join(missing)}; looked in "
                         f"{', '.join(str(d) for d in dirs)}. Set CUDA_HOME to a complete toolkit.")
    lib_dir = Path(str(found["cudart"])).parent
    driver = driver_lib_dir()
    stubs = [d / "stubs" for d in dirs]
    link_driver = find_shared_lib(stubs + ([driver] if driver else []), "cuda")
    if link_driver is None:
        raise BuildError(f"no libcuda.so to link against: neither the toolkit's stubs "
                         f"({', '.join(str(d) for d in stubs if d.parent.exists())}) nor the driver "
                         "(ldconfig -p lists no libcuda.so.1). Install the NVIDIA driver or a complete toolkit.")
    return CudaToolkit(nvcc=nvcc, home=home, lib_dir=lib_dir, link_driver_dir=link_driver.parent,
                       driver_dir=driver)


def parse_compute_caps(text: str) -> list[str]:
    """``nvidia-smi --query-gpu=compute_cap`` lines (``9.0``) as CMake architectures (``90``),
    each once, in order."""
    archs: list[str] = []
    for line in text.split():
        m = re.fullmatch(r"(\d+)\.(\d+)", line.strip())
        if m and m.group(1) + m.group(2) not in archs:
            archs.append(m.group(1) + m.group(2))
    return archs


def local_gpu_archs() -> list[str]:
    """The local GPUs' architectures from nvidia-smi ([] when it is absent or fails)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        res = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_compute_caps(res.stdout) if res.returncode == 0 else []


def cmake_version() -> tuple[int, ...]:
    """The version of the cmake on the PATH, as a tuple ((0,) when unknown)."""
    cmake = shutil.which("cmake")
    out = subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout if cmake else ""
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(g) for g in m.groups() if g is not None) if m else (0,)


def cuda_archs() -> str:
    """``CMAKE_CUDA_ARCHITECTURES``: ``$ERLLAMA_CUDA_ARCHS``, else the local GPUs' (one build for
    this machine, not ggml's long default list), else ``native`` (CMake >= 3.24 asks the GPU)."""
    env = os.environ.get("ERLLAMA_CUDA_ARCHS", "").strip()
    if env:
        return ";".join(a for a in re.split(r"[;,\s]+", env) if a)
    archs = local_gpu_archs()
    if archs:
        return ";".join(archs)
    if cmake_version() >= (3, 24):
        return "native"
    raise BuildError("cannot tell which CUDA architectures to build for: nvidia-smi reports no GPU and "
                     "this CMake is older than 3.24 (no 'native'). Set ERLLAMA_CUDA_ARCHS, e.g. 90 for H100/H200.")


def cuda_cmake_args(tk: CudaToolkit, archs: str) -> list[str]:
    """The CMake arguments of a CUDA build: ggml's CUDA backend for ``archs``, compiled by this
    nvcc against this toolkit (CMake's FindCUDAToolkit then finds the same libraries), without
    NCCL (the extension does not link it)."""
    return ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={archs}", f"-DCMAKE_CUDA_COMPILER={tk.nvcc}",
            f"-DCUDAToolkit_ROOT={tk.home}", "-DGGML_CUDA_NCCL=OFF",
            f"-DCMAKE_LIBRARY_PATH={tk.link_driver_dir}"]


def parse_cmake_cuda_libs(cache_text: str) -> dict[str, Path]:
    """The libraries FindCUDAToolkit chose, from a CMakeCache.txt: ``{"cudart": path, ...,
    "cuda": path}`` (``CUDA_<name>_LIBRARY``; ``cuda`` is ``CUDA_cuda_driver_LIBRARY``)."""
    out: dict[str, Path] = {}
    for name, var in [*((n, f"CUDA_{n}_LIBRARY") for n in CUDA_RUNTIME_LIBS), ("cuda", "CUDA_cuda_driver_LIBRARY")]:
        m = re.search(rf"^{re.escape(var)}:FILEPATH=(.+)$", cache_text, re.MULTILINE)
        if m and not m.group(1).strip().endswith("-NOTFOUND"):
            out[name] = Path(m.group(1).strip())
    return out


def cuda_link(tk: CudaToolkit, cmake_libs: dict[str, Path] | None = None) -> dict[str, list[str]]:
    """How the extension links the CUDA libraries: ``libraries`` (-l names: cudart, cublas,
    cublasLt, cuda), ``library_dirs`` (where the link finds them: FindCUDAToolkit's choice when
    given, else the toolkit's directory and the stubs/driver directory) and ``rpaths`` (where
    the loader finds them at run time: the toolkit's directory and the driver's, never the stubs)."""
    cmake_libs = cmake_libs or {}
    dirs = [str(cmake_libs[n].parent) if n in cmake_libs else str(tk.lib_dir) for n in CUDA_RUNTIME_LIBS]
    dirs.append(str(cmake_libs["cuda"].parent) if "cuda" in cmake_libs else str(tk.link_driver_dir))
    rpaths = [str(tk.lib_dir), *([str(tk.driver_dir)] if tk.driver_dir else [])]
    return {"libraries": [*CUDA_RUNTIME_LIBS, "cuda"], "library_dirs": list(dict.fromkeys(dirs)),
            "rpaths": list(dict.fromkeys(rpaths))}


def cuda_link_args(link: dict[str, list[str]]) -> list[str]:
    """Linker arguments for ``cuda_link``'s result. The ``-l`` options go after the static
    llama.cpp libraries (so an ``--as-needed`` linker keeps them), with ``-L`` and rpaths."""
    return ([f"-L{d}" for d in link["library_dirs"]] + [f"-l{n}" for n in link["libraries"]]
            + [f"-Wl,-rpath,{d}" for d in link["rpaths"]])


# ---- the built module's C++ runtime ---------------------------------------------------------------

# symbols only libstdc++/libsupc++ itself defines: a module defining them carries its own copy
LIBSTDCXX_RUNTIME_SYMBOLS = frozenset({"__gxx_personality_v0", "__cxa_throw", "__cxa_begin_catch"})
# C++ code: the std namespace, operator new/delete, the C++ exception personality (not __cxa_atexit
# or __cxa_finalize, which every C module refers to)
_CXX_SYMBOL = re.compile(r"^(_ZNSt|_ZNKSt|_ZSt|_Znw|_Zna|_Zdl|_Zda|__gxx_personality_v0$)")


def elf_dynamic_info(path: Path) -> tuple[list[str], set[str], set[str]]:
    """Read an ELF shared object: (DT_NEEDED names, defined symbol names, undefined symbol
    names), symbols from ``.dynsym`` and ``.symtab``. Pure Python, 32/64-bit, either byte order."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF":
        raise BuildError(f"{path} is not an ELF file")
    is64, end = data[4] == 2, "<" if data[5] == 1 else ">"
    # e_shoff, then e_shentsize and e_shnum; a section header, a dynamic entry, a symbol's name and shndx
    shoff = struct.unpack_from(end + ("Q" if is64 else "I"), data, 0x28 if is64 else 0x20)[0]
    shentsize, shnum = struct.unpack_from(end + "HH", data, 0x3A if is64 else 0x2E)
    shfmt, dynfmt = (end + "IIQQQQIIQQ", end + "qQ") if is64 else (end + "IIIIIIIIII", end + "iI")
    shndx_at = 6 if is64 else 14
    sections = [struct.unpack_from(shfmt, data, shoff + i * shentsize) for i in range(shnum)]

    def cstr(strtab: int, off: int) -> str:
        start = sections[strtab][4] + off
        return data[start:data.index(b"\0", start)].decode("utf-8", "replace")

    needed: list[str] = []
    defined: set[str] = set()
    undefined: set[str] = set()
    for _, sh_type, _, _, off, size, link, _, _, entsize in sections:
        if sh_type == 6:  # SHT_DYNAMIC
            step = struct.calcsize(dynfmt)
            for tag, val in struct.iter_unpack(dynfmt, data[off:off + size - size % step]):
                if tag == 0:  # DT_NULL
                    break
                if tag == 1:  # DT_NEEDED
                    needed.append(cstr(link, val))
        elif sh_type in (2, 11) and entsize:  # SHT_SYMTAB, SHT_DYNSYM
            for base in range(off + entsize, off + size - entsize + 1, entsize):
                name = struct.unpack_from(end + "I", data, base)[0]
                shndx = struct.unpack_from(end + "H", data, base + shndx_at)[0]
                if name:
                    (undefined if shndx == 0 else defined).add(cstr(link, name))
    return needed, defined, undefined


def check_libstdcxx(module: Path, compiler: str | None = None) -> None:
    """Refuse a C++ module that carries libstdc++ statically: it must list the shared
    ``libstdc++.so.6`` among its DT_NEEDED and must not define libstdc++'s own runtime symbols.
    A process with two libstdc++ copies (this module's, and the one numpy or another extension
    loads) crashes; the H200 build with an alternative GCC segfaulted at the first model load."""
    needed, defined, undefined = elf_dynamic_info(module)
    shared = any(n.startswith("libstdc++.so") for n in needed)
    own_runtime = sorted(LIBSTDCXX_RUNTIME_SYMBOLS & defined)
    is_cxx = bool(own_runtime) or any(_CXX_SYMBOL.match(s) for s in defined | undefined)
    if not is_cxx or (shared and not own_runtime):
        return
    reasons = [f"it defines libstdc++'s runtime symbols ({', '.join(own_runtime)})"] if own_runtime else []
    if not shared:
        reasons.append(f"it does not need libstdc++.so.6 (DT_NEEDED: {', '.join(needed) or 'none'})")
    why = " and ".join(reasons)
    cxx = compiler or os.environ.get("CXX") or shutil.which("c++") or "c++"
    raise BuildError(
        f"{module.name} links libstdc++ statically: {why}. Two libstdc++ copies in one process crash "
        f"(e.g. once numpy is imported). The C++ compiler was {cxx!r}: build with the system g++ "
        "(CC=/usr/bin/gcc CXX=/usr/bin/g++, and CUDAHOSTCXX=/usr/bin/g++ for CUDA) and drop any "
        "-static-libstdc++ from the flags (LDFLAGS, ERLLAMA_LINK_ARGS).")


def check_cuda_needed(module: Path) -> None:
    """A CUDA build's module must need the CUDA runtime, cuBLAS and the driver library."""
    needed = elf_dynamic_info(module)[0]
    missing = [f"lib{n}.so" for n in (*CUDA_RUNTIME_LIBS, "cuda")
               if not any(x.startswith(f"lib{n}.so") for x in needed)]
    if missing:
        raise BuildError(f"{module.name} was built with CUDA but does not need {', '.join(missing)} "
                         f"(DT_NEEDED: {', '.join(needed)}): the CUDA libraries were not linked.")


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


def build_key(source_id: str, args: list[str]) -> str:
    """The build cache key: the source, the CMake arguments (CPU and CUDA flags) and the machine."""
    return hashlib.sha256(json.dumps([source_id, args, machine_id()]).encode()).hexdigest()[:20]


def build_llama() -> dict:
    """Build (or reuse from the cache) the static llama.cpp libraries; return link info."""
    src, source_id = llama_source()
    args = cmake_args()
    toolkit = cuda_toolkit() if cuda_requested() else None
    key = build_key(source_id, args)
    out = cache_root() / f"llama-{key}"
    info_file = out / "build.json"
    if info_file.exists():
        info = json.loads(info_file.read_text())
        if all(Path(p).exists() for p in info["libs"]):
            log(f"reusing cached llama.cpp build {out}")
            info["key"] = key
            info["src"] = str(src)
            info["openmp"] = uses_openmp(info["libs"])
            info.setdefault("cuda", None)
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
    cuda = None
    if toolkit:  # link what FindCUDAToolkit found for the build itself
        cache_file = work / "CMakeCache.txt"
        cuda = cuda_link(toolkit, parse_cmake_cuda_libs(cache_file.read_text() if cache_file.exists() else ""))
        cuda["archs"] = next(a.split("=", 1)[1] for a in args if a.startswith("-DCMAKE_CUDA_ARCHITECTURES="))
    info = {"libs": libs, "cmake_args": args, "source": source_id, "key": key, "cuda": cuda}
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
        "cuda": info.get("cuda"),
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
        if info.get("cuda"):
            link += cuda_link_args(info["cuda"])
        link += shlex.split(os.environ.get("ERLLAMA_LINK_ARGS", ""))
        for ext in self.extensions:
            ext.include_dirs += [str(header.parent), str(src / "include"), str(src / "ggml" / "include")]
            ext.extra_link_args += link
            ext.depends += [*info["libs"], str(header)]
        super().run()
        # the C++ module is linked by the C++ compiler (distutils puts $CXX in front of the link)
        linker = getattr(self.compiler, "compiler_cxx", None) or getattr(self.compiler, "linker_so", None)
        compiler = linker[0] if linker else None
        for ext in self.extensions:
            check_module(Path(self.get_ext_fullpath(ext.name)), cuda=bool(info.get("cuda")),
                         compiler=compiler)


def check_module(module: Path, *, cuda: bool, compiler: str | None = None) -> None:
    """The linked module's dependencies: the shared libstdc++, and for CUDA the CUDA libraries.
    A refused module is deleted, so that nothing imports it."""
    if not module.exists():
        log(f"warning: {module} not found, its dependencies were not checked")
        return
    try:
        check_libstdcxx(module, compiler)
        if cuda:
            check_cuda_needed(module)
    except BuildError:
        module.unlink()
        raise
    log(f"{module.name} needs the shared libstdc++{' and the CUDA libraries' if cuda else ''}")


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
