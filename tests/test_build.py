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


# The layers of the package, lowest first. A module may import modules of its own layer or
# of a lower one, never of a higher one; the most specific entry names a module's layer
# ("erllama" alone is the facade, erllama/__init__.py). Every module must be listed.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # leaves: no actor, no compiled module (checksum only tries it), importable anywhere
    ("leaf", ("erllama._version", "erllama.errors", "erllama.types", "erllama.checksum", "erllama.private",
              "erllama._vendor", "erllama.filestore", "erllama.testing", "erllama.cache.policy",
              "erllama.cache.pressure_rules", "erllama.config")),
    ("cache", ("erllama.cache",)),
    # the native binding and what describes it (sysinfo reports the build for the self-check)
    ("backend", ("erllama.backend", "erllama.handles", "erllama.includes", "erllama.sysinfo")),
    ("model", ("erllama.model", "erllama.stream")),
    # the application, the facade and the public re-exports (erllama.messages)
    ("app", ("erllama.app", "erllama.aio", "erllama.tables", "erllama.messages", "erllama.default_model", "erllama")),
    # the HTTP server, over the facade
    ("server", ("erllama.server", "erllama.ray")),
    # the command line and the demo, over everything
    ("entry", ("erllama.cli", "erllama.demo")),
)
# Imports allowed to point up, each with its reason (keep this empty if you can).
LAZY_UPWARD: dict[tuple[str, str], str] = {}
# The only importers of the compiled module: the backend, and the checksum's fast path.
NATIVE_IMPORTERS = ("erllama.backend.llama", "erllama.checksum")
NATIVE = "erllama._native"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_modules(package: str = "erllama") -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def _layer(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{module} is in no layer: add it to LAYERS in tests/test_build.py"
    return rank


def _imports(path: Path, known: set[str] | None = None, module: str | None = None) -> set[str]:
    """The modules ``path`` imports, at any depth (function-level imports and
    ``TYPE_CHECKING`` blocks included). ``from package import name`` counts as importing
    ``package.name`` when that is a module in ``known``, else ``package`` itself. ``module``
    (default: from ``path``) resolves relative imports."""
    module = module or _module_name(path)
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                names.add(full if known is None or full in known else base)
    return names


def _upward_imports(modules: dict[str, Path]) -> list[str]:
    known = {*modules, NATIVE}
    bad = []
    for name, path in modules.items():
        here = _layer(name)
        for target in sorted(_imports(path, known, name)):
            if target not in known or target == NATIVE or (name, target) in LAZY_UPWARD:
                continue
            if _layer(target) > here:
                bad.append(f"{name} ({LAYERS[here][0]}) imports {target} ({LAYERS[_layer(target)][0]})")
    return bad


def test_layering():
    """Imports point one way (LAYERS); only the backend and the checksum import the compiled
    module; supervision imports nothing of erllama."""
    modules = _package_modules()
    assert not _upward_imports(modules), "\n".join(["upward imports:", *_upward_imports(modules)])
    for name, path in modules.items():
        if name in NATIVE_IMPORTERS:
            continue
        bad = {n for n in _imports(path, {*modules, NATIVE}, name) if n == NATIVE}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    for path in (ROOT / "supervision").rglob("*.py"):
        bad = {n for n in _imports(path) if n == "erllama" or n.startswith("erllama.")}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_layering_catches_an_upward_import(tmp_path):
    """The check itself: a cache module importing the model layer, or a leaf importing the
    cache through the facade, is reported."""
    modules = _package_modules()
    cache_mod = tmp_path / "kvc.py"
    cache_mod.write_text("def f():\n    from erllama.model import actor\n")
    leaf_mod = tmp_path / "config.py"
    leaf_mod.write_text("from erllama import __version__\nfrom erllama.cache import store\n")
    names = {"erllama.cache.kvc": cache_mod, "erllama.config": leaf_mod}
    for name, path in names.items():
        bad = _upward_imports({**modules, name: path})
        assert any(b.startswith(f"{name} ") for b in bad), (name, bad)
    assert _upward_imports({**modules, "erllama.config": leaf_mod}) == [
        "erllama.config (leaf) imports erllama (app)",
        "erllama.config (leaf) imports erllama.cache.store (cache)",
    ]


def test_lower_layers_import_without_the_extension():
    """With the compiled module blocked, every module below the backend imports (config and
    the whole cache), and the checksum falls back to pure Python with the same values."""
    lower = sorted(n for n in _package_modules() if _layer(n) < _layer("erllama.backend"))
    assert {"erllama.config", "erllama.cache.kvc", "erllama.cache.store"} <= set(lower)
    code = ("import importlib, sys; sys.modules['erllama._native'] = None\n"
            f"for name in {lower!r}:\n"
            "    importlib.import_module(name)\n"
            "import erllama.checksum as c, erllama.config as cfg\n"
            "assert not c.NATIVE and c.crc32c(b'123456789') == 0xE3069283\n"
            "assert cfg.AppConfig().cache_config().ram_quota > 0\n"
            "assert 'erllama._native' not in sys.modules or sys.modules['erllama._native'] is None\n"
            "print('ok')")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    res = subprocess.run([sys.executable, "-c", "import sys; sys.modules['erllama._native'] = None\n"
                          "import erllama.config"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


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


def test_crc32c_fallback_matches_the_native_one():
    """The pure-Python CRC32C behind ``erllama.checksum`` gives the compiled routine's values,
    chained or not, for any bytes-like input."""
    from array import array

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from erllama import _native as native
    from erllama import checksum

    assert checksum.NATIVE and checksum.crc32c is not checksum.crc32c_py
    assert checksum.crc32c_py(b"123456789") == 0xE3069283 and checksum.crc32c_py(b"") == 0
    floats = array("f", [1.5, -2.0, 3.25])
    assert checksum.crc32c_py(floats) == native.crc32c(floats.tobytes())
    assert checksum.crc32c_py(memoryview(b"abcdef")[2:]) == native.crc32c(b"cdef")

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=600), st.integers(0, 600), st.integers(0, 0xFFFFFFFF))
    def check(data, cut, seed):
        cut = min(cut, len(data))
        assert checksum.crc32c_py(data) == native.crc32c(data) == _crc32c_ref(data)
        assert checksum.crc32c_py(data[cut:], checksum.crc32c_py(data[:cut])) == native.crc32c(data)
        assert checksum.crc32c_py(data, seed) == native.crc32c(data, seed)

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


def test_every_package_is_installed():
    # a package missing from pyproject's list works in an editable install and is absent
    # from a wheel (erllama.ray was, until this test)
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for name in ("erllama", "supervision")
             for p in (ROOT / name).rglob("__init__.py")}
    assert found == listed
