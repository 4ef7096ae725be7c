"""The CUDA build switch (ERLLAMA_CUDA) and the static-libstdc++ guard of setup.py.

No test here needs CUDA: the toolkit, nvidia-smi and ldconfig are fakes in tmp_path, and the
guard is tried on tiny shared objects built with the system g++ and on the real extension.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from test_build import ROOT, load_setup

CUDA_ENV = ("ERLLAMA_CUDA", "ERLLAMA_CUDA_ARCHS", "ERLLAMA_CMAKE_ARGS", "CUDACXX", "CUDA_HOME", "CUDA_PATH")

# the CPU build's CMake arguments before ERLLAMA_CUDA existed (the cache key of every CPU build
# depends on them: they must not change)
CPU_ARGS = [
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
    "-DGGML_OPENMP=OFF",
]
NO_AMX = ["-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
          "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"]
X86 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.fixture
def setup(monkeypatch, tmp_path):
    """setup.py as a module, with no CUDA in the environment and no default toolkit location."""
    for var in (*CUDA_ENV, "ERLLAMA_AMX"):
        monkeypatch.delenv(var, raising=False)
    mod = load_setup()
    monkeypatch.setattr(mod, "CUDA_DEFAULT_HOMES", (str(tmp_path / "no-default-cuda"),))
    return mod


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def _path_without_nvcc(tmp_path: Path) -> str:
    """PATH with every directory that holds an nvcc left out."""
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "nvcc").exists()]
    return os.pathsep.join([str(tmp_path / "empty-bin"), *dirs])


@pytest.fixture
def toolkit(tmp_path, monkeypatch):
    """A fake CUDA 13 toolkit (targets/x86_64-linux/lib layout, libcuda stub), a fake driver
    directory listed by a fake ldconfig, and a fake nvidia-smi reporting two H200s."""
    home = tmp_path / "cuda-13.0"
    lib = home / "targets" / "x86_64-linux" / "lib"
    nvcc = _script(home / "bin" / "nvcc", 'echo "Cuda compilation tools, release 13.0"')
    for name in ("cudart", "cublas", "cublasLt"):
        _touch(lib / f"lib{name}.so.13")
    stubs = lib / "stubs"
    _touch(stubs / "libcuda.so")
    driver = tmp_path / "driver"
    _touch(driver / "libcuda.so.1")
    bin_dir = tmp_path / "fakebin"
    _script(bin_dir / "nvidia-smi", 'echo "9.0"; echo "9.0"')
    _script(bin_dir / "ldconfig",
            f'echo "2 libs found in cache"; echo "\tlibcuda.so.1 (libc6,x86-64) => {driver}/libcuda.so.1"')
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_dir), _path_without_nvcc(tmp_path)]))
    return {"home": home, "lib": lib, "nvcc": nvcc, "stubs": stubs, "driver": driver, "bin": bin_dir}


# ---- (a) the switch without a toolkit ----------------------------------------------------------

def test_cuda_on_without_nvcc_is_a_clear_error(setup, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", _path_without_nvcc(tmp_path))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "not-a-toolkit"))
    monkeypatch.setenv("ERLLAMA_CUDA", "1")
    with pytest.raises(setup.BuildError) as exc:
        setup.cmake_args()
    msg = str(exc.value)
    assert "ERLLAMA_CUDA=1 asks for a CUDA build" in msg and "nvcc (the CUDA compiler) was not found" in msg
    assert "$CUDA_HOME/bin/nvcc" in msg and str(tmp_path / "not-a-toolkit") in msg and "nvcc on $PATH" in msg
    assert "set CUDA_HOME" in msg and "unset ERLLAMA_CUDA for a CPU build" in msg


def test_cuda_auto_without_nvcc_is_the_cpu_build(setup, monkeypatch, tmp_path):
    cpu = setup.cmake_args()
    monkeypatch.setenv("PATH", _path_without_nvcc(tmp_path))
    monkeypatch.setenv("ERLLAMA_CUDA", "auto")
    assert setup.cuda_requested() is False
    assert setup.cmake_args() == cpu


def test_cuda_auto_with_an_incomplete_toolkit_is_the_cpu_build(setup, toolkit, monkeypatch, capsys):
    """nvcc without cuBLAS (this project's CPU test machine has such a toolkit): auto builds for the CPU."""
    cpu = setup.cmake_args()
    for name in ("cublas", "cublasLt"):
        (toolkit["lib"] / f"lib{name}.so.13").unlink()
    monkeypatch.setenv("CUDACXX", str(toolkit["nvcc"]))
    monkeypatch.setenv("ERLLAMA_CUDA", "auto")
    assert setup.cmake_args() == cpu
    assert "ERLLAMA_CUDA=auto: building for the CPU" in capsys.readouterr().err
    monkeypatch.setenv("ERLLAMA_CUDA", "1")
    with pytest.raises(setup.BuildError, match=r"lacks libcublas\.so, libcublasLt\.so"):
        setup.cmake_args()


@pytest.mark.parametrize("value", ["maybe", "2", "cuda"])
def test_cuda_switch_rejects_unknown_values(setup, monkeypatch, value):
    monkeypatch.setenv("ERLLAMA_CUDA", value)
    with pytest.raises(setup.BuildError, match=f"ERLLAMA_CUDA='{value}' is neither on"):
        setup.cmake_args()


# ---- (b) the decisions, on a fake toolkit --------------------------------------------------------

def test_toolkit_is_found_with_its_libraries_and_the_driver(setup, toolkit, monkeypatch):
    monkeypatch.setenv("CUDACXX", str(toolkit["nvcc"]))
    tk = setup.cuda_toolkit()
    assert tk.nvcc == toolkit["nvcc"] and tk.home == toolkit["home"]
    assert tk.lib_dir == toolkit["lib"]
    assert tk.link_driver_dir == toolkit["stubs"]  # link against the stub...
    assert tk.driver_dir == toolkit["driver"]      # ...run against the driver


def test_cuda_cmake_args_and_cache_key(setup, toolkit, monkeypatch):
    cpu = setup.cmake_args()
    monkeypatch.setenv("ERLLAMA_CUDA", "1")
    monkeypatch.setenv("CUDA_HOME", str(toolkit["home"]))
    monkeypatch.setenv("ERLLAMA_CMAKE_ARGS", "-DGGML_CUDA_FA=OFF")
    nvcc, home = toolkit["nvcc"], toolkit["home"]
    args = setup.cmake_args()
    assert args == cpu + ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90", f"-DCMAKE_CUDA_COMPILER={nvcc}",
                          f"-DCUDAToolkit_ROOT={home}", "-DGGML_CUDA_NCCL=OFF",
                          f"-DCMAKE_LIBRARY_PATH={toolkit['stubs']}", "-DGGML_CUDA_FA=OFF"]
    assert setup.build_key("sdist-x", args) != setup.build_key("sdist-x", cpu)


