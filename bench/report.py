"""Small helpers the benchmark scripts share: medians with ranges, and the commit measured."""

from __future__ import annotations

import statistics
import subprocess
from pathlib import Path


def default_disk_root() -> Path:
    """``<repo>/build`` when it exists (git-ignored), else ``~/.cache/erllama/bench``."""
    build = Path(__file__).resolve().parent.parent / "build"
    return build if build.is_dir() else Path.home() / ".cache" / "erllama" / "bench"


def med(values: list[float | None]) -> tuple[float, float, float]:
    """(median, min, max) of the values that are numbers (None and NaN skipped)."""
    vals = [v for v in values if v is not None and v == v]
    return (statistics.median(vals), min(vals), max(vals)) if vals else (float("nan"),) * 3


def fmt(values: list[float | None], spec: str = ".1f") -> str:
    """``median [min-max]``."""
    m, lo, hi = med(values)
    return f"{m:{spec}} [{lo:{spec}}-{hi:{spec}}]"


def git_rev() -> str:
    """The checkout's commit, with ``+dirty`` when erllama/ has uncommitted changes."""
    here = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "erllama"], cwd=here, capture_output=True,
                               text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"
