"""Helpers for tests that start child processes (probes)."""

from __future__ import annotations

import psutil


def probe_children() -> list[psutil.Process]:
    """The probe child processes of this process still alive (there must be none after a test)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "erllama.backend.probe" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out