def test_cuda_auto_finds_nvcc_on_the_path(setup, toolkit, monkeypatch):
    monkeypatch.setenv("PATH", os.pathsep.join([str(toolkit["nvcc"].parent), os.environ["PATH"]]))
    monkeypatch.setenv("ERLLAMA_CUDA", "auto")
    assert setup.cuda_requested() is True
    tk = setup.cuda_toolkit()
    assert tk.nvcc == toolkit["nvcc"] and tk.home == toolkit["home"].resolve()
    assert "-DGGML_CUDA=ON" in setup.cmake_args()


def test_nvcc_as_a_wrapper_script_reports_its_toolkit(setup, toolkit, tmp_path, monkeypatch):
    """/usr/local/bin/nvcc may be a script that execs the real one: the toolkit is where nvcc says."""
    wrapper = _script(tmp_path / "wrapper" / "bin" / "nvcc",
                      f'echo "#\\$ _HERE_={toolkit["home"]}/bin" >&2; echo "#\\$ TOP={toolkit["home"]}/bin/.." >&2')
    monkeypatch.setenv("CUDACXX", str(wrapper))
    tk = setup.cuda_toolkit()
    assert tk.nvcc == wrapper and tk.home == toolkit["home"].resolve() and tk.lib_dir.name == "lib"


