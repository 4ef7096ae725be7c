"""The build: pinned source verification, the llama.cpp build cache, layering, errors without the extension."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_setup():
    spec = importlib.util.spec_from_file_location("erllama_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # setup() only runs under __main__
    return mod


def test_second_build_reuses_cached_llama(tmp_path):
    """After the install built llama.cpp once, asking again is a cache hit (no CMake run)."""
    code = "import importlib.util,sys;s=importlib.util.spec_from_file_location('s',sys.argv[1]);" \
           "m=importlib.util.module_from_spec(s);s.loader.exec_module(m);print(m.build_llama()['libs'])"
    res = subprocess.run([sys.executable, "-c", code, str(ROOT / "setup.py")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "reusing cached llama.cpp build" in res.stderr
    libs = eval(res.stdout.strip().splitlines()[-1])
    names = {Path(p).name for p in libs}
    assert {"libllama.a", "libggml.a", "libggml-base.a", "libggml-cpu.a"} <= names
    assert all(Path(p).is_file() and not str(p).startswith(str(ROOT)) for p in libs)


def test_cache_key_depends_on_flags(monkeypatch):
    setup = load_setup()
    monkeypatch.delenv("ERLLAMA_CMAKE_ARGS", raising=False)
    base = setup.cmake_args()
    monkeypatch.setenv("ERLLAMA_CMAKE_ARGS", "-DGGML_CUDA=ON '-DFOO=a b'")
    extra = setup.cmake_args()
    assert extra[: len(base)] == base and extra[len(base):] == ["-DGGML_CUDA=ON", "-DFOO=a b"]
    assert "-DGGML_OPENMP=OFF" in base and "-DBUILD_SHARED_LIBS=OFF" in base
    assert "-DCMAKE_POSITION_INDEPENDENT_CODE=ON" in base


def test_sha256_mismatch_is_refused(monkeypatch, tmp_path):
    setup = load_setup()
    monkeypatch.setenv("ERLLAMA_BUILD_CACHE", str(tmp_path))
    (tmp_path / "src").mkdir()
    fake = tmp_path / "src" / setup.SDIST_FILE
    fake.write_bytes(b"not the llama.cpp you are looking for")
    with pytest.raises(setup.BuildError, match="sha256 mismatch.*expected 832db069.*Refusing"):
        setup.fetch_sdist()
    assert not fake.exists()  # moved aside, so the next build downloads again


def test_llama_cpp_dir_override_is_validated(monkeypatch, tmp_path):
    setup = load_setup()
    monkeypatch.setenv("ERLLAMA_LLAMA_CPP_DIR", str(tmp_path))
    with pytest.raises(setup.BuildError, match="no include/llama.h"):
        setup.llama_source()
    monkeypatch.setenv("ERLLAMA_LLAMA_CPP_DIR", str(ROOT / "deps" / "llama.cpp"))
    src, source_id = setup.llama_source()
    assert src == (ROOT / "deps" / "llama.cpp").resolve() and source_id.startswith("tree-")


def test_pinned_source_is_extracted_and_ignored():
    assert (ROOT / "deps" / "llama.cpp" / "include" / "llama.h").is_file()
    marker = (ROOT / "deps" / "llama.cpp" / ".erllama-source").read_text().strip()
    assert marker == load_setup().SDIST_SHA256
    tracked = subprocess.run(["git", "ls-files", "deps"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "llama.cpp/" not in tracked


def test_errors_import_without_the_extension():
    code = ("import sys; sys.modules['erllama._native'] = None\n"
            "import erllama, erllama.errors as e\n"
            "assert issubclass(e.MalformedGGUF, e.LoadFailed)\n"
            "assert issubclass(e.ModelNotFound, LookupError) and issubclass(e.ConfigError, ValueError)\n"
            "assert all(issubclass(getattr(e, n), e.ErllamaError) for n in e.__all__)\n"
            "print('ok')")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_layering():
    """Only backend/llama.py imports the compiled module; supervision imports nothing of erllama."""
    for path in (ROOT / "erllama").rglob("*.py"):
        if path == ROOT / "erllama" / "backend" / "llama.py":
            continue
        bad = {n for n in _imports(path) if n.endswith("_native") or n == "erllama._native"}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    for path in (ROOT / "supervision").rglob("*.py"):
        bad = {n for n in _imports(path) if n == "erllama" or n.startswith("erllama.")}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_crc32c():
    from erllama import _native as native

    assert native.crc32c(b"123456789") == 0xE3069283
    assert native.crc32c(b"") == 0
    data = os.urandom(200_003)
    assert native.crc32c(data[100:], native.crc32c(data[:100])) == native.crc32c(data)
    assert native.crc32c(memoryview(data)) == native.crc32c(bytearray(data))


def _crc32c_ref(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_crc32c_matches_reference_bitwise():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from erllama import _native as native

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300))
    def check(data):
        assert native.crc32c(data) == _crc32c_ref(data)

    check()


def test_openmp_detection_reads_the_libraries(tmp_path):
    setup = load_setup()
    omp = tmp_path / "libggml-cpu.a"
    omp.write_bytes(b"\x00junk GOMP_parallel junk")
    plain = tmp_path / "libggml-base.a"
    plain.write_bytes(b"\x00no threads here")
    assert setup.uses_openmp([str(omp), str(plain)])
    assert not setup.uses_openmp([str(plain)])
    info = setup.build_llama()  # the cached default build: -DGGML_OPENMP=OFF
    assert info["openmp"] is False
