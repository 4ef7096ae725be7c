"""What the sacrificial children (probe, self-check) share: their environment, the
``STAGE``/``RESULT`` lines they print, and how their deaths are named."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

__all__ = ["CRASH_SIGNALS", "child_env", "env_seconds", "how_it_died", "read_report", "telling_line"]

# deaths a native defect causes (an assert, a bad access): the same again next time, unlike a
# SIGKILL/SIGTERM (the OOM killer, an operator)
CRASH_SIGNALS = ("SIGABRT", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL")
_TELLING_WORDS = ("GGML_ASSERT", "GGML_ABORT", "terminate called", "error", "Error", "failed")


def child_env() -> dict[str, str]:
    """This process's environment with the package importable and ggml's abort backtrace off
    (ggml would otherwise attach gdb to print one: slow and noisy)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else root
    env["GGML_NO_BACKTRACE"] = "1"
    return env


def env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment variable ``name`` (``default`` when
    unset); anything else raises :class:`~erllama.errors.ConfigError` naming the variable."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        from erllama import errors

        raise errors.ConfigError(f"{name} must be a positive number of seconds, got {raw!r}")
    return value


def read_report(stdout: str) -> tuple[str | None, dict[str, Any] | None]:
    """The last ``STAGE`` the child announced and its ``RESULT`` object (None if it printed none)."""
    stage, report = None, None
    for line in stdout.splitlines():
        if line.startswith("STAGE "):
            stage = line[6:].strip()
        elif line.startswith("RESULT "):
            report = json.loads(line[7:])
    return stage, report


def how_it_died(returncode: int) -> str:
    """``"SIGSEGV"`` for a child killed by a signal, ``"exit code N"`` otherwise."""
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def telling_line(lines: list[str]) -> str | None:
    """The last non-blank line that names the failure (an assert, an abort, an error), else
    the last non-blank line, else None."""
    kept = [ln.strip() for ln in lines if ln.strip()]
    return next((ln for ln in reversed(kept) if any(w in ln for w in _TELLING_WORDS)), kept[-1] if kept else None)