def test_lib64_layout_and_no_stubs_links_the_driver(setup, tmp_path, monkeypatch):
    home = tmp_path / "cuda"
    nvcc = _script(home / "bin" / "nvcc", "true")
    for name in ("cudart", "cublas", "cublasLt"):
        _touch(home / "lib64" / f"lib{name}.so")
    driver = tmp_path / "nvidia"
    _touch(driver / "libcuda.so.1")
    bin_dir = tmp_path / "bin"
    _script(bin_dir / "ldconfig", f'echo "\tlibcuda.so.1 (libc6,x86-64) => {driver}/libcuda.so.1"')
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_dir), _path_without_nvcc(tmp_path)]))
    monkeypatch.setenv("CUDACXX", str(nvcc))
    tk = setup.cuda_toolkit()
    assert tk.lib_dir == home / "lib64" and tk.link_driver_dir == driver and tk.driver_dir == driver


def test_missing_runtime_libraries_are_named(setup, toolkit, monkeypatch):
    (toolkit["lib"] / "libcublasLt.so.13").unlink()
    monkeypatch.setenv("CUDA_HOME", str(toolkit["home"]))
    with pytest.raises(setup.BuildError, match=r"lacks libcublasLt\.so.*Set CUDA_HOME to a complete toolkit"):
        setup.cuda_toolkit()


def test_no_libcuda_anywhere_is_an_error(setup, toolkit, monkeypatch):
    shutil.rmtree(toolkit["stubs"])
    _script(toolkit["bin"] / "ldconfig", 'echo "0 libs found in cache"')
    monkeypatch.setenv("CUDA_HOME", str(toolkit["home"]))
    with pytest.raises(setup.BuildError, match="no libcuda.so to link against.*Install the NVIDIA driver"):
        setup.cuda_toolkit()


def test_archs_from_env_from_nvidia_smi_or_native(setup, toolkit, monkeypatch):
    assert setup.cuda_archs() == "90"  # two H200s, one architecture
    _script(toolkit["bin"] / "nvidia-smi", 'echo "8.0"; echo "9.0"; echo "8.0"')
    assert setup.cuda_archs() == "80;90"
    monkeypatch.setenv("ERLLAMA_CUDA_ARCHS", "86, 89")
    assert setup.cuda_archs() == "86;89"
    monkeypatch.delenv("ERLLAMA_CUDA_ARCHS")
    _script(toolkit["bin"] / "nvidia-smi", 'echo "NVIDIA-SMI has failed" >&2; exit 9')
    monkeypatch.setattr(setup, "cmake_version", lambda: (3, 28, 1))
    assert setup.cuda_archs() == "native"
    monkeypatch.setattr(setup, "cmake_version", lambda: (3, 22, 0))
    with pytest.raises(setup.BuildError, match="older than 3.24.*Set ERLLAMA_CUDA_ARCHS"):
        setup.cuda_archs()


def test_compute_caps_and_ldconfig_parsing(setup):
    assert setup.parse_compute_caps("9.0\n8.6\n9.0\n") == ["90", "86"]
    assert setup.parse_compute_caps("12.0\n") == ["120"]
    assert setup.parse_compute_caps("[N/A]\n") == []
    text = ("3 libs found in cache `/etc/ld.so.cache'\n"
            "\tlibcuda.so.1 (libc6) => /usr/lib32/libcuda.so.1\n"
            "\tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1\n"
            "\tlibcudart.so.12 (libc6,x86-64) => /usr/local/cuda/lib64/libcudart.so.12\n")
    assert setup.parse_ldconfig(text, "libcuda.so.1") == Path("/usr/lib/x86_64-linux-gnu")
    assert setup.parse_ldconfig(text, "libnvidia-ml.so.1") is None


def test_cuda_link_libraries_and_rpaths(setup, toolkit, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(toolkit["home"]))
    tk = setup.cuda_toolkit()
    link = setup.cuda_link(tk)
    lib, stubs, driver = str(toolkit["lib"]), str(toolkit["stubs"]), str(toolkit["driver"])
    assert link == {"libraries": ["cudart", "cublas", "cublasLt", "cuda"], "library_dirs": [lib, stubs],
                    "rpaths": [lib, driver]}
    assert setup.cuda_link_args(link) == [f"-L{lib}", f"-L{stubs}", "-lcudart", "-lcublas", "-lcublasLt", "-lcuda",
                                          f"-Wl,-rpath,{lib}", f"-Wl,-rpath,{driver}"]
    # what CMake's FindCUDAToolkit chose for the build wins for the link (the rpath never names stubs)
    cache = (f"CUDA_cudart_LIBRARY:FILEPATH={lib}/libcudart.so\n"
             f"CUDA_cublas_LIBRARY:FILEPATH=/opt/cublas/lib/libcublas.so\n"
             "CUDA_cublasLt_LIBRARY:FILEPATH=CUDA_cublasLt_LIBRARY-NOTFOUND\n"
             f"CUDA_cuda_driver_LIBRARY:FILEPATH={driver}/libcuda.so\n")
    libs = setup.parse_cmake_cuda_libs(cache)
    assert libs == {"cudart": Path(lib) / "libcudart.so", "cublas": Path("/opt/cublas/lib/libcublas.so"),
                    "cuda": Path(driver) / "libcuda.so"}
    assert setup.cuda_link(tk, libs)["library_dirs"] == [lib, "/opt/cublas/lib", driver]


