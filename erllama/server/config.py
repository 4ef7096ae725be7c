"""What ``erllama serve`` reads: ``PATH[:ID]`` model arguments and a TOML file.

```toml
[server]                  # every key optional
host = "127.0.0.1"
port = 8080
api_key_env = "ERLLAMA_API_KEY"   # or api_key = "..." (the environment is safer)
max_queue = 64
max_body_bytes = 8388608

[app]                     # erllama.start options
cache_dir = "/var/cache/erllama"

[[models]]                # each: path, optional id, then erllama.load_model options
path = "/models/gemma-3-270m-q4_k_m.gguf"
id = "gemma"
n_ctx = 8192
n_seq_max = 4
chat_template = "gemma"
```
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from erllama import errors
from erllama.server.app import ModelSpec, ServerConfig

__all__ = ["load_toml", "model_arg"]

SERVER_KEYS = {"host", "port", "api_key", "api_key_env", "max_queue", "max_body_bytes", "retry_after_s"}


def model_arg(text: str, options: dict[str, Any] | None = None) -> ModelSpec:
    """``PATH`` or ``PATH:ID`` (a ``:`` in a path that exists is part of the path)."""
    path, sep, mid = text.rpartition(":")
    if not sep or os.path.exists(text) or not path:
        path, mid = text, ""
    if not path:
        raise errors.ConfigError(f"a model is PATH or PATH:ID, got {text!r}")
    return ModelSpec(path, mid or None, dict(options or {}))


def load_toml(path: str | os.PathLike[str]) -> tuple[ServerConfig, tuple[str, int]]:
    """The server configuration and ``(host, port)`` of a TOML file; a bad file or key is a
    ``ConfigError`` naming it."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise errors.ConfigError(f"cannot read the server configuration {path}: {exc}") from None
    unknown = sorted(set(data) - {"server", "app", "models"})
    if unknown:
        raise errors.ConfigError(f"{path}: unknown sections {unknown}; known: ['app', 'models', 'server']")
    srv = dict(data.get("server", {}))
    bad = sorted(set(srv) - SERVER_KEYS)
    if bad:
        raise errors.ConfigError(f"{path}: unknown [server] keys {bad}; known: {sorted(SERVER_KEYS)}")
    host, port = srv.pop("host", "127.0.0.1"), srv.pop("port", 8080)
    env = srv.pop("api_key_env", None)
    if env is not None:
        if srv.get("api_key") is not None:
            raise errors.ConfigError(f"{path}: give api_key or api_key_env, not both")
        srv["api_key"] = os.environ.get(env) or None
        if srv["api_key"] is None:
            raise errors.ConfigError(f"{path}: api_key_env names {env!r}, which is not set")
    models = []
    for i, m in enumerate(data.get("models", [])):
        if not isinstance(m, dict) or not isinstance(m.get("path"), str):
            raise errors.ConfigError(f"{path}: models[{i}] needs a path")
        opts = {k: v for k, v in m.items() if k not in ("path", "id")}
        models.append(ModelSpec(m["path"], m.get("id"), opts))
    app = data.get("app", {})
    if not isinstance(app, dict):
        raise errors.ConfigError(f"{path}: [app] must be a table of erllama.start options")
    if not isinstance(host, str) or isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
        raise errors.ConfigError(f"{path}: host must be a string and port an int in [0, 65535]")
    return ServerConfig(models=tuple(models), app_config=app, **srv), (host, port)
