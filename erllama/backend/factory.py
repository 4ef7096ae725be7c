"""Open a model's backend the way its ``isolation`` mode says.

``"none"`` builds the configured backend class in this process. ``"probe"`` first has a
short-lived child process load the file (``backend.probe``) and raises ``MalformedGGUF``
if the child dies, then loads in this process. ``"process"`` runs the backend in a worker
process for its whole life (``backend.process``). ``check_adapter`` does the same for a LoRA
adapter before ``load_adapter``: under ``"probe"`` a child loads the model with the adapter
applied first (``backend.probe.ensure_adapter_probed``).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from erllama import errors
from erllama.backend.protocol import Backend

__all__ = ["backend_class", "check_adapter", "open_backend"]


def backend_class(name: str) -> Any:
    """The class a ``ModelConfig.backend`` name refers to."""
    if name == "llama":
        from erllama.backend.llama import LlamaBackend

        return LlamaBackend
    if name == "stub":
        from erllama.backend.stub import StubBackend

        return StubBackend
    module, _, cls = name.partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        raise errors.ConfigError(f"backend {name!r} cannot be imported: {exc}") from None


def open_backend(path: str | os.PathLike[str], config: Any, *, cache_dir: str | None = None) -> Backend:
    """A ready backend for ``path`` under ``config.isolation``; ``cache_dir`` keeps probe results."""
    if config.isolation == "process":
        try:
            from erllama.backend.process import ProcessBackend
        except ImportError:
            raise errors.NotSupported("isolation='process' is not available in this build") from None
        return ProcessBackend(path, config)
    if config.isolation == "probe" and config.backend == "llama":
        try:
            from erllama.backend.probe import ensure_probed
        except ImportError:
            pass
        else:
            ensure_probed(path, config, cache_dir=cache_dir)
    return backend_class(config.backend)(path, config)


def check_adapter(model_path: str | os.PathLike[str], adapter_path: str | os.PathLike[str], config: Any, *,
                  cache_dir: str | None = None) -> None:
    """Before a model loaded from ``model_path`` under ``config`` loads the LoRA ``adapter_path``:
    under ``isolation="probe"`` (llama backend), a probe child loads and applies it first and a
    failure raises here (``MalformedGGUF`` when the child died); otherwise nothing to do
    (``"none"`` is not protected, ``"process"`` loads adapters in the model's worker)."""
    if config.isolation != "probe" or config.backend != "llama":
        return
    try:
        from erllama.backend.probe import ensure_adapter_probed
    except ImportError:
        return
    ensure_adapter_probed(model_path, adapter_path, config, cache_dir=cache_dir)