def test_findcudatoolkit_cache_names_match_a_real_toolkit(setup, tmp_path, monkeypatch):
    """Where this machine has an nvcc (even without cuBLAS or a GPU), CMake's FindCUDAToolkit
    records cudart under the cache name parse_cmake_cuda_libs reads, in the toolkit we find."""
    monkeypatch.setattr(setup, "CUDA_DEFAULT_HOMES", ("/usr/local/cuda",))
    nvcc, cmake = setup.find_nvcc(), shutil.which("cmake")
    if nvcc is None or cmake is None:
        pytest.skip("no CUDA toolkit (nvcc) or no cmake on this machine")
    home = setup.cuda_home(nvcc)
    (tmp_path / "CMakeLists.txt").write_text("cmake_minimum_required(VERSION 3.18)\nproject(t LANGUAGES C)\n"
                                             "find_package(CUDAToolkit REQUIRED)\n")
    subprocess.run([cmake, "-S", str(tmp_path), "-B", str(tmp_path / "b"), f"-DCUDAToolkit_ROOT={home}",
                    f"-DCMAKE_CUDA_COMPILER={nvcc}"], check=True, capture_output=True, timeout=120)
    libs = setup.parse_cmake_cuda_libs((tmp_path / "b" / "CMakeCache.txt").read_text())
    ours = setup.find_shared_lib(setup._cuda_lib_dirs(home), "cudart")
    assert ours is not None and libs["cudart"].resolve().parent == ours.resolve().parent


# ---- (c) the static-libstdc++ guard, on real shared objects ----------------------------------------

CXX_SOURCE = """#include <string>
extern "C" int erl_probe(const char *s) { std::string x(s); x += "!"; return (int)x.size(); }
"""


def _gxx() -> str:
    gxx = shutil.which("g++")
    if not gxx:
        pytest.skip("g++ is not installed: the static-libstdc++ guard needs a C++ compiler to build its samples")
    return gxx


def _build(tmp_path: Path, name: str, source: str, suffix: str, *flags: str) -> Path:
    src = tmp_path / f"{name}{suffix}"
    src.write_text(source)
    out = tmp_path / f"{name}.so"
    compiler = _gxx() if suffix == ".cpp" else (shutil.which("gcc") or _gxx())
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", str(src), "-o", str(out), *flags], check=True)
    return out


def test_guard_refuses_a_static_libstdcxx(setup, tmp_path):
    module = _build(tmp_path, "static_cxx", CXX_SOURCE, ".cpp", "-static-libstdc++")
    needed, defined, _ = setup.elf_dynamic_info(module)
    assert not any(n.startswith("libstdc++") for n in needed) and "__gxx_personality_v0" in defined
    with pytest.raises(setup.BuildError) as exc:
        setup.check_libstdcxx(module, "/opt/other-gcc/bin/g++")
    msg = str(exc.value)
    assert "static_cxx.so links libstdc++ statically" in msg and "does not need libstdc++.so.6" in msg
    assert "'/opt/other-gcc/bin/g++'" in msg and "system g++" in msg and "-static-libstdc++" in msg


