"""Application, cache and model configuration: frozen dataclasses, validated when built.

A bad value raises :class:`erllama.errors.ConfigError` naming the field and the value, so
``erllama.start(...)`` and ``erllama.load_model(...)`` fail before anything starts.

A leaf of the package: it imports no actor and not the compiled module (the settings it
embeds come from the pure :mod:`erllama.cache.policy` and :mod:`erllama.cache.pressure_rules`),
so ``import erllama.config`` works without the extension (``tests/test_build.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erllama import errors
from erllama.cache.policy import SavePolicy
from erllama.cache.pressure_rules import PressureConfig
from erllama.types import TIERS

__all__ = ["AppConfig", "CacheConfig", "CacheLimits", "ModelConfig", "default_cache_dir", "default_ram_file_dir"]

GiB = 1 << 30
MiB = 1 << 20
ISOLATION = ("none", "probe", "process")
POOLING = ("unspecified", "none", "mean", "cls", "last")
RESTART = ("temporary", "transient", "permanent")
KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")


def _int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise errors.ConfigError(f"{name} must be an int {bound}, got {value!r}")


def _seconds(name: str, value: Any, hi: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= hi:
        raise errors.ConfigError(f"{name} must be seconds in [0, {hi:g}], got {value!r}")


def _choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise errors.ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")


def _policy(value: Any, name: str = "policy") -> SavePolicy:
    if isinstance(value, SavePolicy):
        return value
    if value is None:
        return SavePolicy()
    if isinstance(value, Mapping):
        return SavePolicy.from_dict(value)
    raise errors.ConfigError(f"{name} must be a dict of save-policy knobs or a SavePolicy, got {value!r}")


def _pressure(value: Any) -> PressureConfig:
    if value is None:
        return PressureConfig()
    if isinstance(value, Mapping):
        try:
            return PressureConfig(**value)
        except TypeError as exc:
            raise errors.ConfigError(f"pressure: {exc}") from None
    if not isinstance(value, PressureConfig):
        raise errors.ConfigError(f"pressure must be a dict or PressureConfig, got {value!r}")
    return value


def default_cache_dir() -> Path:
    """The cache directory when none is configured: ``$ERLLAMA_CACHE_DIR``, else
    ``~/.cache/erllama``."""
    env = os.environ.get("ERLLAMA_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "erllama"


def default_ram_file_dir(anchor: str | os.PathLike[str], uid: int | None = None) -> Path:
    """The ``ram_file`` tier's directory when none is configured:
    ``/dev/shm/erllama-<uid>-<first 16 hex of the SHA-256 of anchor's real path>``, the
    anchor being the cache directory, so applications on different cache directories
    never share a tier (``uid``: this process's by default)."""
    digest = hashlib.sha256(os.fsencode(os.path.realpath(anchor))).hexdigest()[:16]
    return Path("/dev/shm") / f"erllama-{os.getuid() if uid is None else uid}-{digest}"


def _from_kwargs(cls: type, config: Any, overrides: Mapping[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise errors.ConfigError(f"unknown {cls.__name__} option(s) {unknown}; known: {sorted(names)}")
    base = config if config is not None else cls()
    return dataclasses.replace(base, **overrides)


@dataclass(frozen=True)
class CacheLimits:
    """What :class:`AppConfig` and :class:`CacheConfig` share, declared and checked once:
    the tier quotas (bytes; 0 disables a tier), the tmpfs tier's directory, the writer
    pool's bounds, how long a save waits for room, and memory pressure (a dict, a
    :class:`~erllama.cache.pressure.PressureConfig` or ``None`` for the default, stored as a
    ``PressureConfig``), and the shared cold tier: ``shared_dir``, a directory several nodes
    mount (``None``: none), listed again at most every ``shared_scan_s`` seconds
    (:mod:`erllama.cache.shared`)."""

    ram_quota: int = 1 * GiB
    ram_file_dir: str | None = None
    ram_file_quota: int = 2 * GiB
    disk_quota: int = 20 * GiB
    writer_max_concurrent: int = 4
    writer_queue: int = 64
    writer_queue_bytes: int = 256 * MiB
    room_wait_s: float = 2.0
    pressure: Any = None
    shared_dir: str | None = None
    shared_scan_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("ram_quota", "ram_file_quota", "disk_quota"):
            _int(name, getattr(self, name), 0)
        _int("writer_max_concurrent", self.writer_max_concurrent, 1, 256)
        _int("writer_queue", self.writer_queue, 0, 4096)
        _int("writer_queue_bytes", self.writer_queue_bytes, 0)
        _seconds("room_wait_s", self.room_wait_s, 60)
        _seconds("shared_scan_s", self.shared_scan_s, 3600)
        if self.shared_dir is not None and (not isinstance(self.shared_dir, str | os.PathLike)
                                            or not str(self.shared_dir)):
            raise errors.ConfigError(f"shared_dir must be a path or None, got {self.shared_dir!r}")
        object.__setattr__(self, "pressure", _pressure(self.pressure))


@dataclass(frozen=True)
class CacheConfig(CacheLimits):
    """The cache store's configuration: the shared limits plus where the disk tier lives
    (default ``<cache dir>/kv``) and how long a save waits for its parent row."""

    disk_dir: str | None = None
    parent_wait_s: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        _seconds("parent_wait_s", self.parent_wait_s, 60)

    def quota(self, tier: str) -> int:
        """The byte quota of ``tier``."""
        return {"ram": self.ram_quota, "ram_file": self.ram_file_quota, "disk": self.disk_quota}[tier]

    def resolved_ram_file_dir(self) -> Path:
        """The tmpfs directory (default :func:`default_ram_file_dir` of the disk directory;
        an application passes one derived from its cache directory)."""
        return Path(self.ram_file_dir) if self.ram_file_dir else default_ram_file_dir(self.resolved_disk_dir())

    def resolved_disk_dir(self) -> Path:
        """The disk directory (default ``<cache dir>/kv``)."""
        return Path(self.disk_dir) if self.disk_dir else default_cache_dir() / "kv"


@dataclass(frozen=True)
class AppConfig(CacheLimits):
    """How the application runs: the cache directory, the shared cache limits (tier quotas
    and directories, writer pool, memory pressure), the default save policy, and the model
    supervisor's restart intensity."""

    cache_dir: str = field(default_factory=lambda: str(default_cache_dir()))
    policy: Any = None
    model_intensity: int = 5
    model_period: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.cache_dir, str | os.PathLike) or not str(self.cache_dir):
            raise errors.ConfigError(f"cache_dir must be a path, got {self.cache_dir!r}")
        object.__setattr__(self, "cache_dir", str(Path(self.cache_dir).expanduser()))
        super().__post_init__()
        _int("model_intensity", self.model_intensity, 0)
        if not isinstance(self.model_period, int | float) or isinstance(self.model_period, bool) \
                or not 0 < self.model_period < 86400:
            raise errors.ConfigError(f"model_period must be seconds in (0, 86400), got {self.model_period!r}")
        object.__setattr__(self, "policy", _policy(self.policy))

    @classmethod
    def build(cls, config: AppConfig | None = None, **overrides: Any) -> AppConfig:
        """``config`` (or the defaults) with ``overrides`` applied; unknown names raise."""
        return _from_kwargs(cls, config, overrides)

    def cache_config(self) -> CacheConfig:
        """The cache store's configuration derived from this one."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(CacheLimits)}
        shared["ram_file_dir"] = self.ram_file_dir or str(default_ram_file_dir(self.cache_dir))
        return CacheConfig(**shared, disk_dir=str(Path(self.cache_dir) / "kv"))


@dataclass(frozen=True)
class ModelConfig:
    """How one model is loaded and served (the options of ``erllama.load_model``)."""

    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int = 512
    n_seq_max: int = 1
    n_threads: int | None = None
    n_gpu_layers: int = 0
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool | str = "auto"
    swa_full: bool = False
    chat_template: str | None = None
    fingerprint: bytes | str = "file"
    tier: str = "ram"
    policy: Any = None
    isolation: str = "probe"
    restart: str = "transient"
    backend: str = "llama"
    prefill_chunk: int | None = None
    namespace: bytes | None = None
    pooling: str = "unspecified"
    resident_seqs: int = 0
    resident_tokens: int | None = None

    def __post_init__(self) -> None:
        _int("n_ctx", self.n_ctx, 1, 1 << 24)
        _int("n_batch", self.n_batch, 1, 1 << 20)
        _int("n_ubatch", self.n_ubatch, 1, 1 << 20)
        _int("n_seq_max", self.n_seq_max, 1, 256)
        if self.n_threads is not None:
            _int("n_threads", self.n_threads, 1, 1024)
        _int("n_gpu_layers", self.n_gpu_layers, -1, 1 << 16)
        _choice("type_k", self.type_k, KV_TYPES)
        _choice("type_v", self.type_v, KV_TYPES)
        _choice("flash_attn", self.flash_attn, (True, False, "auto", "on", "off"))
        if not isinstance(self.swa_full, bool):
            raise errors.ConfigError(f"swa_full must be a bool, got {self.swa_full!r}")
        if self.chat_template is not None and (not isinstance(self.chat_template, str) or not self.chat_template):
            raise errors.ConfigError(f"chat_template must be a template name or Jinja text, got {self.chat_template!r}")
        fp = self.fingerprint
        if not ((isinstance(fp, bytes) and len(fp) == 32) or fp in ("file", "gguf_chunked")):
            raise errors.ConfigError(f"fingerprint must be 32 bytes, 'file' or 'gguf_chunked', got {fp!r}")
        _choice("tier", self.tier, TIERS)
        if self.policy is not None:  # None: the application's default policy
            object.__setattr__(self, "policy", _policy(self.policy))
        _choice("isolation", self.isolation, ISOLATION)
        _choice("restart", self.restart, RESTART)
        if not isinstance(self.backend, str) or not (self.backend in ("llama", "stub") or ":" in self.backend):
            raise errors.ConfigError(f"backend must be 'llama', 'stub' or 'package.module:Class', got {self.backend!r}")
        if self.prefill_chunk is not None:
            _int("prefill_chunk", self.prefill_chunk, 1, 1 << 20)
        if self.namespace is not None and (not isinstance(self.namespace, bytes) or not self.namespace):
            raise errors.ConfigError(f"namespace must be non-empty bytes or None, got {self.namespace!r}")
        _choice("pooling", self.pooling, POOLING)
        _int("resident_seqs", self.resident_seqs, 0, 256 - self.n_seq_max)
        if self.resident_tokens is not None:
            _int("resident_tokens", self.resident_tokens, 1, 1 << 24)
            if not self.resident_seqs:
                raise errors.ConfigError(f"resident_tokens={self.resident_tokens!r} needs resident_seqs > 0")
        if self.n_ubatch > self.n_batch:
            object.__setattr__(self, "n_ubatch", self.n_batch)

    @classmethod
    def build(cls, config: ModelConfig | None = None, **overrides: Any) -> ModelConfig:
        """``config`` (or the defaults) with ``overrides`` applied; unknown names raise."""
        return _from_kwargs(cls, config, overrides)

    def resident_budget(self) -> int:
        """The resident tier's quota in tokens (KV cells): ``resident_tokens``, by default
        ``resident_seqs`` sequences of the working sequences' size; 0 when the tier is off."""
        if not self.resident_seqs:
            return 0
        if self.resident_tokens is not None:
            return self.resident_tokens
        return self.resident_seqs * max(1, self.n_ctx // self.n_seq_max)

    def context_params(self) -> dict[str, Any]:
        """The parameters that shape KV bytes, for the cache key's context-shape hash
        (``n_seq_max`` and ``kv_unified`` included: a state blob records the stream layout,
        so a model with the resident tier, one unified stream, has rows of its own)."""
        if not self.resident_seqs:
            return {"type_k": self.type_k, "type_v": self.type_v, "flash_attn": self.flash_attn,
                    "swa_full": self.swa_full, "n_seq_max": self.n_seq_max, "kv_unified": False}
        return {"type_k": self.type_k, "type_v": self.type_v, "flash_attn": self.flash_attn,
                "swa_full": True, "n_seq_max": self.n_seq_max + self.resident_seqs, "kv_unified": True}
