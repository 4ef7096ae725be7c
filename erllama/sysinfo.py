"""What this runtime is: the build, the CPU features compiled in and the ones the CPU has.

``system_info()`` (also ``erllama.system_info()``) gathers llama.cpp's own system info, the
facts setup.py recorded at build time (source id, CMake arguments, build-cache key), the CPU
and its features, the ggml backends compiled in and their devices (free and total memory),
and, unless asked not to, the self-check (``backend.selfcheck``).
``erllama doctor`` prints it.
"""

from __future__ import annotations

import json
import platform
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["backends", "build_info", "compiled_features", "cpu_flags", "cpu_model", "devices", "llama_system_info",
           "system_info"]

# CPU flags (as /proc/cpuinfo spells them) that ggml's kernels use, shown by `erllama doctor`
_RELEVANT = ("sse3", "ssse3", "avx", "avx2", "f16c", "fma", "bmi2", "avx_vnni", "avx512f", "avx512bw",
             "avx512vl", "avx512_vnni", "avx512_bf16", "avx512vbmi", "avx512_fp16", "amx_tile", "amx_int8",
             "amx_bf16", "asimd", "asimddp", "sve", "i8mm")


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = platform.processor() or platform.machine(), frozenset[str]()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    fields: dict[str, str] = {}
    for line in text.splitlines():  # the first CPU's lines; every CPU repeats them
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = frozenset((fields.get("flags") or fields.get("Features") or "").split())
    return fields.get("model name") or model, flags


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's best guess."""
    return _cpuinfo()[0]


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the kernel reports them (``flags`` / ``Features``)."""
    return _cpuinfo()[1]


def llama_system_info() -> str:
    """llama.cpp's ``llama_print_system_info()``: the backends and CPU features compiled in."""
    from erllama.backend.llama import native

    return native.system_info()


def compiled_features() -> dict[str, bool]:
    """The CPU features the native library was compiled with, parsed from llama.cpp's
    system info (``{"AVX2": True, "AMX_INT8": False, ...}``; a feature ggml does not list
    for this build is absent)."""
    out: dict[str, bool] = {}
    for part in llama_system_info().split("|"):
        name, sep, value = part.rpartition("=")
        name = name.split(":")[-1].strip()
        if sep and name and value.strip().isdigit():
            out[name] = value.strip() != "0"
    out.setdefault("AMX_INT8", False)  # ggml lists AMX only when it compiled the kernels
    return out


def backends() -> list[str]:
    """The ggml backends compiled in (``["CPU"]`` for a CPU build, ``["CUDA", "CPU"]`` with CUDA)."""
    from erllama.backend.llama import native

    try:
        return native.backends()
    except AttributeError:  # an extension built before backends() existed
        return [part.split(":", 1)[0].strip() for part in llama_system_info().split("|") if ":" in part]


def devices() -> list[dict[str, Any]]:
    """Every ggml device, the CPU included: ``name``, ``description``, ``type``
    (cpu/gpu/igpu/accel), ``backend``, ``free`` and ``total`` memory in bytes."""
    from erllama.backend.llama import native

    try:
        return native.devices()
    except AttributeError:  # an extension built before devices() existed: the non-CPU ones
        return [{**d, "backend": "?"} for d in native.device_memory()]


def build_info() -> dict[str, Any]:
    """What setup.py recorded when it built the extension: ``source`` (the llama.cpp source
    id), ``cmake_args``, ``cache_key`` and ``cache_dir`` (the build cache entry),
    ``amx_requested``, ``no_amx_flags``, ``openmp``, ``cuda`` (None, or the CUDA build's
    ``archs``, ``libraries``, ``library_dirs`` and ``rpaths``), ``compiler`` and ``built_for_cpu``."""
    from erllama.backend.llama import native

    try:
        return json.loads(native.build_info())
    except AttributeError:  # an extension built before build_info() existed
        return {}


def system_info(*, check: bool = True, refresh: bool = False) -> dict[str, Any]:
    """Everything ``erllama doctor`` shows, as a dict.

    ``check`` includes the runtime self-check (from its cache, or a child process started
    now; ``refresh=True`` always starts one). The ``amx`` entry says whether the CPU has AMX,
    whether the build compiled ggml's AMX kernels, and whether they were requested.
    ``backends`` names the ggml backends compiled in, ``devices`` lists every device with its
    free and total memory, and ``gpu`` the devices that are not the CPU (empty on a CPU build).
    """
    from erllama._version import __version__

    flags = cpu_flags()
    compiled = compiled_features()
    build = build_info()
    devs = devices()
    info: dict[str, Any] = {
        "erllama": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": {"model": cpu_model(), "flags": sorted(f for f in _RELEVANT if f in flags)},
        "compiled": compiled,
        "llama_cpp": llama_system_info(),
        "build": build,
        "amx": {"cpu_has": "amx_int8" in flags, "compiled": compiled.get("AMX_INT8", False),
                "requested": bool(build.get("amx_requested", False))},
        "backends": backends(),
        "devices": devs,
        "gpu": [d for d in devs if d["type"] != "cpu"],
    }
    if check:
        from erllama.backend import selfcheck

        info["selfcheck"] = selfcheck.selfcheck(refresh=refresh).record()
    return info