def test_a_refused_module_is_deleted(setup, tmp_path):
    """setup.py's post-link check: the static module is refused and removed, the shared one kept."""
    static = _build(tmp_path, "static_cxx", CXX_SOURCE, ".cpp", "-static-libstdc++")
    with pytest.raises(setup.BuildError, match="links libstdc\\+\\+ statically.*'/usr/bin/x-g\\+\\+'"):
        setup.check_module(static, cuda=False, compiler="/usr/bin/x-g++")
    assert not static.exists()
    shared = _build(tmp_path, "shared_cxx", CXX_SOURCE, ".cpp")
    setup.check_module(shared, cuda=False)
    assert shared.exists()
    with pytest.raises(setup.BuildError, match="built with CUDA but does not need libcudart"):
        setup.check_module(shared, cuda=True)
    assert not shared.exists()


def test_guard_accepts_the_shared_libstdcxx(setup, tmp_path):
    module = _build(tmp_path, "shared_cxx", CXX_SOURCE, ".cpp")
    needed = setup.elf_dynamic_info(module)[0]
    assert "libstdc++.so.6" in needed
    setup.check_libstdcxx(module)


def test_guard_accepts_plain_c(setup, tmp_path):
    module = _build(tmp_path, "plain_c", "int erl_probe(int x) { return x + 1; }\n", ".c")
    setup.check_libstdcxx(module)


def test_guard_reads_only_elf(setup, tmp_path):
    bogus = tmp_path / "bogus.so"
    bogus.write_bytes(b"MZ not an ELF file")
    with pytest.raises(setup.BuildError, match="not an ELF file"):
        setup.check_libstdcxx(bogus)


def test_cuda_module_must_need_the_cuda_libraries(setup, tmp_path):
    module = _build(tmp_path, "shared_cxx", CXX_SOURCE, ".cpp")
    with pytest.raises(setup.BuildError, match=r"does not need libcudart\.so, libcublas\.so, libcublasLt\.so, "
                                                r"libcuda\.so .*not linked"):
        setup.check_cuda_needed(module)


# ---- (d) the CPU build is unaffected ---------------------------------------------------------------

def _expected_cpu_args(setup) -> list[str]:
    return CPU_ARGS + (NO_AMX if X86 and setup._compiler_accepts(NO_AMX[0].split("=", 1)[1].split()) else [])


@pytest.mark.parametrize("value", [None, "", "0", "off"])
def test_cpu_build_args_are_unchanged(setup, monkeypatch, value):
    if value is not None:
        monkeypatch.setenv("ERLLAMA_CUDA", value)
    assert setup.cmake_args() == _expected_cpu_args(setup)
    assert setup.cuda_requested() is False


def _built_module() -> Path:
    mods = sorted((ROOT / "erllama").glob("_native*.so"))
    if not mods:
        pytest.skip("the extension is not built in place in this checkout")
    return mods[0]


def test_the_built_extension_passes_the_guard(setup):
    module = _built_module()
    setup.check_libstdcxx(module)
    assert "libstdc++.so.6" in setup.elf_dynamic_info(module)[0]


def test_the_built_cpu_extension_kept_its_cache_key(setup):
    """The installed CPU build's recorded cache key is the key of the explicit CPU arguments."""
    _built_module()
    from erllama import sysinfo

    build = sysinfo.build_info()
    if build.get("cuda"):
        pytest.skip("this checkout's extension is a CUDA build")
    assert build["cmake_args"] == _expected_cpu_args(setup)
    assert build["cache_key"] == setup.build_key(build["source"], _expected_cpu_args(setup))


# ---- erllama doctor: backends, devices, GPU ---------------------------------------------------------

def _doctor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "erllama.cli", "doctor", "--no-check", *args], capture_output=True,
                          text=True, timeout=180, cwd=ROOT)


def test_doctor_shows_backends_devices_and_gpu():
    r = _doctor("--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert "CPU" in info["backends"]
    cpu = [d for d in info["devices"] if d["type"] == "cpu"]
    assert cpu and cpu[0]["backend"] == "CPU" and cpu[0]["total"] > 0 and 0 < cpu[0]["free"] <= cpu[0]["total"]
    cuda = info["build"].get("cuda")
    assert info["gpu"] == [d for d in info["devices"] if d["type"] != "cpu"]
    if not cuda:
        assert info["gpu"] == []
    text = _doctor()
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert any(ln.startswith("backends    ") and "CPU" in ln for ln in lines)
    if not cuda:
        assert "gpu         none" in lines
    at = lines.index("devices")
    assert lines[at + 1].split()[0] == info["devices"][0]["name"] and "GiB free of" in lines[at + 1]
